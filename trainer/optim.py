"""Optimisers (AdamW, AdamW8bit, Prodigy) and learning-rate schedules with warm-up."""
from __future__ import annotations

from typing import Any

from lorakit.plugin_sdk import LorakitError

from .config import PRODIGY_PRESET


def make_optimizer(name: str, groups: list[dict[str, Any]], *, weight_decay: float, extra: dict[str, Any], device: str):
    """Build the optimiser over the network's parameter groups (each with its own learning rate)."""
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if name == "adamw":
        import torch

        return torch.optim.AdamW(groups, weight_decay=weight_decay, **extra)
    if name == "adamw8bit":
        if not str(device).startswith("cuda"):
            raise LorakitError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on the CPU")
        try:
            import bitsandbytes as bnb  # imported only when asked for: an optional CUDA dependency
        except ImportError:
            raise LorakitError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay, **extra)
    if name == "prodigy":
        from prodigyopt import Prodigy

        args = {**PRODIGY_PRESET, **({"weight_decay": weight_decay} if "weight_decay" not in extra and weight_decay != 0.01 else {}), **extra}
        return Prodigy(groups, **args)
    raise LorakitError(f"unknown optimizer {name!r}")


def make_scheduler(name: str, optimizer, *, warmup_steps: int, total_steps: int, cycles: int = 1):
    """constant / linear / cosine / cosine_with_restarts, each after ``warmup_steps`` of linear warm-up."""
    from diffusers.optimization import get_scheduler

    if name == "constant":
        name = "constant_with_warmup" if warmup_steps else "constant"
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps}
    if name != "constant":
        kwargs["num_training_steps"] = total_steps
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = cycles
    if name == "constant":
        kwargs = {}
    return get_scheduler(name, optimizer, **kwargs)
