"""What the rest of lorakit calls: validate the ``train:`` settings early, then train.

    config = validate_settings(pipeline.train, "pipeline.yaml:train")   # before any model loads
    lora = train(dataset_folder, config)                                # -> the .safetensors path
"""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, validate_settings
from .loop import Trainer, TrainingStopped
from .plan import TrainingPlan

__all__ = ["validate_settings", "train", "dry_run", "TrainConfig", "TrainingStopped"]


def train(dataset: Path, config: TrainConfig, console=None, force: bool = False) -> Path:
    """Train a LoRA on ``dataset`` (folder with manifest.json, a manifest file or a kohya folder).

    Returns the path of the final ``.safetensors``. Raises ``LorakitError`` for user mistakes and
    ``TrainingStopped`` when the loss became NaN/infinite (the message names the kept checkpoint).
    An output from the same dataset and settings is kept (nothing to do); one from another run is
    never overwritten unless ``force``.
    """
    return Trainer(Path(dataset), config, console, force=force).run()


def dry_run(dataset: Path, config: TrainConfig, console=None) -> TrainingPlan:
    """Print and return the plan (subsets, buckets, steps, memory estimate) without loading weights."""
    return Trainer(Path(dataset), config, console).dry_run()
