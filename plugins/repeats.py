"""The repeats planner: balance subsets so every concept gets about the same steps per epoch.

Guide 002 ("Repetições e Épocas"): steps per epoch of a folder = images x repeats; aim for about
300 per concept and 100 per sub-concept, so 100 images -> ``3_outfit1``, 50 -> ``6_outfit2``,
10 -> ``30_outfit3``, and round down. Guide 000 gives the whole plan as
``images x repeats / batch size x epochs = total steps``. This step writes each subset's repeats
(kohya's ``num_repeats``, the N of ``N_name``) and prints that plan.
"""
from __future__ import annotations

import math

from lorakit.plugin_sdk import DatasetStep, Item, LorakitError, Param, StepContext, hookimpl

from ._mappings import SubsetMapping, positive_int

ROUNDING = ("down", "nearest", "up")
MIN_IMAGES_PER_CONCEPT = 8  # guide 002: at least 8 images for an outfit


class RepeatsStep(DatasetStep):
    """Set each subset's repeats so that images x repeats is close to a target per epoch.

    repeats = target / images, rounded (down by default, as the guide says), at least
    min_repeats and at most max_repeats. The target is steps_per_epoch (guide: ~300 per
    concept), or the subset's entry in subset_steps (e.g. 100 for a sub-concept). Subsets named
    in fixed keep the repeats set in pipeline.yaml; regularisation subsets are left alone
    (the trainer balances them against the training images).

    The plan is printed with the guides' formula, images x repeats / batch size x epochs = total
    steps, and written to reports/repeats-plan.json. batch_size and epochs only feed the
    plan: set the trainer's own values to match.
    """

    name = "repeats"
    summary = "Balance repeats per subset for a target of steps per epoch; print the steps plan."
    version = "1"
    params = [
        Param("steps_per_epoch", int, 300, "target images x repeats per subset per epoch (guide: ~300 per concept)",
              min=1),
        Param("subset_steps", SubsetMapping(positive_int, "misc=100"), {},
              "a different target for some subsets, e.g. {outfit_detail: 100} (guide: ~100 per sub-concept)",
              type_name="a mapping subset: steps, e.g. misc=100",
              json_schema={"type": ["object", "string"], "additionalProperties": {"type": "integer", "minimum": 1}}),
        Param("batch_size", int, 1, "training batch size, for the total-steps plan", min=1),
        Param("epochs", int, 8, "training epochs, for the total-steps plan (guide 002: 8)", min=1),
        Param("min_repeats", int, 1, "fewest repeats a subset gets", min=1),
        Param("max_repeats", int, 100, "most repeats a subset gets (a handful of images repeated more overfits)", min=1),
        Param("rounding", str, "down", "round repeats down (the guide's advice), to nearest, or up", choices=ROUNDING),
        Param("fixed", list, [], "subsets whose repeats stay as set in pipeline.yaml"),
    ]
    reads = frozenset({"subset"})
    writes = frozenset({"subset"})
    example = "lorakit repeats sorted/ planned/ --steps-per-epoch 300 --batch-size 2 --epochs 8"

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        o = self.options
        if o.min_repeats > o.max_repeats:
            raise LorakitError(f"step 'repeats': min_repeats ({o.min_repeats}) is above max_repeats ({o.max_repeats})")
        counts: dict[str, int] = {}
        for item in items:
            counts[item.subset] = counts.get(item.subset, 0) + 1
        for name in sorted(set(o.subset_steps) | set(o.fixed)):
            if name not in counts:
                ctx.log(f"warning: options name subset '{name}', which has no images "
                        f"(subsets: {', '.join(sorted(counts)) or 'none'})")

        rows = []
        warnings = []
        for name in sorted(counts):
            images = counts[name]
            subset = ctx.subset(name)
            target = o.subset_steps.get(name, o.steps_per_epoch)
            if subset.is_reg:
                rows.append({"subset": name, "images": images, "repeats": subset.repeats,
                             "steps_per_epoch": images * subset.repeats, "target": None, "how": "regularisation"})
                continue
            if name in o.fixed:
                repeats, how = subset.repeats, "fixed"
            else:
                repeats, how = self._repeats(target, images), "planned"
                wanted = target / images
                if wanted > o.max_repeats:
                    warnings.append(f"warning: subset {name}: {images} images would need {wanted:.0f} repeats for "
                                    f"{target} steps; capped at max_repeats {o.max_repeats}")
                if images * repeats > 1.5 * target:
                    warnings.append(f"warning: subset {name}: {images} images x {repeats} = {images * repeats} "
                                    f"steps per epoch, well above the {target} target even at {repeats} repeat(s)")
                ctx.subsets[name] = subset.replace(repeats=repeats)
            if images < MIN_IMAGES_PER_CONCEPT:
                warnings.append(f"warning: subset {name} has only {images} image(s); the guide wants at least "
                                f"{MIN_IMAGES_PER_CONCEPT} per outfit or concept")
            rows.append({"subset": name, "images": images, "repeats": repeats,
                         "steps_per_epoch": images * repeats, "target": target, "how": how})

        plan = self._plan(rows)
        for line in self._table(rows) + [plan["formula"]] + warnings:
            ctx.log(line)
        ctx.report("plan", {**plan, "subsets": {r["subset"]: {k: v for k, v in r.items() if k != "subset"}
                                                 for r in rows}, "warnings": warnings})
        return items

    def _repeats(self, target: int, images: int) -> int:
        o = self.options
        exact = target / images
        if o.rounding == "down":
            n = math.floor(exact + 1e-9)
        elif o.rounding == "up":
            n = math.ceil(exact - 1e-9)
        else:
            n = math.floor(exact + 0.5)
        return max(o.min_repeats, min(o.max_repeats, n))

    def _plan(self, rows) -> dict:
        o = self.options
        images_per_epoch = sum(r["steps_per_epoch"] for r in rows)
        steps_per_epoch = math.ceil(images_per_epoch / o.batch_size)
        total = steps_per_epoch * o.epochs
        terms = " + ".join(f"{r['images']} x {r['repeats']}" for r in rows) or "0"
        formula = (f"plan: ({terms}) = {images_per_epoch} images per epoch / batch size {o.batch_size} "
                   f"x {o.epochs} epochs = {total} total steps")
        return {"batch_size": o.batch_size, "epochs": o.epochs, "images_per_epoch": images_per_epoch,
                "steps_per_epoch": steps_per_epoch, "total_steps": total, "formula": formula}

    @staticmethod
    def _table(rows) -> list[str]:
        width = max([len("subset")] + [len(r["subset"]) for r in rows])
        lines = [f"{'subset':<{width}}  images  repeats  steps/epoch  folder"]
        for r in rows:
            note = f"  ({r['how']})" if r["how"] != "planned" else ""
            lines.append(f"{r['subset']:<{width}}  {r['images']:>6}  {r['repeats']:>7}  {r['steps_per_epoch']:>11}  "
                         f"{r['repeats']}_{r['subset']}{note}")
        return lines


@hookimpl
def register_steps(register):
    register(RepeatsStep)
