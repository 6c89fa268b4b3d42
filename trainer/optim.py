"""Optimisers (a preset name or any class by dotted path, as kohya's ``optimizer_type``) and
learning-rate schedules with warm-up."""
from __future__ import annotations

import importlib
from typing import Any

from lorakit.plugin_sdk import LorakitError

from .config import OPTIMIZER_PRESETS, PRODIGY_PRESET

# The package to install for an optimiser preset that is not a core dependency.
INSTALL_HINT = {"bitsandbytes": "bitsandbytes", "dadaptation": "dadaptation", "lion_pytorch": "lion-pytorch",
                "came_pytorch": "came-pytorch"}


def optimizer_class(name: str):
    """The optimiser class of a preset name or a dotted path (``torch.optim.SGD``)."""
    path = OPTIMIZER_PRESETS.get(name, name)
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = INSTALL_HINT.get(module_name.split(".")[0], module_name.split(".")[0])
        raise LorakitError(f"optimizer {name}: cannot import {module_name} (pip install {package}"
                           f"{'; or pip install lorakit[optimizers]' if package in INSTALL_HINT.values() else ''})") from None
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        raise LorakitError(f"optimizer {name}: {module_name} has no class {class_name}")
    return cls


def make_optimizer(name: str, groups: list[dict[str, Any]], *, weight_decay: float, extra: dict[str, Any], device: str):
    """Build the optimiser over the network's parameter groups (each with its own learning rate)."""
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if name == "adamw8bit" and not str(device).startswith("cuda"):
        raise LorakitError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on the CPU")
    cls = optimizer_class(name)
    args: dict[str, Any] = {"weight_decay": weight_decay}
    if name == "prodigy":
        # The guide's preset; weight_decay only replaces the preset's when the user changed it.
        args = {**PRODIGY_PRESET, **({"weight_decay": weight_decay} if weight_decay != 0.01 else {})}
    if groups:
        args["lr"] = groups[0]["lr"]  # the default rate, as kohya passes it (some classes need one); groups keep theirs
    try:
        return cls(groups, **{**args, **extra})
    except TypeError as exc:
        raise LorakitError(f"optimizer {name}: {exc} (check optimizer_args)") from None


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
