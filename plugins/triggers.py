"""The trigger pruner: prepend trigger tags per subset, then prune the tags the triggers absorb.

Guide 002 ("Poda", "Implementação de Trigger") describes the levels this step automates:

* ``fluid`` (level 1): prepend the triggers, prune nothing by rule;
* ``semi-static`` (level 3, the guide's choice): a character trigger absorbs hair colour, length
  and style, eye colour and shape, skin, make-up, signature traits and the count of people;
  an outfit trigger absorbs the outfit's parts; breast size and footwear stay editable;
* ``static`` (level 2): also body shape and hair ornaments;
* ``style``: every tag goes, only the triggers survive.

Multi-trigger (level 4) comes from per-subset triggers: a character trigger on every subset plus an
outfit trigger per folder. What is pruned in one subset and not in another then belongs to that
subset's trigger; the report lists it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from functools import lru_cache

from lorakit.plugin_sdk import DatasetStep, Item, Param, Percent, StepContext, hookimpl

from . import tag_rules
from ._mappings import SubsetMapping, one_of, string_list
from ._tagging import TagPatterns, tag_key

MODES = ("fluid", "semi-static", "static", "style")
KEEP_TOKENS = ("count", "separator", "none")


@lru_cache(maxsize=65536)
def _categories(tag: str) -> frozenset[str]:
    return frozenset(tag_rules.categories_of(tag))


def _check_categories(names) -> None:
    if names is not None:
        tag_rules.check_categories(names)


class TriggersStep(DatasetStep):
    """Add trigger tags and prune what they should absorb, per subset.

    Triggers of a subset: the trigger option (character triggers for every subset), the
    subset's triggers: in pipeline.yaml, and its outfit_triggers entry. They become the
    first tags of every caption, characters first, and the subset's keep_tokens is set to their
    number (or the ||| separator is written after them) so caption shuffling never moves them.

    Then, per image, a tag is pruned when it is in the prune list (or the subset's
    subset_prune list), when a character trigger absorbs its category (by mode, or the
    categories option), when an outfit trigger absorbs its category (outfit_categories), or
    when it is in at least frequency percent of the subset's images. Tags in keep are never
    pruned; tags of a keep_categories category (breast size and footwear by default) are not pruned
    by the category and frequency rules (only when you list them in prune). A subset
    without any trigger is left as it is. In style mode every tag and sentence goes and only the
    triggers (and keep tags) survive.

    Category names: hair_color, hair_length, hair_style, hair_accessory, eye_color, eye_shape, skin,
    makeup, signature, body, breasts, people, footwear, outfit, accessory (see docs/steps/triggers.md).
    Report: reports/triggers-pruned.json (per subset: triggers, what was pruned, why, how often).
    """

    name = "triggers"
    summary = "Prepend trigger tags per subset, prune the tags they absorb (fluid/semi-static/static/style), set keep tokens."
    version = "1"
    params = [
        Param("trigger", list, [], "character trigger(s) prepended in every subset, e.g. mychar"),
        Param("outfit_triggers", SubsetMapping(string_list, "outfit1=red_dress"), {},
              "outfit (concept) triggers per subset: {outfit1: red_dress} or outfit1=red_dress,outfit2=blue_kimono",
              type_name="a mapping subset: trigger(s), e.g. outfit1=red_dress",
              json_schema={"type": ["object", "string"],
                           "additionalProperties": {"type": ["string", "array"], "items": {"type": "string"}}}),
        Param("mode", str, "semi-static", "how much the triggers absorb: fluid, semi-static, static or style",
              choices=MODES),
        Param("subset_modes", SubsetMapping(one_of(*MODES), "misc=fluid"), {},
              "a different mode for some subsets, e.g. {misc: fluid}",
              type_name="a mapping subset: mode, e.g. misc=fluid",
              json_schema={"type": ["object", "string"], "additionalProperties": {"enum": list(MODES)}}),
        Param("prune", list, [], "tags pruned in every subset that has a trigger ('*' wildcards: '*_hair')"),
        Param("subset_prune", SubsetMapping(string_list, "outfit1=katana+sheath"), {},
              "tags pruned in one subset only: {outfit1: [katana, sheath]}",
              type_name="a mapping subset: tags, e.g. outfit1=katana+sheath",
              json_schema={"type": ["object", "string"],
                           "additionalProperties": {"type": ["string", "array"], "items": {"type": "string"}}}),
        Param("categories", list, None, "categories a character trigger absorbs (default: those of the mode)",
              validate=_check_categories),
        Param("outfit_categories", list, list(tag_rules.OUTFIT_CATEGORIES),
              "categories an outfit trigger absorbs (not in fluid mode)", validate=_check_categories),
        Param("frequency", Percent, Percent(0), "also prune tags found in at least this share of a subset's "
              "images, e.g. 80% (0 = off)", max=100),
        Param("keep", list, [], "tags never pruned ('*' wildcards), e.g. solo,looking_at_viewer"),
        Param("keep_categories", list, list(tag_rules.KEEP_CATEGORIES),
              "categories never pruned (guide: breast size, and footwear never goes into an outfit trigger)",
              validate=_check_categories),
        Param("keep_tokens", str, "count", "protect the triggers from caption shuffling: count (keep_tokens = "
              "number of triggers), separator (write the separator after them) or none", choices=KEEP_TOKENS),
        Param("separator", str, "|||", "the keep-tokens separator written in separator mode"),
    ]
    reads = frozenset({"tags", "caption", "subset"})
    writes = frozenset({"tags", "caption", "subset"})
    example = "lorakit triggers tagged/ pruned/ --trigger mychar --outfit-triggers outfit1=red_dress --mode semi-static"

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        o = self.options
        by_subset: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_subset[item.subset].append(i)
        for name in sorted(set(o.outfit_triggers) | set(o.subset_modes) | set(o.subset_prune)):
            if name not in by_subset:
                ctx.log(f"warning: options name subset '{name}', which has no images "
                        f"(subsets: {', '.join(sorted(by_subset)) or 'none'})")

        out = list(items)
        report: dict[str, dict] = {}
        for subset_name in sorted(by_subset):
            indexes = by_subset[subset_name]
            subset = ctx.subset(subset_name)
            if subset.is_reg and not subset.triggers and subset_name not in o.outfit_triggers:
                # regularisation images show the class without the subject: the global trigger is not theirs
                ctx.log(f"subset {subset_name}: regularisation images, left without a trigger ({len(indexes)} images)")
                continue
            outfit = _unique(o.outfit_triggers.get(subset_name, []))
            outfit_keys = {tag_key(t) for t in outfit}
            character = [t for t in _unique(list(o.trigger) + list(subset.triggers)) if tag_key(t) not in outfit_keys]
            triggers = character + outfit
            mode = o.subset_modes.get(subset_name, o.mode)
            if not triggers:
                ctx.log(f"subset {subset_name}: no trigger, left as it is ({len(indexes)} images)")
                continue
            plan = _SubsetPlan(self.options, mode, bool(character), bool(outfit), subset_name,
                               [items[i] for i in indexes])
            for i in indexes:
                out[i] = plan.apply(items[i], triggers)
            self._warn_known_triggers(ctx, subset_name, triggers, [items[i] for i in indexes])

            changes = {"triggers": triggers}
            if o.keep_tokens != "none":
                changes["keep_tokens"] = len(triggers)
            if o.keep_tokens == "separator":
                changes["keep_tokens_separator"] = o.separator
            ctx.subsets[subset_name] = subset.replace(**changes)
            report[subset_name] = plan.summary(character, outfit, ctx.subsets[subset_name])
            ctx.log(plan.log_line(character, outfit, ctx.subsets[subset_name]))

        report_all = {"subsets": report, "pruned_everywhere": [], "pruned_only_in": {}}
        if len(report) > 1:
            sets = {s: set(r["pruned"]) for s, r in report.items()}
            everywhere = set.intersection(*sets.values())
            report_all["pruned_everywhere"] = sorted(everywhere)
            report_all["pruned_only_in"] = {s: sorted(p - set().union(*(q for t, q in sets.items() if t != s)))
                                            for s, p in sets.items()}
        ctx.report("pruned", report_all)
        return out

    def _warn_known_triggers(self, ctx, subset_name, triggers, items) -> None:
        """Guide 002: a trigger the base model already knows drags its concept in; say so."""
        trigger_keys = {tag_key(t) for t in triggers}
        found: Counter = Counter()
        for item in items:
            keys = [tag_key(t) for t in item.tags]
            lead = 0
            while lead < len(keys) and keys[lead] in trigger_keys:  # triggers a previous run put first
                lead += 1
            found.update(trigger_keys & set(keys[lead:]))
        for trigger in triggers:
            hits = found[tag_key(trigger)]
            if hits:
                ctx.log(f"warning: trigger '{trigger}' is already a tag in {hits} image(s) of subset {subset_name}: "
                        "the base model knows it, so it brings its own concept; a made-up word is safer")


class _SubsetPlan:
    """Which tags one subset prunes, and the counts for the report."""

    def __init__(self, options, mode: str, has_character: bool, has_outfit: bool, subset: str, items: list[Item]):
        self.o = options
        self.mode = mode
        self.subset = subset
        self.n_images = len(items)
        if not has_character:
            self.character_categories: tuple[str, ...] = ()
        elif options.categories is not None:
            self.character_categories = tuple(options.categories)
        else:
            self.character_categories = tag_rules.CHARACTER_CATEGORIES.get(mode, ())
        self.outfit_categories = tuple(options.outfit_categories) if has_outfit and mode != "fluid" else ()
        self.listed = TagPatterns(list(options.prune) + list(options.subset_prune.get(subset, [])))
        self.keep = TagPatterns(options.keep)
        self.keep_categories = tuple(options.keep_categories)
        self.frequent: dict[str, float] = {}
        if float(options.frequency) > 0 and items:
            counts = Counter(t for item in items for t in {tag_key(x) for x in item.tags})
            for tag, n in counts.items():
                share = 100.0 * n / len(items)
                if share >= float(options.frequency):
                    self.frequent[tag] = share
        self.pruned: dict[str, Counter] = defaultdict(Counter)   # tag -> reason -> images
        self.kept: Counter = Counter()                            # tags a keep rule saved
        self.dropped_sentences = 0

    def reason(self, tag: str) -> str | None:
        """Why canonical ``tag`` is pruned in this subset, or None to keep it."""
        if self.mode == "style":
            return None if tag in self.keep else "style"
        cats = _categories(tag)
        why = None
        if tag in self.listed:
            why = "listed"
        else:
            hit = [c for c in self.character_categories if c in cats]
            hit = hit or [c for c in self.outfit_categories if c in cats]
            if hit:
                why = hit[0]
            elif tag in self.frequent:
                why = f"frequency {self.frequent[tag]:.0f}%"
        if why and why != "listed" and (tag in self.keep or any(c in cats for c in self.keep_categories)):
            self.kept[tag] += 1
            return None
        if why == "listed" and tag in self.keep:
            self.kept[tag] += 1
            return None
        return why

    def apply(self, item: Item, triggers: list[str]) -> Item:
        trigger_keys = {tag_key(t) for t in triggers}
        separator = self.o.separator if self.o.keep_tokens == "separator" else None
        rest: dict[str, float | None] = {}
        for tag, score in item.tags.items():
            k = tag_key(tag)
            if k in trigger_keys or tag.strip() == self.o.separator:
                continue
            why = self.reason(k)
            if why:
                self.pruned[k][why] += 1
                continue
            rest[tag] = score
        tags: dict[str, float | None] = {t: item.tags.get(t) for t in triggers}
        caption = item.caption
        if self.mode == "style" and caption:
            caption = None
            self.dropped_sentences += 1
        if separator and (rest or caption):
            tags[separator] = None
        tags.update(rest)
        return item.replace(tags=tags, caption=caption)

    def _absorbed_by(self, reason: str, character: list[str], outfit: list[str]) -> list[str]:
        if reason in self.character_categories and reason not in self.outfit_categories:
            return character
        if reason in self.outfit_categories and reason not in self.character_categories:
            return outfit
        return character + outfit

    def summary(self, character, outfit, subset) -> dict:
        return {
            "mode": self.mode,
            "images": self.n_images,
            "triggers": {"character": character, "outfit": outfit},
            "keep_tokens": subset.keep_tokens,
            "keep_tokens_separator": subset.keep_tokens_separator,
            "pruned": {
                tag: {"images": sum(reasons.values()), "reason": reasons.most_common(1)[0][0],
                      "absorbed_by": self._absorbed_by(reasons.most_common(1)[0][0], character, outfit)}
                for tag, reasons in sorted(self.pruned.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
            },
            "kept_by_keep_rules": dict(self.kept.most_common()),
            "sentences_dropped": self.dropped_sentences,
        }

    def log_line(self, character, outfit, subset) -> str:
        trig = ", ".join(character + outfit)
        tokens = f"keep_tokens {subset.keep_tokens}" + (f", separator {subset.keep_tokens_separator!r}"
                                                       if subset.keep_tokens_separator else "")
        top = sorted(self.pruned.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        shown = ", ".join(f"{t} x{sum(r.values())} ({r.most_common(1)[0][0]})" for t, r in top[:8])
        more = f" and {len(top) - 8} more" if len(top) > 8 else ""
        kept = ""
        if self.kept:
            kept = "; kept by keep rules: " + ", ".join(f"{t} x{n}" for t, n in self.kept.most_common(5))
        return (f"subset {self.subset} ({self.mode}; triggers: {trig}; {tokens}): {self.n_images} images, "
                f"pruned {len(top)} tags: {shown or 'none'}{more}{kept}")


def _unique(tags) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in tags:
        t = str(t).strip()
        if t and tag_key(t) not in seen:
            seen.add(tag_key(t))
            out.append(t)
    return out


@hookimpl
def register_steps(register):
    register(TriggersStep)
