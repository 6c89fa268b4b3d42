"""Tag text: how tags are compared and written, shared by every step that reads or writes tags
(booru, wd14, tags, triggers, reg).

Booru tags are written with underscores (``long_hair``); many captions use spaces instead
(``long hair``). Emoticon tags (``^_^``, ``o_o``) keep their underscores in both styles, since the
underscore is part of the face. Prompt tools (A1111) read ``(`` and ``)`` as emphasis, so some
users escape them (``hatsune_miku_\\(append\\)``); training scripts do not need it.

To compare tags, ``tag_key`` gives one canonical (Danbooru) spelling: lower case, words joined by
single underscores, escapes undone: ``Hatsune Miku \\(cosplay\\)`` and ``hatsune  miku_(Cosplay)``
both become ``hatsune_miku_(cosplay)``. ``format_tag`` writes a tag back in the user's style.

    from lorakit.plugins._tagging import TagPatterns, tag_key
    blocked = TagPatterns(["*_(meme)", "watermark"])
    keep = {t: s for t, s in item.tags.items() if tag_key(t) not in blocked}
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from lorakit.plugin_sdk import Param

TAG_STYLES = ("underscores", "spaces")
COMBINE_MODES = ("replace", "append", "union")

# Emoticon tags: their underscores are part of the picture, never turned into spaces.
EMOTICONS = frozenset({
    "^_^", "^_-", "-_-", "-_o", "o_o", "o_0", "0_o", "0_0", "o_-", "x_x", "u_u", "t_t", "+_+", "+_-",
    "=_=", ">_<", ">_o", "<o>_<o>", "<|>_<|>", "@_@", "._.", "3_3", "6_9", ";_;", "|_|", "||_||",
    "(o)_(o)", "(=_=)", "._.;", "^_^;", "q_q", "._.", "*_*", "v_v", "o_<", "c_c", "n_n",
})

# Prefixes that mark a namespaced tag (``artist:name``, ``rating:safe``): search syntax or another
# site's category, never a tag a picture shows. Tags such as ``re:zero`` or ``:d`` are real tags.
NAMESPACES = frozenset({
    "artist", "character", "copyright", "general", "meta", "metadata", "species", "lore", "invalid",
    "rating", "score", "source", "id", "md5", "order", "user", "fav", "favcount", "pool", "status",
    "parent", "child", "width", "height", "mpixels", "ratio", "filetype", "filesize", "date", "age",
    "approver", "commenter", "noter", "tagcount", "gentags", "arttags", "chartags", "copytags",
    "metatags", "limit", "sort", "studio", "medium", "genre", "circle", "style", "faults",
})


def style_params(default_style: str = "underscores") -> list[Param]:
    """The two tag-text options every tag-writing step offers, with the same names and meaning."""
    return [
        Param("tag_style", str, default_style,
              "how multi-word tags are written: underscores (long_hair, the booru spelling) or "
              "spaces (long hair); emoticons such as ^_^ keep their underscores", choices=TAG_STYLES),
        Param("escape_parentheses", bool, False,
              "write ( and ) as \\( and \\) so prompt tools (A1111) do not read them as emphasis"),
    ]


def is_namespaced(tag: str) -> bool:
    """True for ``namespace:value`` tags such as ``artist:foo`` or ``rating:safe``."""
    head, sep, rest = tag.partition(":")
    return bool(sep) and bool(rest) and head.lower() in NAMESPACES


def is_emoticon(tag: str) -> bool:
    """Emoticon tags (and any tag of three characters or fewer, such as ``:d`` or ``x_x``) keep
    their underscores: there they are part of the face, not word separators."""
    tag = tag.strip().lower()
    return tag in EMOTICONS or (len(tag) <= 3 and not any(c.isspace() for c in tag))


def format_tag(tag: str, style: str = "underscores", escape_parentheses: bool = False) -> str:
    """Write one tag in the chosen style: underscores or spaces, parentheses escaped or not."""
    tag = tag.strip()
    if style not in TAG_STYLES:
        raise ValueError(f"tag style must be one of {', '.join(TAG_STYLES)}, not {style!r}")
    if not is_emoticon(tag):
        tag = tag.replace(" ", "_") if style == "underscores" else tag.replace("_", " ")
    if escape_parentheses:
        tag = tag.replace("\\(", "(").replace("\\)", ")")  # never double-escape
        tag = tag.replace("(", "\\(").replace(")", "\\)")
    return tag


_ESCAPED = re.compile(r"\\([()\[\]:\\_ ])")
_SEPARATORS = re.compile(r"[\s_]+")


@lru_cache(maxsize=1 << 16)
def tag_key(tag: str) -> str:
    """The canonical spelling used to compare tags: ``Long hair``, ``long_hair`` and ``long\\_hair``
    are one tag (``long_hair``). Lower case, single underscores, escapes undone; emoticons as is."""
    key = _ESCAPED.sub(r"\1", str(tag)).strip().lower()
    if is_emoticon(key):
        return key
    return _SEPARATORS.sub("_", key).strip("_") or key


def combine_tags(existing: dict[str, float | None], new: dict[str, float | None], mode: str) -> dict[str, float | None]:
    """Merge a tagger's tags with the tags an item already has.

    * ``replace``: the new tags only.
    * ``append``: the existing tags first (order and scores kept), then new tags not already there.
    * ``union``: the new tags first; then existing tags the tagger did not find. Tags found by
      both take the new score.
    Tags are matched by :func:`tag_key`, so ``long hair`` and ``long_hair`` are one tag.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine mode must be one of {', '.join(COMBINE_MODES)}, not {mode!r}")
    if mode == "replace":
        return dict(new)
    if mode == "append":
        out = dict(existing)
        seen = {tag_key(t) for t in existing}
        for tag, score in new.items():
            if tag_key(tag) not in seen:
                out[tag] = score
                seen.add(tag_key(tag))
        return out
    out = dict(new)
    seen = {tag_key(t) for t in new}
    for tag, score in existing.items():
        if tag_key(tag) not in seen:
            out[tag] = score
            seen.add(tag_key(tag))
    return out


def unique_tags(tags: Iterable[str]) -> list[str]:
    """Tags in order with duplicates (by :func:`tag_key`) removed."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag)
    return out


class TagPatterns:
    """A list of user tags and ``*`` patterns, compiled once for fast look-ups."""

    def __init__(self, patterns):
        self.exact: set[str] = set()
        wild: list[str] = []
        for p in patterns:
            c = tag_key(p)
            if "*" in c:
                wild.append(".*".join(re.escape(part) for part in c.split("*")))
            elif c:
                self.exact.add(c)
        self._wild = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def __contains__(self, tag: str) -> bool:
        return tag in self.exact or (self._wild is not None and self._wild.fullmatch(tag) is not None)

    def __bool__(self) -> bool:
        return bool(self.exact) or self._wild is not None
