"""The repeats planner: balance subsets so every concept gets about the same steps per epoch.

Guide 002 ("Repetições e Épocas"): steps per epoch of a folder = images x repeats; aim for about
300 per concept and 100 per sub-concept, so 100 images -> ``3_outfit1``, 50 -> ``6_outfit2``,
10 -> ``30_outfit3``, and round down. Guide 000 gives the whole plan as
``images x repeats / batch size x epochs = total steps``. This step writes each subset's repeats
(kohya's ``num_repeats``, the N of ``N_name``) and prints that plan.
"""
from __future__ import annotations

import math
from typing import Any

from lorakit.plugin_sdk import DatasetStep, Item, LorakitError, Param, StepContext, hookimpl

from ._mappings import SubsetMapping, positive_int

ROUNDING = ("down", "nearest", "up")
MIN_IMAGES_PER_CONCEPT = 8  # guide 002: at least 8 images for an outfit

# Guide 002 ("Receita", "Tabela de repetições"): steps per epoch per concept, and total steps.
EPOCH_TARGET = {"prodigy": 300, "adamw": 600}  # AdamW: "double the steps of Prodigy"
TOTAL_STEPS = {"sd15": (2000, 3000), "sdxl": (1500, 2500)}  # Prodigy; AdamW doubles them
OLD_ANIME = 1 / 3     # "old anime (80s, 90s) and low-resolution screencaps need about 1/3 of the steps"
NOISE_OPTIONS = 3 / 5  # "ip noise gamma and min snr gamma: multiply by 3/5"
SDXL = 1 / 2          # "for sdxl multiply the values by 1/2"
FAR = (0.5, 1.5)      # a plan below half the guide's low end, or above 1.5 x its high end, is far outside
MODELS = ("auto", "sd15", "sdxl")
TARGETS = ("per_epoch", "total")


class RepeatsStep(DatasetStep):
    """Set each subset's repeats so that images x repeats is close to a target per epoch.

    repeats = target / images, rounded (down by default, as the guide says), at least
    min_repeats and at most max_repeats. The target is steps_per_epoch, or the subset's entry
    in subset_steps (e.g. 100 for a sub-concept). By default steps_per_epoch is guide 002's:
    300 per concept with Prodigy, 600 with AdamW, times its multipliers: old_anime (80s-90s
    anime, low-resolution screencaps) x1/3, ip_noise_gamma or min_snr_gamma in the train
    settings x3/5, SDXL x1/2. With target total, all targets are scaled together so the plan
    lands in the middle of the guide's total steps instead (Prodigy 2000-3000 on SD1.5,
    1500-2500 on SDXL; AdamW double; old anime a third).

    batch_size, epochs, optimizer, gradient accumulation, max_train_steps and the noise options
    are read from the pipeline's train: section (give them here only without one). The plan
    is printed with the guides' formula, images x repeats / batch size x epochs = total steps,
    checked against the guide's totals (a warning when far outside), and written to
    reports/repeats-plan.json. Subsets named in fixed keep the repeats set in pipeline.yaml;
    regularisation subsets are left alone.
    """

    name = "repeats"
    summary = "Balance repeats per subset toward the guide's steps; plan and check total steps."
    version = "2"
    params = [
        Param("steps_per_epoch", int, None, "target images x repeats per subset per epoch (default: the guide's 300 "
              "for Prodigy, 600 for AdamW, times the multipliers)", min=1),
        Param("subset_steps", SubsetMapping(positive_int, "misc=100"), {},
              "a different target for some subsets, e.g. {outfit_detail: 100} (guide: ~100 per sub-concept)",
              type_name="a mapping subset: steps, e.g. misc=100",
              json_schema={"type": ["object", "string"], "additionalProperties": {"type": "integer", "minimum": 1}}),
        Param("target", str, "per_epoch", "per_epoch: each subset gets its target per epoch; total: scale the "
              "targets so the total steps land in the middle of the guide's range", choices=TARGETS),
        Param("batch_size", int, None, "training batch size (default: train: batch_size, else 1)", min=1),
        Param("epochs", int, None, "training epochs (default: train: epochs, else 8 as guide 002)", min=1),
        Param("optimizer", str, None, "prodigy or adamw, for the guide's targets (default: train: optimizer, "
              "else prodigy)", choices=("prodigy", "adamw", "adamw8bit")),
        Param("model", str, "auto", "sd15 or sdxl, for the guide's targets (auto: sdxl at resolution 1024 and up)",
              choices=MODELS),
        Param("old_anime", bool, False, "80s-90s anime or low-resolution screencaps: the guide's x1/3"),
        Param("min_repeats", int, 1, "fewest repeats a subset gets", min=1),
        Param("max_repeats", int, 100, "most repeats a subset gets (a handful of images repeated more overfits)", min=1),
        Param("rounding", str, "down", "round repeats down (the guide's advice), to nearest, or up", choices=ROUNDING),
        Param("fixed", list, [], "subsets whose repeats stay as set in pipeline.yaml"),
    ]
    reads = frozenset({"subset", "train"})
    writes = frozenset({"subset"})
    example = "lorakit repeats sorted/ planned/ --batch-size 2 --epochs 8 --optimizer prodigy"

    # ----- the settings: options, else the pipeline's train: section, else the guide's ----------
    def settings(self, ctx: StepContext) -> dict[str, Any]:
        """Batch size, epochs, optimiser... with where each came from, and the guide's targets."""
        o = self.options
        train = ctx.train or {}
        notes: list[str] = []

        def pick(name: str, default):
            given, written = o[name], train.get(name)
            if given is not None:
                if written is not None and written != given:
                    notes.append(f"warning: {name} {given} here but {written} in train:; the plan uses {given}, "
                                 "the trainer will use the train: value")
                return given
            return written if written is not None else default

        batch_size = int(pick("batch_size", 1))
        epochs = int(pick("epochs", 8))
        optimizer = str(pick("optimizer", "prodigy" if not train else "adamw")).lower()
        family = "adamw" if optimizer.startswith("adamw") else "prodigy"
        model = o.model if o.model != "auto" else ("sdxl" if ctx.resolution >= 1024 else "sd15")
        accumulation = int(train.get("gradient_accumulation_steps") or 1)
        max_steps = train.get("max_train_steps")
        noise = [k for k in ("ip_noise_gamma", "min_snr_gamma") if float(train.get(k) or 0) > 0]
        multipliers = []
        if o.old_anime:
            multipliers.append(("old anime / screencaps", OLD_ANIME))
        if noise:
            multipliers.append((" or ".join(noise), NOISE_OPTIONS))
        if model == "sdxl":
            multipliers.append(("SDXL", SDXL))
        factor = math.prod(m for _, m in multipliers)
        epoch_target = max(1, math.floor(EPOCH_TARGET[family] * factor + 1e-9))
        lo, hi = TOTAL_STEPS[model]
        scale = (2 if family == "adamw" else 1) * (OLD_ANIME if o.old_anime else 1)
        return {"batch_size": batch_size, "epochs": epochs, "optimizer": optimizer, "family": family, "model": model,
                "gradient_accumulation_steps": accumulation, "max_train_steps": max_steps,
                "multipliers": multipliers, "epoch_target": epoch_target,
                "total_range": (round(lo * scale), round(hi * scale)), "notes": notes,
                "from_train": bool(train)}

    def run(self, items: list[Item], ctx: StepContext) -> list[Item]:
        o = self.options
        if o.min_repeats > o.max_repeats:
            raise LorakitError(f"step 'repeats': min_repeats ({o.min_repeats}) is above max_repeats ({o.max_repeats})")
        cfg = self.settings(ctx)
        counts: dict[str, int] = {}
        for item in items:
            counts[item.subset] = counts.get(item.subset, 0) + 1
        for name in sorted(set(o.subset_steps) | set(o.fixed)):
            if name not in counts:
                ctx.log(f"warning: options name subset '{name}', which has no images "
                        f"(subsets: {', '.join(sorted(counts)) or 'none'})")
        base = o.steps_per_epoch or cfg["epoch_target"]
        targets = {name: o.subset_steps.get(name, base) for name in counts}
        if o.target == "total":
            targets = self._scaled_to_total(targets, counts, ctx, cfg)

        rows = []
        warnings = list(cfg["notes"])
        for name in sorted(counts):
            images = counts[name]
            subset = ctx.subset(name)
            target = targets[name]
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

        plan = self._plan(rows, cfg)
        check = self._check(plan, cfg)
        lines = self._table(rows) + [plan["formula"], self._target_line(base, cfg), check["line"]]
        for line in lines + warnings + ([check["warning"]] if check["warning"] else []):
            ctx.log(line)
        if check["warning"]:
            warnings.append(check["warning"])
        ctx.report("plan", {**plan, "subsets": {r["subset"]: {k: v for k, v in r.items() if k != "subset"}
                                                 for r in rows}, "warnings": warnings,
                            "guide": {"optimizer": cfg["family"], "model": cfg["model"],
                                      "steps_per_epoch_per_concept": cfg["epoch_target"],
                                      "multipliers": {k: round(v, 4) for k, v in cfg["multipliers"]},
                                      "total_steps": list(cfg["total_range"]), "verdict": check["verdict"]},
                            "settings_from": "train section" if cfg["from_train"] else "options"})
        return items

    def _target_line(self, base: int, cfg) -> str:
        if self.options.steps_per_epoch:
            return f"target: {base} steps per epoch per subset (steps_per_epoch)"
        mult = "".join(f" x {_fraction(v)} ({k})" for k, v in cfg["multipliers"])
        return (f"target: {EPOCH_TARGET[cfg['family']]} steps per epoch per concept ({cfg['family']}, guide 002)"
                f"{mult} = {base}")

    def _scaled_to_total(self, targets: dict[str, int], counts: dict[str, int], ctx, cfg) -> dict[str, int]:
        """Targets scaled together so (sum of targets) / batch / accumulation x epochs is the
        middle of the guide's total range (regularisation and fixed subsets are not scaled)."""
        lo, hi = cfg["total_range"]
        free = [n for n in targets if n not in self.options.fixed and not ctx.subset(n).is_reg]
        if not free:
            return targets
        fixed_steps = sum(counts[n] * ctx.subset(n).repeats for n in targets if n not in free and not ctx.subset(n).is_reg)
        wanted = (lo + hi) / 2 * cfg["batch_size"] * cfg["gradient_accumulation_steps"] / cfg["epochs"] - fixed_steps
        total = sum(targets[n] for n in free)
        factor = max(wanted, 1) / total
        return {n: (max(1, round(t * factor)) if n in free else t) for n, t in targets.items()}

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

    def _plan(self, rows, cfg) -> dict:
        batch, epochs, accumulation = cfg["batch_size"], cfg["epochs"], cfg["gradient_accumulation_steps"]
        images_per_epoch = sum(r["steps_per_epoch"] for r in rows)
        steps_per_epoch = math.ceil(math.ceil(images_per_epoch / batch) / accumulation)
        total = steps_per_epoch * epochs
        terms = " + ".join(f"{r['images']} x {r['repeats']}" for r in rows) or "0"
        accum = f" / accumulation {accumulation}" if accumulation > 1 else ""
        formula = (f"plan: ({terms}) = {images_per_epoch} images per epoch / batch size {batch}{accum} "
                   f"x {epochs} epochs = {total} total steps")
        if cfg["max_train_steps"]:
            formula += f"; train: max_train_steps stops at {cfg['max_train_steps']}"
            total = min(total, int(cfg["max_train_steps"]))
        return {"batch_size": batch, "epochs": epochs, "gradient_accumulation_steps": accumulation,
                "images_per_epoch": images_per_epoch, "steps_per_epoch": steps_per_epoch, "total_steps": total,
                "formula": formula}

    @staticmethod
    def _check(plan, cfg) -> dict:
        """The plan's total against the guide's range: within, outside, or far outside (a warning)."""
        lo, hi = cfg["total_range"]
        total = plan["total_steps"]
        what = (f"{cfg['family']} on {'SDXL' if cfg['model'] == 'sdxl' else 'SD1.5'}"
                + (", old anime" if any(k.startswith("old") for k, _ in cfg["multipliers"]) else ""))
        line = f"guide 002: {lo}-{hi} total steps for {what}; this plan: {total}"
        if lo <= total <= hi:
            return {"verdict": "within", "line": line + " (within)", "warning": None}
        side = "below" if total < lo else "above"
        far = total < lo * FAR[0] or total > hi * FAR[1]
        if not far:
            return {"verdict": side, "line": line + f" ({side})", "warning": None}
        advice = "raise epochs or repeats" if side == "below" else "lower epochs or repeats, or raise batch size"
        warning = (f"warning: {total} total steps is far {side} the guide's {lo}-{hi} for {what}: {advice} "
                   "(target: total aims at the middle of the range)")
        return {"verdict": f"far {side}", "line": line + f" (far {side})", "warning": warning}

    @staticmethod
    def _table(rows) -> list[str]:
        width = max([len("subset")] + [len(r["subset"]) for r in rows])
        lines = [f"{'subset':<{width}}  images  repeats  steps/epoch  folder"]
        for r in rows:
            note = f"  ({r['how']})" if r["how"] != "planned" else ""
            lines.append(f"{r['subset']:<{width}}  {r['images']:>6}  {r['repeats']:>7}  {r['steps_per_epoch']:>11}  "
                         f"{r['repeats']}_{r['subset']}{note}")
        return lines


def _fraction(value: float) -> str:
    for text, v in (("1/3", OLD_ANIME), ("3/5", NOISE_OPTIONS), ("1/2", SDXL)):
        if abs(value - v) < 1e-9:
            return text
    return f"{value:g}"


@hookimpl
def register_steps(register):
    register(RepeatsStep)
