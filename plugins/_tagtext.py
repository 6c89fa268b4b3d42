"""Tag text conventions, in one place, for every step that reads or writes tags.

Inside lorakit a tag is kept in its *canonical* (Danbooru) form: lower case, words joined by
underscores, parentheses unescaped: ``hatsune_miku_(cosplay)``. Taggers and users write the same tag
in many ways (``Hatsune Miku \\(cosplay\\)``, ``hatsune  miku_(Cosplay)``); ``canonical()`` turns
them all into one spelling, so duplicates and list look-ups (blacklists, aliases, rules) work.

``styled()`` turns a canonical tag back into the spelling a caption file wants:

* ``underscore`` (default): the Danbooru spelling, what NAI-family models were trained on.
* ``space``: words separated by spaces, as the A1111 taggers write with "replace underscores".
* ``escape=True`` writes ``\\(`` and ``\\)``, needed only where parentheses mean emphasis (A1111
  prompts, kohya's ``--weighted_captions``); plain kohya training reads parentheses literally.

Emoticon tags (``^_^``, ``>_<``, ``o_o``) keep their underscores in every style: they are not word
separators there. Like kohya's tagger script, any tag of three characters or fewer counts as one.

For tagger authors::

    from lorakit.plugins._tagtext import canonical, styled
    tags = {canonical(name): score for name, score in raw}      # store canonical tags in Item.tags
"""
from __future__ import annotations

import re

UNDERSCORE = "underscore"
SPACE = "space"
STYLES = (UNDERSCORE, SPACE)

# Kaomoji whose underscores are part of the face. Anything of 3 characters or fewer is also kept.
KAOMOJI = frozenset({
    "^_^", ">_<", "o_o", "0_0", "=_=", "x_x", "+_+", "@_@", "._.", "u_u", "|_|", "-_-", "^_^;",
    ">_o", "o_<", "<o>_<o>", "(o)_(o)", "3_3", "6_9", "c_c", "t_t", ";_;", "q_q", "n_n", "*_*",
})

_ESCAPED = re.compile(r"\\([()\[\]:\\])")
_SEPARATORS = re.compile(r"[\s_]+")


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


def styled(tag: str, style: str = UNDERSCORE, escape: bool = False) -> str:
    """Spell a canonical tag for a caption file (``style`` is ``underscore`` or ``space``)."""
    if style not in STYLES:
        raise ValueError(f"unknown tag style {style!r} (known: {', '.join(STYLES)})")
    out = tag
    if style == SPACE and not is_kaomoji(tag):
        out = out.replace("_", " ")
    if escape:
        out = out.replace("(", r"\(").replace(")", r"\)")
    return out


def split_tags(text: str) -> list[str]:
    """The tags of a comma-separated caption, stripped, empty parts dropped; ``|||`` counts as a comma."""
    return [part.strip() for part in text.replace("|||", ",").split(",") if part.strip()]


def matches(tag: str, pattern: str) -> bool:
    """Does canonical ``tag`` match a user pattern? ``*`` is a wildcard (``*_(meme)``, ``artist:*``)."""
    pattern = canonical(pattern)
    if "*" not in pattern:
        return tag == pattern
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), tag) is not None


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
