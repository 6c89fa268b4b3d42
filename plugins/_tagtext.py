"""Tag text for steps that compare tags: one canonical spelling per tag, and user tag patterns.

The spelling options a step *writes* (``tag_style`` underscores/spaces, ``escape_parentheses``)
and the emoticon and namespace lists live in ``_tagging`` (shared with the WD14 tagger and the
booru grabber); this module adds what a step needs to *compare* tags coming from anywhere.

Inside a comparison a tag is in its *canonical* (Danbooru) form: lower case, words joined by
single underscores, parentheses unescaped: ``hatsune_miku_(cosplay)``. Taggers and users write the
same tag in many ways (``Hatsune Miku \\(cosplay\\)``, ``hatsune  miku_(Cosplay)``); ``canonical()``
turns them all into one spelling, so duplicates and look-ups (blacklists, aliases, rules) work.
``styled()`` writes a canonical tag back in the user's chosen style.

Emoticon tags (``^_^``, ``>_<``, ``o_o``) keep their underscores: they are not word separators
there. Any tag of three characters or fewer without spaces is left as it is (``:d``, ``x_x``).

For other steps::

    from lorakit.plugins._tagtext import canonical, styled, TagPatterns
    blocked = TagPatterns(["*_(meme)", "watermark"])
    keep = {t: s for t, s in item.tags.items() if canonical(t) not in blocked}
"""
from __future__ import annotations

import re
from functools import lru_cache

from ._tagging import EMOTICONS, TAG_STYLES, format_tag, is_namespaced  # noqa: F401 (re-exported)

STYLES = TAG_STYLES
KAOMOJI = EMOTICONS | {"o_<", "c_c", "n_n"}

_ESCAPED = re.compile(r"\\([()\[\]:\\_ ])")
_SEPARATORS = re.compile(r"[\s_]+")


@lru_cache(maxsize=1 << 16)
def canonical(text: str) -> str:
    """The canonical Danbooru spelling of one tag (lower case, underscores, unescaped parentheses)."""
    tag = _ESCAPED.sub(r"\1", str(text)).strip().lower()
    if tag in KAOMOJI or (len(tag) <= 3 and not re.search(r"\s", tag)):
        return tag
    return _SEPARATORS.sub("_", tag).strip("_") or tag


def key(text: str) -> str:
    """The comparison key of a tag: two tags are the same tag when their keys are equal."""
    return canonical(text)


def is_kaomoji(tag: str) -> bool:
    """True for emoticon tags whose underscores must never become spaces."""
    return tag in KAOMOJI or len(tag) <= 3


def styled(tag: str, style: str = "underscores", escape: bool = False) -> str:
    """Spell a canonical tag for a caption file (``style`` is ``underscores`` or ``spaces``)."""
    if is_kaomoji(tag):
        return format_tag(tag, "underscores", escape)
    return format_tag(tag, style, escape)


class TagPatterns:
    """A list of user tags and ``*`` patterns, compiled once for fast look-ups."""

    def __init__(self, patterns):
        self.exact: set[str] = set()
        wild: list[str] = []
        for p in patterns:
            c = canonical(p)
            if "*" in c:
                wild.append(".*".join(re.escape(part) for part in c.split("*")))
            elif c:
                self.exact.add(c)
        self._wild = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def __contains__(self, tag: str) -> bool:
        return tag in self.exact or (self._wild is not None and self._wild.fullmatch(tag) is not None)

    def __bool__(self) -> bool:
        return bool(self.exact) or self._wild is not None
