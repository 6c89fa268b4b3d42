"""The tag consolidator: one clean, consistent tag list per image before triggers are added.

The guides clean captions by hand with a tag editor (002, "Limpeza"): delete useless tags (meme,
parody, uncensored), pick one of two synonyms (circlet vs tiara), fold a generic tag into the
specific one that says the same (``bow`` with ``black_bow``) and remove duplicates. This step does
all of it over the whole dataset, in that order, and reports what it changed and how often each
tag occurs per subset (the "tag frequency" a LoRA's metadata carries).
"""
from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from lorakit.plugin_sdk import DatasetStep, Item, LorakitError, Param, StepContext, hookimpl

from . import tag_rules
from ._tagging import TagPatterns, format_tag, is_namespaced, style_params, tag_key

SEPARATOR_TAG = "|||"


# ----- alias and implication files ----------------------------------------------------------------
def read_pairs(path: Path) -> tuple[tuple[str, str], ...]:
    """``(antecedent, consequent)`` rows of an alias or implication CSV, in canonical tag form.

    Accepts plain two-column files (``old,new``; ``#`` comments and a header ``antecedent,consequent``
    allowed) and Danbooru's exports (``id,antecedent_name,consequent_name,created_at,status``, where
    only ``active`` rows count). Raises ValueError naming the file and line of a bad row.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ValueError(f"an existing CSV file ({path}: {exc.strerror})") from None
    return _read_pairs(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_pairs(path: str, _mtime: int, _size: int) -> tuple[tuple[str, str], ...]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"a readable UTF-8 CSV file ({path}: {exc})") from None
    pairs: list[tuple[str, str]] = []
    ante, cons, status = 0, 1, None
    header_seen = False
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        lowered = [c.lower() for c in cells]
        if not header_seen:
            header_seen = True
            if "antecedent_name" in lowered and "consequent_name" in lowered:
                ante, cons = lowered.index("antecedent_name"), lowered.index("consequent_name")
                status = lowered.index("status") if "status" in lowered else None
                continue
            if lowered[:2] == ["antecedent", "consequent"]:
                continue
        if len(cells) <= max(ante, cons):
            raise ValueError(
                f"a CSV of antecedent,consequent rows ({path} line {line_no} has {len(cells)} column(s): {','.join(row)!r})"
            )
        if status is not None and status < len(cells) and cells[status].lower() not in ("", "active"):
            continue
        a, c = tag_key(cells[ante]), tag_key(cells[cons])
        if not a or not c:
            raise ValueError(f"a CSV of antecedent,consequent rows ({path} line {line_no} has an empty tag)")
        pairs.append((a, c))
    return tuple(pairs)


def _check_csv(path: Path) -> None:
    read_pairs(path)


def _check_inline_aliases(values: list[str]) -> None:
    for v in values:
        old, sep, new = v.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"aliases written old=new, e.g. tiara=circlet ({v!r} is not)")


class Aliases:
    """Tag renames (``antecedent -> consequent``), followed through chains (a -> b -> c)."""

    def __init__(self, pairs):
        self.table = {a: c for a, c in pairs if a != c}

    def resolve(self, tag: str) -> str:
        seen = {tag}
        while tag in self.table:
            tag = self.table[tag]
            if tag in seen:  # a cycle in the user's file: stop where we are
                break
            seen.add(tag)
        return tag


class Implications:
    """``specific implies generic`` pairs; ``implied_by(tags)`` gives every generic tag they imply."""

    def __init__(self, pairs):
        self.table: dict[str, set[str]] = defaultdict(set)
        for a, c in pairs:
            if a != c:
                self.table[a].add(c)
        self._closure: dict[str, frozenset[str]] = {}

    def closure(self, tag: str) -> frozenset[str]:
        if tag not in self._closure:
            out: set[str] = set()
            stack = list(self.table.get(tag, ()))
            while stack:
                t = stack.pop()
                if t not in out and t != tag:
                    out.add(t)
                    stack.extend(self.table.get(t, ()))
            self._closure[tag] = frozenset(out)
        return self._closure[tag]


# ----- the step -----------------------------------------------------------------------------------
class TagsStep(DatasetStep):
    """Clean every image's tags, the way the guides do it with a tag editor, in this order:

    \b
    1. normalise: one spelling per tag (lower case, underscores, escapes such as \\( undone), so
       Long Hair and long_hair are one tag;
    2. aliases: rename synonyms (tiara=circlet; a CSV of old,new rows or Danbooru's
       tag_aliases.csv export);
    3. blacklist: remove useless tags (built in: meme, parody, uncensored, shiny_skin, redraw
       challenges, booru bookkeeping tags such as commentary_request, namespaced tags such as
       artist:name; * is a wildcard);
    4. duplicates: keep the first, with the highest score;
    5. generic tags: drop bow when black_bow is there (any tag ending in _bow), and the
       consequent of every implication in a Danbooru tag_implications.csv;
    6. sort by tagger score, by frequency in the subset, or alphabetically.

    Trigger tags of the subsets (and the ||| keep-tokens separator) are left exactly as they are.
    Reports: reports/tags-frequency.json (per subset, tag -> images) and tags-changes.json.
    """

    name = "tags"
    summary = "Clean tags: normalise, aliases, blacklist, duplicates, generic-vs-specific, sort; frequency report."
    version = "1"
    params = [
        Param("blacklist", list, [], "extra tags to remove, added to the built-in list ('*' wildcards: '*_(cosplay)')"),
        Param("default_blacklist", bool, True,
              "use the built-in blacklist (meme, parody, uncensored, booru meta tags, namespaced tags like artist:x)"),
        Param("alias", list, [], "inline aliases old=new, e.g. tiara=circlet", validate=_check_inline_aliases,
              type_name="a list of old=new aliases"),
        Param("aliases", Path, None, "CSV of aliases: 'old,new' rows, or Danbooru's tag_aliases.csv export",
              validate=_check_csv),
        Param("implications", Path, None,
              "CSV of implications 'specific,generic' (or Danbooru's tag_implications.csv): the generic tag is "
              "dropped when the specific one is present", validate=_check_csv),
        Param("drop_generic", bool, True, "drop a generic tag when a more specific one ends with it (bow with black_bow)"),
        Param("sort", str, "score", "tag order: score (tagger confidence), frequency (in the subset), "
              "alphabetical, or none (keep the order)", choices=("score", "frequency", "alphabetical", "none")),
        *style_params(),
    ]
    reads = frozenset({"tags"})
    writes = frozenset({"tags"})
    example = "lorakit tags tagged/ clean/ --blacklist 'watermark,*_(cosplay)' --alias tiara=circlet --sort frequency"

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        o = self.options
        blacklist = TagPatterns(list(tag_rules.DEFAULT_BLACKLIST if o.default_blacklist else ()) + list(o.blacklist))
        pairs = list(self._pairs(o.aliases, "aliases"))
        pairs += [(tag_key(a), tag_key(b)) for a, _, b in (v.partition("=") for v in o.alias)]
        aliases = Aliases(pairs)
        implications = Implications(self._pairs(o.implications, "implications"))
        protected = {tag_key(t) for s in ctx.subsets.values() for t in s.triggers} | {SEPARATOR_TAG}

        removed: Counter = Counter()            # blacklisted tag -> images
        renamed: Counter = Counter()            # (old, new) -> images
        generic: dict[str, Counter] = defaultdict(Counter)  # generic tag -> covering tag -> images
        duplicates = 0
        decided: dict[str, tuple[str, bool]] = {}
        cleaned: list[tuple[Item, list[tuple[str, float | None, bool]]]] = []
        for item in items:
            tags: dict[str, float | None] = {}
            kept_verbatim: dict[str, str] = {}
            for raw, score in item.tags.items():
                if tag_key(raw) in protected:
                    tag = tag_key(raw)
                    kept_verbatim.setdefault(tag, raw)
                else:
                    tag = tag_key(raw)
                    if not tag:
                        continue
                    if tag not in decided:  # (renamed to, blacklisted?) once per distinct tag
                        new = aliases.resolve(tag)
                        decided[tag] = (new, new in blacklist or (o.default_blacklist and is_namespaced(new)))
                    new, blocked = decided[tag]
                    if new != tag:
                        renamed[(tag, new)] += 1
                        tag = new
                    if blocked:
                        removed[tag] += 1
                        continue
                if tag in tags:
                    duplicates += 1
                    tags[tag] = _higher(tags[tag], score)
                else:
                    tags[tag] = score
            dropped = self._generic(tags, implications, protected) if (o.drop_generic or implications.table) else {}
            for tag, by in dropped.items():
                generic[tag][by] += 1
                del tags[tag]
            cleaned.append((item, [(kept_verbatim.get(t, t), s, t in protected) for t, s in tags.items()]))

        frequency, image_counts = _frequency((item.subset, [tag_key(t) for t, _, p in entries if not p]) for item, entries in cleaned)
        out = []
        for item, entries in cleaned:
            entries = self._sorted(entries, frequency.get(item.subset, {}))
            new_tags = {t if p else format_tag(t, o.tag_style, o.escape_parentheses): s for t, s, p in entries}
            out.append(item.replace(tags=new_tags))

        self._report(ctx, len(items), frequency, image_counts, removed, renamed, generic, duplicates)
        return out

    # ----- pieces ---------------------------------------------------------------------------------
    def _pairs(self, path: Path | None, what: str):
        if path is None:
            return ()
        try:
            return read_pairs(path)
        except ValueError as exc:
            raise LorakitError(f"step 'tags': {what}: expected {exc}") from None

    def _generic(self, tags: dict, implications: Implications, protected: set[str]) -> dict[str, str]:
        """Generic tags of one image that a more specific tag covers: ``{generic: specific}``."""
        dropped: dict[str, str] = {}
        for specific in tags:
            if specific in protected:
                continue
            for implied in implications.closure(specific):
                if implied in tags and implied not in protected and implied != specific:
                    dropped.setdefault(implied, specific)
        if self.options.drop_generic:
            for specific in tags:
                if specific in protected or specific.startswith(tag_rules.NOT_SPECIFIC_PREFIXES):
                    continue
                # every proper ``_``-suffix of the specific tag: black_bow -> bow; a_b_c -> b_c, c
                parts = specific.split("_")
                for i in range(1, len(parts)):
                    suffix = "_".join(parts[i:])
                    if suffix in tags and suffix not in protected and suffix != specific:
                        dropped.setdefault(suffix, specific)
        return dropped

    def _sorted(self, entries, frequency: dict[str, int]):
        order = self.options.sort
        front = [e for e in entries if e[2]]
        rest = [e for e in entries if not e[2]]
        if order == "score":
            rest.sort(key=lambda e: -(e[1] if e[1] is not None else float("-inf")))
        elif order == "frequency":
            rest.sort(key=lambda e: -frequency.get(tag_key(e[0]), 0))
        elif order == "alphabetical":
            rest.sort(key=lambda e: e[0])
        return front + rest

    def _report(self, ctx, n_images, frequency, image_counts, removed, renamed, generic, duplicates):
        ctx.report("frequency", {s: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for s, c in frequency.items()})
        ctx.report("changes", {
            "images": n_images,
            "removed": dict(removed.most_common()),
            "renamed": [{"from": a, "to": b, "images": n} for (a, b), n in renamed.most_common()],
            "generic": {g: {"covered_by": dict(by.most_common()), "images": sum(by.values())} for g, by in generic.items()},
            "duplicates": duplicates,
        })
        ctx.log(f"{n_images} images: removed {sum(removed.values())} blacklisted tags ({_top(removed)}), "
                f"renamed {sum(renamed.values())} ({_top(Counter({f'{a}->{b}': n for (a, b), n in renamed.items()}))}), "
                f"dropped {sum(sum(c.values()) for c in generic.values())} generic tags "
                f"({_top(Counter({g: sum(c.values()) for g, c in generic.items()}))}), {duplicates} duplicates")
        for subset, counts in sorted(frequency.items()):
            shown = ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8])
            ctx.log(f"subset {subset}: {image_counts[subset]} images, {len(counts)} distinct tags; "
                    f"most frequent: {shown or 'none'}")


def _frequency(per_item) -> tuple[dict[str, Counter], Counter]:
    """``{subset: Counter(tag -> images with it)}`` and ``Counter(subset -> images)``."""
    out: dict[str, Counter] = defaultdict(Counter)
    images: Counter = Counter()
    for subset, tags in per_item:
        out[subset].update(set(tags))
        images[subset] += 1
    return out, images


def _higher(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _top(counter: Counter, n: int = 5) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{t} x{c}" for t, c in counter.most_common(n))


@hookimpl
def register_steps(register):
    register(TagsStep)
