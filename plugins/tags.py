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

from lorakit.plugin_sdk import (
    DatasetStep, Item, LorakitError, ModelRef, Param, StepContext, file_digest, hookimpl, resolve_model_files,
)

from . import tag_rules
from ._mappings import SubsetMapping, string_list
from ._tagging import TagPatterns, format_tag, is_namespaced, style_params, tag_key

SEPARATOR_TAG = "|||"
RARE_BELOW = 500  # guide 002: "any concept under 500 posts is a bit dubious" (the model barely knows it)


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


def read_tag_counts(path: Path) -> dict[str, int]:
    """``{canonical tag: Danbooru post count}`` from a WD14 ``selected_tags.csv``
    (``tag_id,name,category,count``); a bad row names the file and line."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise LorakitError(f"tags: tag counts {path}: {exc.strerror}") from None
    return dict(_read_tag_counts(str(path), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=4)
def _read_tag_counts(path: str, _mtime: int, _size: int) -> tuple[tuple[str, int], ...]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LorakitError(f"tags: cannot read tag counts {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if not {"name", "count"} <= set(reader.fieldnames or []):
        raise LorakitError(f"{path}: not a WD14 selected_tags.csv: it needs the columns name and count "
                           "(tag_id,name,category,count)")
    out = []
    for row in reader:
        try:
            out.append((tag_key(row["name"]), int(row["count"])))
        except (TypeError, ValueError):
            raise LorakitError(f"{path}:{reader.line_num}: count {row.get('count')!r} is not a number") from None
    return tuple(out)


def _check_split(mapping: dict[str, list[str]]) -> None:
    for generic, parts in mapping.items():
        if not parts:
            raise ValueError(f"parts for {generic!r}, e.g. armor=pauldrons+gorget+breastplate")


# ----- the step -----------------------------------------------------------------------------------
class TagsStep(DatasetStep):
    """Clean every image's tags, the way the guides do it with a tag editor, in this order:

    \b
    1. normalise: one spelling per tag (lower case, underscores, escapes such as \\( undone), so
       Long Hair and long_hair are one tag;
    2. aliases: rename synonyms (tiara=circlet; a CSV of old,new rows or Danbooru's
       tag_aliases.csv export); split: replace a generic tag by its parts
       (armor=pauldrons+gorget+breastplate);
    3. blacklist: remove useless tags (built in: meme, parody, uncensored, shiny_skin, redraw
       challenges, booru bookkeeping tags such as commentary_request, namespaced tags such as
       artist:name; * is a wildcard);
    4. duplicates: keep the first, with the highest score;
    5. generic tags: drop bow when black_bow is there (any tag ending in _bow), and the
       consequent of every implication in a Danbooru tag_implications.csv; keep_generic
       names generic tags that stay anyway (tie, as guide 001 keeps it);
    6. sort by tagger score, by frequency in the subset, or alphabetically.

    With tag_counts (WD14's selected_tags.csv, or the tagger's folder or hub repo), tags with
    fewer Danbooru posts than rare_below (guide 002: 500) are flagged in the summary, in
    meta.rare_tags and reports/tags-rare.json, or dropped with rare: drop.

    Trigger tags of the subsets (and the ||| keep-tokens separator) are left exactly as they are.
    Reports: reports/tags-frequency.json (per subset, tag -> images), tags-changes.json and
    tags-rare.json.
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
        Param("keep_generic", list, [], "generic tags never dropped for a more specific one (e.g. tie: guide 001 keeps "
              "it next to red_tie)"),
        Param("split", SubsetMapping(string_list, "armor=pauldrons+gorget+breastplate"), {},
              "replace a generic tag by its parts: {armor: [pauldrons, gorget, breastplate]}; on the command line "
              "armor=pauldrons+gorget+breastplate", validate=_check_split,
              type_name="a mapping tag -> parts, e.g. armor=pauldrons+gorget",
              json_schema={"type": ["object", "string"], "additionalProperties": {
                  "type": ["array", "string"], "items": {"type": "string"}}}),
        Param("tag_counts", ModelRef, None, "Danbooru post counts: WD14's selected_tags.csv, or a WD14 tagger "
              "folder or hub repo holding it (e.g. SmilingWolf/wd-swinv2-tagger-v3)"),
        Param("rare_below", int, RARE_BELOW, "with tag_counts: tags with fewer Danbooru posts are rare (guide: 500)",
              min=1),
        Param("rare", str, "flag", "with tag_counts: flag rare tags (summary, meta.rare_tags, report) or drop them",
              choices=("flag", "drop")),
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
        split = {tag_key(g): [tag_key(p) for p in parts if tag_key(p)] for g, parts in o.split.items()}
        counts = self._counts()

        removed: Counter = Counter()            # blacklisted tag -> images
        renamed: Counter = Counter()            # (old, new) -> images
        generic: dict[str, Counter] = defaultdict(Counter)  # generic tag -> covering tag -> images
        split_done: Counter = Counter()         # generic tag split into its parts -> images
        duplicates = 0
        decided: dict[str, tuple[str, bool]] = {}
        cleaned: list[tuple[Item, list[tuple[str, float | None, bool]]]] = []

        def decide(tag: str) -> tuple[str, bool]:
            """(renamed to, blacklisted?), once per distinct tag."""
            if tag not in decided:
                new = aliases.resolve(tag)
                decided[tag] = (new, new in blacklist or (o.default_blacklist and is_namespaced(new)))
            return decided[tag]

        for item in items:
            tags: dict[str, float | None] = {}
            kept_verbatim: dict[str, str] = {}

            def add(tag: str, score) -> None:
                nonlocal duplicates
                if tag in tags:
                    duplicates += 1
                    tags[tag] = _higher(tags[tag], score)
                else:
                    tags[tag] = score

            for raw, score in item.tags.items():
                tag = tag_key(raw)
                if tag in protected:
                    kept_verbatim.setdefault(tag, raw)
                    add(tag, score)
                    continue
                if not tag:
                    continue
                new, blocked = decide(tag)
                if new != tag:
                    renamed[(tag, new)] += 1
                    tag = new
                if blocked:
                    removed[tag] += 1
                    continue
                if tag in split:
                    split_done[tag] += 1
                    for part in split[tag]:
                        part, part_blocked = decide(part)
                        if part_blocked:
                            removed[part] += 1
                        else:
                            add(part, score)
                    continue
                add(tag, score)
            dropped = self._generic(tags, implications, protected) if (o.drop_generic or implications.table) else {}
            for tag, by in dropped.items():
                generic[tag][by] += 1
                del tags[tag]
            cleaned.append((item, [(kept_verbatim.get(t, t), s, t in protected) for t, s in tags.items()]))

        frequency, image_counts = _frequency((item.subset, [tag_key(t) for t, _, p in entries if not p]) for item, entries in cleaned)
        rare_images: dict[str, list[str]] = defaultdict(list)  # rare tag -> images
        out = []
        for item, entries in cleaned:
            entries = self._sorted(entries, frequency.get(item.subset, {}))
            meta = item.meta
            if counts is not None:
                rare = [t for t, _, p in entries if not p and counts.get(tag_key(t), 0) < o.rare_below]
                for t in rare:
                    rare_images[tag_key(t)].append(item.name)
                if o.rare == "drop":
                    entries = [e for e in entries if e[0] not in rare]
                meta = {**item.meta, "rare_tags": {tag_key(t): counts.get(tag_key(t)) for t in rare}}
            new_tags = {t if p else format_tag(t, o.tag_style, o.escape_parentheses): s for t, s, p in entries}
            out.append(item.replace(tags=new_tags, meta=meta))

        self._report(ctx, len(items), frequency, image_counts, removed, renamed, generic, duplicates, split_done)
        if counts is not None:
            self._report_rare(ctx, rare_images, counts)
        return out

    def cache_token(self) -> str:
        """The tag files' contents, so an edited CSV is not served from the cache."""
        o = self.options
        parts = [f"{what}={file_digest(Path(path))}" for what, path in (("aliases", o.aliases),
                                                                         ("implications", o.implications))
                 if path is not None and Path(path).is_file()]
        if o.tag_counts is not None:
            parts.append(f"counts={file_digest(self._counts_file())}")
        return ",".join(parts)

    def _counts_file(self) -> Path:
        spec = self.options.tag_counts
        return resolve_model_files(spec, ["selected_tags.csv"], "tags: tag counts")["selected_tags.csv"]

    def _counts(self) -> dict[str, int] | None:
        return None if self.options.tag_counts is None else read_tag_counts(self._counts_file())

    def _report_rare(self, ctx, rare_images: dict[str, list[str]], counts: dict[str, int]) -> None:
        o = self.options
        rows = sorted(rare_images.items(), key=lambda kv: (counts.get(kv[0], 0), kv[0]))
        ctx.report("rare", {
            "rare_below": o.rare_below, "action": o.rare,
            "tags": {t: {"posts": counts.get(t), "images": len(names), "examples": names[:5]} for t, names in rows},
        })
        if rows:
            shown = ", ".join(f"{t} ({counts[t]} posts)" if t in counts else f"{t} (not in the tag list)"
                              for t, _ in rows[:8])
            verb = "dropped" if o.rare == "drop" else "flagged"
            ctx.log(f"{len(rows)} rare tag(s) {verb}, under {o.rare_below} Danbooru posts (the model barely knows "
                    f"them; a more common tag may say it better): {shown}")

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
        keep = {tag_key(t) for t in self.options.keep_generic}
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
        for tag in keep:
            dropped.pop(tag, None)
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

    def _report(self, ctx, n_images, frequency, image_counts, removed, renamed, generic, duplicates, split_done):
        ctx.report("frequency", {s: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for s, c in frequency.items()})
        ctx.report("changes", {
            "images": n_images,
            "removed": dict(removed.most_common()),
            "renamed": [{"from": a, "to": b, "images": n} for (a, b), n in renamed.most_common()],
            "generic": {g: {"covered_by": dict(by.most_common()), "images": sum(by.values())} for g, by in generic.items()},
            "duplicates": duplicates,
            "split": {g: {"into": self.options.split.get(g) or next((v for k, v in self.options.split.items()
                                                                       if tag_key(k) == g), []), "images": n}
                      for g, n in split_done.most_common()},
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
