"""The kohya LoRA file: key names, tensors, ``ss_*`` and ``modelspec.*`` metadata, hashes.

Keys are ``<prefix>_<diffusers module path with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha`` (and ``.dora_scale`` for DoRA). Prefixes: ``lora_unet``, ``lora_te`` (SD1) or
``lora_te1`` / ``lora_te2`` (SDXL).

The UNet names are diffusers' module paths for SD1 *and* SDXL. That is exactly what kohya writes
for SD1.x; for SDXL kohya writes LDM names (``input_blocks_4_1_...``) instead, but diffusers'
``load_lora_weights``, A1111/Forge (``convert_diffusers_name_to_compvis``) and ComfyUI (its
``lora_unet_`` + diffusers-path key map) all accept the diffusers-path form for both models, so one
naming serves every loader. ``docs/trainer.md`` records this choice.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import torch

from .config import OPTIMIZER_PRESETS

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _magnitude(layer) -> torch.Tensor | None:
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and "default" in magnitude:
        return magnitude["default"].weight
    return None


def state_dict(network, save_precision: str = "fp16") -> dict[str, torch.Tensor]:
    """The network's weights under kohya key names, in the save precision."""
    dtype = SAVE_DTYPES[save_precision]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in network.layers.items():
        down = layer.lora_A["default"].weight
        up = layer.lora_B["default"].weight
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"])).to(dtype)
        magnitude = _magnitude(layer)
        if magnitude is not None:
            # LyCORIS's output-axis DoRA layout: one magnitude per output channel, shaped (out, 1[, 1, 1]).
            shape = (up.shape[0],) + (1,) * (up.dim() - 1)
            tensors[f"{name}.dora_scale"] = magnitude.detach().reshape(shape).to("cpu", dtype).contiguous()
    return tensors


def load_state_dict(network, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put kohya-named weights back into the network (to resume). Every key must match a layer."""
    from lorakit.plugin_sdk import LorakitError

    layers = network.layers
    seen = set()
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        layer = layers.get(name)
        if layer is None:
            raise LorakitError(f"{where}: {key} belongs to no layer of this network (other base model or settings?)")
        if kind == "lora_down.weight":
            target = layer.lora_A["default"].weight
        elif kind == "lora_up.weight":
            target = layer.lora_B["default"].weight
        elif kind == "dora_scale" and _magnitude(layer) is not None:
            target = _magnitude(layer)
        elif kind == "alpha":
            if abs(float(value) - float(layer.lora_alpha["default"])) > 1e-3:
                raise LorakitError(f"{where}: {key} = {float(value)} but this run uses alpha {layer.lora_alpha['default']}")
            continue
        else:
            raise LorakitError(f"{where}: unexpected key {key}")
        if kind == "dora_scale" and target.numel() == value.numel():
            value = value.reshape(target.shape)
        if tuple(target.shape) != tuple(value.shape):
            raise LorakitError(f"{where}: {key} has shape {tuple(value.shape)}, the network expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        seen.add(name)
    if seen != set(layers):
        missing = sorted(set(layers) - seen)
        raise LorakitError(f"{where}: no weights for {missing[0]} (and {len(missing) - 1} more)")


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as kohya computes ``sshs_model_hash`` (the file minus its header)."""
    from safetensors.torch import save

    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def metadata(*, config, data, manifest, base, network, epoch: int, step: int, max_steps: int,
             started_at: float, session_id: str, output_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The ``ss_*`` (kohya / Civitai) and ``modelspec.*`` (Stability's model spec) metadata, all strings."""
    triggers: list[str] = []
    for subset in manifest.subsets.values():
        for trigger in subset.triggers:
            if trigger not in triggers:
                triggers.append(trigger)
    comment = config.training_comment if config.training_comment is not None else (
        f"triggers: {', '.join(triggers)}" if triggers else "")
    dataset_dirs: dict[str, dict[str, int]] = {}
    for image in data.images:
        folder = f"{image.repeats}_{image.subset}"
        entry = dataset_dirs.setdefault(folder, {"n_repeats": image.repeats, "img_count": 0})
        entry["img_count"] += 1
    train_count = len(data.train_images)
    reg_count = len(data.reg_images)
    bucket_counts = data.bucket_counts()
    bucket_info = {
        "buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(bucket_counts.items())},
        "mean_img_ar_error": data.mean_aspect_error(),
    }
    network_args: dict[str, str] = {}
    if config.conv_dim:
        network_args.update(conv_dim=str(config.conv_dim), conv_alpha=str(config.conv_alpha))
    if config.dora:
        network_args.update(dora_wd="True", wd_on_output="True")
    now = _dt.datetime.now(_dt.timezone.utc)
    resolution = data.resolution
    model_hash = tensors_hash(tensors)
    optimizer_args = dict(config.optimizer_args)
    ss = {
        "ss_session_id": session_id,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now.timestamp()),
        "ss_output_name": output_name,
        "ss_sd_model_name": Path(str(base.source)).name,
        "ss_base_model_version": "sdxl_base_v1-0" if base.is_sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_v_parameterization": str(base.v_prediction),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": str(config.network_alpha),
        "ss_network_args": json.dumps(network_args) if network_args else "null",
        "ss_network_dropout": "None",
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.effective_unet_lr) if config.train_unet else "None",
        "ss_text_encoder_lr": str(config.effective_text_encoder_lr) if config.train_text_encoder else "None",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": OPTIMIZER_PRESETS.get(config.optimizer, config.optimizer)
        + (f"({','.join(f'{k}={v}' for k, v in optimizer_args.items())})" if optimizer_args else ""),
        "ss_num_train_images": str(train_count),
        "ss_num_reg_images": str(reg_count),
        "ss_num_batches_per_epoch": str(data.batches_per_epoch()),
        "ss_num_epochs": str(config.epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_max_train_steps": str(max_steps),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": "False",
        "ss_save_precision": config.save_precision,
        "ss_seed": str(config.seed),
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_noise_offset": str(config.noise_offset),
        "ss_ip_noise_gamma": str(config.ip_noise_gamma),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_masked_loss": str(config.masked_loss),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso or 2 * resolution),
        "ss_bucket_no_upscale": "False",
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(config.caption_tag_dropout_rate),
        "ss_flip_aug": str(config.flip_aug),
        "ss_cache_latents": str(config.cache_latents != "none"),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(manifest.tag_frequency()),
        "ss_training_comment": comment,
        "sshs_model_hash": model_hash,
        "lorakit_version": _version(),
    }
    modelspec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if base.is_sdxl else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base.is_sdxl else "diffusers",
        "modelspec.title": output_name if epoch == config.epochs else f"{output_name} epoch {epoch}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if base.v_prediction else "epsilon",
        "modelspec.hash_sha256": "0x" + model_hash,
        "modelspec.trigger_phrase": ", ".join(triggers),
        "modelspec.description": comment or f"LoRA trained by lorakit on {train_count} images",
        "modelspec.tags": ", ".join(_top_tags(manifest, 20)),
    }
    return {**ss, **modelspec}


def _top_tags(manifest, count: int) -> list[str]:
    totals: dict[str, int] = {}
    for folder in manifest.tag_frequency().values():
        for tag, n in folder.items():
            totals[tag] = totals.get(tag, 0) + n
    return [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


def _version() -> str:
    try:
        from lorakit import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def new_session_id() -> str:
    return str(uuid.uuid4().int % (2**31))


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write the LoRA atomically (a crash never leaves a half-written file under the final name)."""
    from safetensors.torch import save_file

    from lorakit.plugin_sdk import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta
