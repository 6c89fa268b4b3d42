"""The ``tagfilter`` step: keep, drop or move images by their tags and scores, after a tagger;
and keep monochrome to a share of the dataset.

Guide 002 (step 3, "Filtragem") removes by hand what a tagger already names: chibi and
super-deformed versions, cluttered group shots, watermarks and text that cannot be cleaned, bad
anatomy, blurred faces; and it balances monochrome against colour ("up to 50% should not cause
problems"). The ``guides`` preset is that list as tag rules.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lorakit.plugin_sdk import DatasetStep, ImageError, Item, Param, Percent, StepContext, hookimpl

from ._tagging import TagPatterns, tag_key
from .filter import monochrome_stats

# The guide's list (002, step 3), as (reason, tags). A reason is what the review page and the
# set-aside list show.
GUIDES_PRESET: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chibi or super-deformed", ("chibi", "super_deformed")),
    ("group shot", ("multiple_girls", "multiple_boys", "2girls", "3girls", "4girls", "5girls", "6+girls",
                    "2boys", "3boys", "4boys", "5boys", "6+boys", "crowd")),
    ("watermark or text", ("watermark", "sample_watermark", "web_address", "speech_bubble")),
    ("bad anatomy", ("bad_anatomy", "bad_hands", "bad_feet", "bad_proportions", "extra_arms", "extra_digits")),
    ("blurry", ("blurry",)),
)
PRESETS = ("none", "guides")
MONOCHROME_TAGS = ("monochrome", "greyscale")
MONOCHROME_TESTS = ("tags", "pixels", "either")

_RULE = re.compile(r"^\s*(?P<tag>[^<>=]+?)\s*(?:>=\s*(?P<score>[0-9]*\.?[0-9]+)\s*)?$")


@dataclass(frozen=True)
class Rule:
    """One tag rule: ``tag`` (``*`` wildcards allowed) and the score from which it matches."""

    pattern: str
    min_score: float | None  # None: the step's threshold
    reason: str = ""

    def matches(self, tags: dict[str, float | None], threshold: float) -> tuple[str, float | None] | None:
        """The first of ``tags`` (canonical spelling -> score) this rule matches, with its score."""
        patterns = _patterns(self.pattern)
        floor = threshold if self.min_score is None else self.min_score
        for tag, score in tags.items():
            # a tag without a score (booru tags, a caption file) is certain
            if tag in patterns and (score is None or score >= floor):
                return tag, score
        return None

    @property
    def text(self) -> str:
        return self.pattern + (f">={self.min_score:g}" if self.min_score is not None else "")


@lru_cache(maxsize=1024)
def _patterns(pattern: str) -> TagPatterns:
    return TagPatterns([pattern])


def parse_rule(text: str, reason: str = "") -> Rule:
    m = _RULE.match(str(text))
    if not m or not tag_key(m.group("tag")):
        raise ValueError(f"tag rules written tag or tag>=score, e.g. chibi or blurry>=0.6 ({text!r} is not)")
    score = float(m.group("score")) if m.group("score") else None
    if score is not None and not 0 <= score <= 1:
        raise ValueError(f"a score from 0 to 1 ({text!r})")
    return Rule(tag_key(m.group("tag")), score, reason)


def _rules(value: Any) -> list[Rule]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(value)
    return [parse_rule(v) for v in value]


def _move_rules(value: Any) -> list[tuple[Rule, str]]:
    """``{tag rule: subset}`` in YAML, ``tag=subset,tag>=0.7=subset`` on the command line."""
    if isinstance(value, str):
        pairs = []
        for part in value.split(","):
            if not part.strip():
                continue
            rule, sep, subset = part.rpartition("=")
            if not sep or not rule.strip() or rule.rstrip().endswith(">"):
                raise ValueError(f"moves written tag=subset, e.g. monochrome=manga ({part!r} is not)")
            pairs.append((rule, subset))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(value)
    out = []
    for rule, subset in pairs:
        subset = str(subset).strip()
        if not subset or "/" in subset or subset.startswith("."):
            raise ValueError(f"a subset name without / for {rule!r} (got {subset!r})")
        out.append((parse_rule(str(rule)), subset))
    return out


class TagFilterStep(DatasetStep):
    """Sort images by what a tagger (wd14) or the booru says is in them.

    \b
    1. drop: an image with a drop tag (score at least the rule's, or
       threshold) is set aside. preset guides adds guide 002's list:
       chibi, super_deformed; group shots (multiple_girls, 2girls...,
       crowd); watermark, web_address, speech_bubble; bad_anatomy,
       bad_hands...; blurry. allow takes tags out of the drop rules.
    2. keep: when given, an image with none of these tags is set aside.
    3. move: an image with a move tag goes to that subset (a new subset
       starts as a copy of the image's subset), e.g. monochrome=manga.
    4. monochrome_share: when more of the remaining images are monochrome,
       the smallest monochrome ones are set aside (guide: "up to 50%").

    Tags without a score (booru tags, caption files) always count.
    Regularisation subsets are left alone. Each verdict, with the rule and
    score that decided it, is in meta.tagfilter and in
    reports/tagfilter-verdicts.json.
    """

    name = "tagfilter"
    summary = "Keep, drop or move images by tags and scores; balance monochrome."
    version = "1"
    params = [
        Param("preset", str, "none", "built-in drop rules: guides = guide 002's list (chibi, group shots, "
              "watermark/text, bad anatomy, blurry); none = only your rules", choices=PRESETS),
        Param("drop", _rules, [], "set aside images with any of these tags: tag or tag>=score, * wildcards "
              "(e.g. 'chibi, blurry>=0.6, *_censor')", type_name="a list of tag rules (tag or tag>=score)",
              json_schema={"type": ["array", "string"], "items": {"type": "string"}}),
        Param("allow", list, [], "tags taken out of the drop rules and the preset (e.g. multiple_girls for a duo LoRA)"),
        Param("keep", _rules, [], "when given, set aside images that have none of these tags (e.g. solo)",
              type_name="a list of tag rules (tag or tag>=score)",
              json_schema={"type": ["array", "string"], "items": {"type": "string"}}),
        Param("move", _move_rules, [], "move images with a tag to a subset: {tag: subset} (YAML) or "
              "tag=subset,... e.g. monochrome=manga, chibi>=0.8=chibi",
              type_name="a mapping tag rule -> subset, e.g. monochrome=manga",
              json_schema={"type": ["object", "string"], "additionalProperties": {"type": "string"}}),
        Param("threshold", float, 0.35, "score from which a scored tag counts, for rules without >=score",
              min=0, max=1),
        Param("monochrome_share", Percent, None, "most monochrome images may make of the dataset, e.g. 50% "
              "(the guide's limit); the smallest monochrome images beyond it are set aside (none = no limit)",
              min=0, max=100),
        Param("monochrome_test", str, "either", "what makes an image monochrome for monochrome_share: its "
              "tags (monochrome, greyscale), its pixels (as the filter step tests them), or either",
              choices=MONOCHROME_TESTS),
        Param("monochrome_tolerance", float, 12.0, "pixel test: chroma (0-180) still counted as grey",
              min=0, max=180),
    ]
    reads = frozenset({"tags", "image", "subset"})
    writes = frozenset({"meta", "subset"})
    example = "lorakit tagfilter tagged/ kept/ --preset guides --monochrome-share 50%"

    def __init__(self, params=None):
        super().__init__(params)
        o = self.options
        allowed = TagPatterns(o.allow)
        drop = [Rule(tag_key(t), None, reason) for reason, tags in (GUIDES_PRESET if o.preset == "guides" else ())
                for t in tags]
        drop += [Rule(r.pattern, r.min_score, f"drop rule {r.text}") for r in o.drop]
        moved = {r.pattern for r, _ in o.move} | {r.pattern for r in o.keep}
        # a tag you ask to move or keep is not also dropped by the preset
        self.drop_rules = [r for r in drop if r.pattern not in allowed
                           and not (not r.reason.startswith("drop rule") and r.pattern in moved)]

    # ----- verdicts -------------------------------------------------------------------------------
    def verdict(self, item: Item) -> dict[str, Any]:
        """What the tag rules say about one item: verdict drop / keep / move, with the deciding rule."""
        o = self.options
        tags = {}
        for raw, score in item.tags.items():
            key = tag_key(raw)
            if key and (key not in tags or (score is not None and (tags[key] is not None and score > tags[key]))):
                tags[key] = score
        for rule in self.drop_rules:
            hit = rule.matches(tags, o.threshold)
            if hit:
                return {"verdict": "drop", "rule": rule.text, "reason": rule.reason or f"drop rule {rule.text}",
                        "tag": hit[0], "score": hit[1]}
        if o.keep:
            hits = [(r, r.matches(tags, o.threshold)) for r in o.keep]
            hits = [(r, h) for r, h in hits if h]
            if not hits:
                return {"verdict": "drop", "rule": "keep " + ", ".join(r.text for r in o.keep),
                        "reason": "none of the keep tags", "tag": None, "score": None}
        for rule, subset in o.move:
            hit = rule.matches(tags, o.threshold)
            if hit:
                return {"verdict": "move", "rule": f"{rule.text}={subset}", "to": subset, "tag": hit[0],
                        "score": hit[1]}
        return {"verdict": "keep"}

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        o = self.options
        out: list[Item] = []
        rows: list[dict[str, Any]] = []
        counts = {"keep": 0, "move": 0, "drop": 0, "monochrome": 0}
        for item in items:
            sub = ctx.subsets.get(item.subset)
            if sub is not None and sub.is_reg:
                out.append(item)
                continue
            v = self.verdict(item)
            row = {"name": item.name, "subset": item.subset, **v}
            if v["verdict"] == "drop":
                counts["drop"] += 1
                why = f"{v['reason']}: {v['tag']}" + (f" {v['score']:.2f}" if v.get("score") is not None else "")
                if v["tag"] is None:
                    why = f"none of the keep tags ({', '.join(r.text for r in o.keep)})"
                row["why"] = why
                rows.append(row)
                ctx.set_aside(item, why)
                continue
            meta = dict(item.meta)
            meta["tagfilter"] = {k: val for k, val in v.items() if k != "reason"}
            if v["verdict"] == "move":
                counts["move"] += 1
                target = v["to"]
                if target not in ctx.subsets:
                    base = ctx.subset(item.subset)
                    ctx.subsets[target] = base.replace(name=target, folder=target)
                meta["tagfilter"]["from"] = item.subset
                item = item.replace(subset=target, meta=meta)
            else:
                counts["keep"] += 1
                item = item.replace(meta=meta)
            rows.append(row)
            out.append(item)

        if o.monochrome_share is not None:
            out = self._balance(out, ctx, rows, counts)

        ctx.report("verdicts", {"counts": counts, "rules": {
            "drop": [r.text for r in self.drop_rules], "keep": [r.text for r in o.keep],
            "move": {r.text: s for r, s in o.move}, "threshold": o.threshold,
            "monochrome_share": None if o.monochrome_share is None else float(o.monochrome_share)},
            "items": rows})
        ctx.log(f"{len(items)} images: kept {counts['keep']}, moved {counts['move']}, set aside {counts['drop']} "
                f"by tags" + (f" and {counts['monochrome']} for the monochrome share" if o.monochrome_share is not None
                              else ""))
        return out

    # ----- monochrome balance ---------------------------------------------------------------------
    def _is_monochrome(self, item: Item) -> tuple[bool, str, int]:
        """(monochrome?, why, pixel count); raises ImageError for a broken picture."""
        o = self.options
        tags = {tag_key(t): s for t, s in item.tags.items()}
        by_tag = next((t for t in MONOCHROME_TAGS if t in tags and (tags[t] is None or tags[t] >= o.threshold)), None)
        if o.monochrome_test == "tags" or (o.monochrome_test == "either" and by_tag):
            width, height = _size(item)
            return bool(by_tag), f"tag {by_tag}" if by_tag else "no monochrome or greyscale tag", width * height
        im = item.open()
        mono, why = monochrome_stats(im, o.monochrome_tolerance)
        return mono, why, im.size[0] * im.size[1]

    def _balance(self, items: list[Item], ctx: StepContext, rows: list[dict], counts: dict) -> list[Item]:
        share = float(self.options.monochrome_share) / 100
        row_of = {(r.get("to", r["subset"]), r["name"]): r for r in rows}
        tests: list[tuple[bool, str, int] | None] = []  # None: not counted (regularisation)
        with ctx.progress(len(items), "monochrome test") as advance:
            for item in items:
                sub = ctx.subsets.get(item.subset)
                if sub is not None and sub.is_reg:
                    tests.append(None)
                else:
                    try:
                        tests.append(self._is_monochrome(item))
                    except (ImageError, OSError) as exc:
                        tests.append((False, f"unreadable: {exc}", -1))
                advance()
        counted = [(n, t) for n, t in enumerate(tests) if t is not None and t[2] >= 0]
        mono = [(n, t) for n, t in counted if t[0]]
        colour = len(counted) - len(mono)
        allowed = len(mono) if share >= 1 else math.floor(share * colour / (1 - share) + 1e-9)
        # keep the largest monochrome pictures (guide 002 ranks high-resolution monochrome highly)
        ranked = sorted(mono, key=lambda nt: (-nt[1][2], items[nt[0]].name))
        over = {n for n, _ in ranked[allowed:]}
        total = len(counted)
        out: list[Item] = []
        for n, (item, test) in enumerate(zip(items, tests)):
            if test is None:
                out.append(item)
                continue
            is_mono, why, pixels = test
            row = row_of.get((item.subset, item.name))
            if pixels < 0:
                counts["drop"] += 1
                ctx.set_aside(item, f"cannot read the image for the monochrome test ({why})")
                if row is not None:
                    row.update(verdict="drop", why=why, rule="monochrome test")
                continue
            if row is not None:
                row["monochrome"] = is_mono
            if n in over:
                reason = (f"monochrome share: {len(mono)} of {total} images monochrome ({len(mono) / total:.0%}), "
                          f"limit {share:.0%}: kept the {allowed} largest ({why})")
                counts["monochrome"] += 1
                ctx.set_aside(item, reason)
                if row is not None:
                    row.update(verdict="drop", why=reason, rule=f"monochrome_share {share:.0%}")
                continue
            meta = dict(item.meta)
            meta["tagfilter"] = {**meta.get("tagfilter", {}), "monochrome": is_mono, "monochrome_why": why}
            out.append(item.replace(meta=meta))
        if mono:
            ctx.log(f"monochrome: {len(mono)} of {total} images ({len(mono) / total:.0%}); the {share:.0%} limit "
                    f"keeps {min(allowed, len(mono))}")
        return out


def _size(item: Item) -> tuple[int, int]:
    """Width and height from the file header (no decode)."""
    if item.pending_image is not None:
        return item.pending_image.size
    from lorakit.plugin_sdk import image_size

    return image_size(item.path)


@hookimpl
def register_steps(register):
    register(TagFilterStep)
