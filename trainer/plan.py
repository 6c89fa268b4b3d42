"""The training plan (``--dry-run``): what will be trained, how many steps, and about how much memory.

The memory figure is an estimate from parameter counts and image size, calibrated on SD1.5
(weights + LoRA with its optimiser state + activations); ``bench/bench_train.py`` measures the real
peak. It is meant to tell 6 GB from 24 GB, not to the last hundred megabytes.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# Measured anchor: SD1.5 at 512x512, batch 1, fp32, no gradient checkpointing needs about this much
# for activations and workspace beyond the weights (kohya's 9 GB total on the CPU minus ~4.2 GB of
# fp32 weights).
ACTIVATION_BYTES_SD15_512 = 4.8e9
SD15_UNET_PARAMETERS = 859_520_964


@dataclass
class TrainingPlan:
    model: dict[str, Any]
    resolution: int
    subsets: "OrderedDict[str, dict[str, Any]]"
    buckets: dict[tuple[int, int], int]
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    memory: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    settings: dict[str, Any] = field(default_factory=dict)  # optimiser, rates, network, schedule, output
    seconds_per_step: float | None = None
    blocks: list[dict[str, Any]] | None = None  # per-block dim/alpha/LR weight when block-wise settings are given

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "resolution": self.resolution, "subsets": dict(self.subsets),
            "buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.items()},
            "batches_per_epoch": self.batches_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs, "total_steps": self.total_steps, "memory_gb": self.memory,
            "device": self.device, "precision": self.precision, "settings": self.settings,
            "seconds_per_step": self.seconds_per_step, "blocks": self.blocks,
        }


def schedule(batches_per_epoch: int, config, num_processes: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total optimiser steps); max_train_steps overrides epochs."""
    per_process = math.ceil(batches_per_epoch / num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / config.gradient_accumulation_steps))
    if config.max_train_steps:
        epochs = math.ceil(config.max_train_steps / steps_per_epoch)
        return steps_per_epoch, epochs, config.max_train_steps
    return steps_per_epoch, config.epochs, steps_per_epoch * config.epochs


def estimate_memory(model: dict[str, Any], config, resolution: int, weight_bytes: int) -> dict[str, float]:
    """Rough peak memory in GB: frozen weights, the LoRA (weights, gradients, optimiser state), activations."""
    unet = model["unet"]
    weights = (unet + model["text_encoders"] + model["vae"]) * weight_bytes
    # LoRA size grows with dim; about 0.6 M parameters per unit of dim per 860 M UNet parameters (SD1.5).
    lora_parameters = config.network_dim * 0.6e6 * (unet / SD15_UNET_PARAMETERS) ** 0.8
    if config.conv_dim:
        lora_parameters += config.conv_dim * 0.4e6 * (unet / SD15_UNET_PARAMETERS) ** 0.8
    optimizer_bytes = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "dadaptation": 16, "lion": 4}.get(config.optimizer, 8)
    lora = lora_parameters * (4 + 4 + optimizer_bytes) * (1.4 if config.dora else 1.0)
    pixels = resolution * resolution / (512 * 512)
    activations = (ACTIVATION_BYTES_SD15_512 * config.batch_size * pixels * (unet / SD15_UNET_PARAMETERS) ** 0.5
                   * weight_bytes / 4)
    if config.gradient_checkpointing:
        activations *= 0.25
    gb = 1024 ** 3
    total = weights + lora + activations
    return {"weights": round(weights / gb, 4), "lora_and_optimizer": round(lora / gb, 4),
            "activations": round(activations / gb, 4), "total": round(total / gb, 4)}


# SD1.5's UNet does about 400 G multiply-adds per 512x512 image forward; a training step is about three
# forwards (forward + backward), four with gradient checkpointing. Only a rough guide.
SD15_UNET_MACS_512 = 400e9
MATMUL_EFFICIENCY = 0.4  # a UNet step reaches about this fraction of the device's large-matmul rate


def device_matmul_rate(device: str, precision: str, seconds: float = 0.3) -> float:
    """Multiply-adds per second of a large matrix product on ``device`` (a short measurement)."""
    import time

    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    n = 1024 if device == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        a @ b
        runs += 1
        if device != "cpu":
            torch.cuda.synchronize()
    return runs * n ** 3 / (time.perf_counter() - started)


def estimate_seconds_per_step(model: dict[str, Any], config, resolution: int, device: str, precision: str) -> float:
    macs = (SD15_UNET_MACS_512 * model["unet"] / SD15_UNET_PARAMETERS * (resolution / 512) ** 2 * config.batch_size
            * config.gradient_accumulation_steps)
    passes = 4 if config.gradient_checkpointing else 3
    return macs * passes / (device_matmul_rate(device, precision) * MATMUL_EFFICIENCY)


def run_settings(config, output) -> dict[str, Any]:
    """What a user checks before a long run: optimiser, rates, network, schedule, precision, output."""
    from .config import OPTIMIZER_PRESETS

    optimizer = OPTIMIZER_PRESETS.get(config.optimizer, config.optimizer)
    if config.optimizer_args:
        optimizer += "(" + ", ".join(f"{k}={v}" for k, v in config.optimizer_args.items()) + ")"
    schedule = config.lr_scheduler + (f", {config.lr_warmup_steps} warm-up steps" if config.lr_warmup_steps else "")
    if config.lr_scheduler == "cosine_with_restarts":
        schedule += f", {config.lr_scheduler_cycles} cycle(s)"
    alpha = config.network_alpha or config.network_dim
    return {"optimizer": optimizer, "unet_lr": config.effective_unet_lr,
            "text_encoder_lr": config.effective_text_encoder_lr if config.train_text_encoder else None,
            "network": f"dim {config.network_dim}, alpha {alpha:g} (scale {alpha / config.network_dim:g})"
                       + (f"; conv dim {config.conv_dim}, alpha {config.conv_alpha or config.conv_dim:g}" if config.conv_dim else "")
                       + ("; DoRA" if config.dora else ""),
            "scheduler": schedule, "save_precision": config.save_precision, "output": str(output)}


def block_rows(config, is_sdxl: bool, warn=lambda _: None) -> list[dict[str, Any]] | None:
    """Each UNet block's dim, alpha, 3x3-conv dim/alpha and LR weight, as the network will build them
    (None when no block-wise setting is given)."""
    from . import blocks
    from .lycoris import parse_network_args

    args = parse_network_args(config.values.get("network_args"), "network_args")
    if not any(args.get(name) is not None for name in blocks.BLOCK_ARGS):
        return None
    weights = blocks.lr_weights(args, is_sdxl, "network_args", warn)
    dims = blocks.block_dims(args, is_sdxl, dim=config.network_dim, alpha=config.network_alpha,
                             conv_dim=config.conv_dim, conv_alpha=config.conv_alpha, weights=weights)
    rows = []
    for index in range(blocks.block_count(is_sdxl)):
        row: dict[str, Any] = {"block": blocks.block_label(index, is_sdxl),
                               "lr_weight": weights[index] if weights is not None else 1.0}
        if dims is not None:
            dim, alpha = dims.of(index, False)
            conv_dim, conv_alpha = dims.of(index, True)
            row.update(dim=dim, alpha=dim if not alpha else alpha, conv_dim=conv_dim,
                       conv_alpha=(conv_dim if conv_alpha is None else conv_alpha) if conv_dim else None)
        rows.append(row)
    return rows


def make_plan(manifest, data, config, model: dict[str, Any], device: str, precision: str,
              num_processes: int = 1, output=None) -> TrainingPlan:
    subsets: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for image in data.images:
        entry = subsets.setdefault(image.subset, {"images": 0, "repeats": image.repeats, "is_reg": image.is_reg,
                                                  "per_epoch": 0})
        entry["images"] += 1
        entry["per_epoch"] += image.repeats
    batches = data.batches_per_epoch()
    steps_per_epoch, epochs, total = schedule(batches, config, num_processes)
    weight_bytes = 2 if precision in ("fp16", "bf16") else 4
    return TrainingPlan(
        model=model, resolution=data.resolution, subsets=subsets, buckets=data.bucket_counts(),
        batches_per_epoch=batches, steps_per_epoch=steps_per_epoch, epochs=epochs, total_steps=total,
        memory=estimate_memory(model, config, data.resolution, weight_bytes), device=device, precision=precision,
        settings=run_settings(config, output),
        seconds_per_step=estimate_seconds_per_step(model, config, data.resolution, device, precision),
        blocks=block_rows(config, bool(model.get("is_sdxl"))),
    )


def render(plan: TrainingPlan, console) -> None:
    """Print the plan as rich tables."""
    from rich.table import Table

    kind = "SDXL" if plan.model.get("is_sdxl") else "SD1.x"
    console.print(f"[bold]Base model[/bold]: {kind}, UNet {plan.model['unet'] / 1e6:.0f} M parameters"
                  f"{'' if plan.model.get('counted') else ' (standard size; weights not inspected)'}")
    console.print(f"[bold]Resolution[/bold]: {plan.resolution}, device {plan.device}, precision {plan.precision}")
    s = plan.settings
    if s:
        rates = f"UNet {s['unet_lr']:g}" + (f", text encoder {s['text_encoder_lr']:g}" if s["text_encoder_lr"] is not None else "")
        console.print(f"[bold]Optimiser[/bold]: {s['optimizer']}; learning rate {rates}; schedule {s['scheduler']}")
        console.print(f"[bold]Network[/bold]: {s['network']}; saved in {s['save_precision']}")
        console.print(f"[bold]Output[/bold]: {s['output']}")
    table = Table(title="Subsets")
    for col in ("subset", "images", "repeats", "images x repeats", "regularisation"):
        table.add_column(col, justify="right" if col not in ("subset",) else "left")
    for name, s in plan.subsets.items():
        table.add_row(name, str(s["images"]), str(s["repeats"]), str(s["per_epoch"]), "yes" if s["is_reg"] else "")
    console.print(table)
    buckets = Table(title="Buckets (images per epoch, repeats included)")
    buckets.add_column("bucket")
    buckets.add_column("images", justify="right")
    for (w, h), n in plan.buckets.items():
        buckets.add_row(f"{w}x{h}", str(n))
    console.print(buckets)
    if plan.blocks:
        table = Table(title="UNet blocks (block-wise settings)")
        for col in ("block", "dim", "alpha", "conv dim", "conv alpha", "LR weight"):
            table.add_column(col, justify="left" if col == "block" else "right")
        for row in plan.blocks:
            def cell(key):
                value = row.get(key)
                return "-" if value is None else f"{value:g}"
            table.add_row(row["block"], cell("dim"), cell("alpha"), cell("conv_dim"), cell("conv_alpha"),
                          cell("lr_weight"))
        console.print(table)
    console.print(f"[bold]Batches per epoch[/bold]: {plan.batches_per_epoch}")
    console.print(f"[bold]Steps per epoch[/bold]: {plan.steps_per_epoch}")
    console.print(f"[bold]Epochs[/bold]: {plan.epochs}")
    console.print(f"[bold]Total steps[/bold]: {plan.total_steps}")
    if plan.seconds_per_step is not None:
        total = plan.seconds_per_step * plan.total_steps
        console.print(f"[bold]Time[/bold]: about {plan.seconds_per_step:.2g} s per step on {plan.device}, "
                      f"{total / 60:.1f} min in all (from a matrix-product measurement of this device; rough)")
    m = plan.memory
    console.print(f"[bold]Estimated memory[/bold]: {m['total']:.1f} GB (weights {m['weights']:.1f}, LoRA + optimiser "
                  f"{m['lora_and_optimizer']:.2f}, activations {m['activations']:.1f}); a rough estimate")
