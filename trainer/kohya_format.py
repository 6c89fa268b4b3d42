"""The kohya LoRA file: key names, tensors, ``ss_*`` and ``modelspec.*`` metadata, hashes.

Keys are ``<prefix>_<module path with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (and ``.dora_scale`` for DoRA). Prefixes: ``lora_unet``, ``lora_te`` (SD1) or
``lora_te1`` / ``lora_te2`` (SDXL). The module path is the one kohya's own models have:

- SD1: kohya trains SD1 on a diffusers-layout UNet, so the path is diffusers' module path
  (``lora_unet_down_blocks_0_attentions_0_...``).
- SDXL: kohya trains SDXL on its own UNet with the original (Stability / LDM) layout, so the path
  is the LDM one (``lora_unet_input_blocks_4_1_...``, ``middle_block_1``, ``output_blocks_2_2_conv``).
  kohya's resume (``--network_weights``) and ``sdxl_merge_lora.py`` read only these names, A1111
  maps them directly onto its SGM modules, diffusers and ComfyUI convert them.

``ldm_unet_path`` converts a diffusers UNet module path to the LDM one from the UNet's config (the
same numbering as kohya's ``make_unet_conversion_map``); files written before lorakit used it
(diffusers paths for SDXL too) are still read, see ``legacy_names``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from pathlib import Path

import torch

from .config import OPTIMIZER_PRESETS

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----- key names ---------------------------------------------------------------------------------
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_path(path: str, config) -> str:
    """A diffusers UNet module path -> the original (LDM/SGM) module path, for this UNet's config.

    The LDM UNet numbers the down path as one flat list (``input_blocks.0`` is ``conv_in``; each
    level has ``layers_per_block`` entries of resnet [+ attention], then a downsampler except on the
    last level), the middle block as resnet / attention / resnet, and the up path with
    ``layers_per_block + 1`` entries per level, the upsampler last in a level's last entry.
    """
    per_block = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    up_types = config["up_block_types"] if isinstance(config, dict) else config.up_block_types
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block must be one number for LDM names, got {per_block!r}")
    for diffusers_name, ldm_name in _TOP_LEVEL.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return ldm_name + path[len(diffusers_name):]
    parts = path.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_PARTS.get(rest[0], rest[0])] + rest[1:])

    if parts[0] == "down_blocks" and len(parts) > 4:
        level, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            index = 1 + level * (per_block + 1) + per_block
            return f"input_blocks.{index}.0." + ".".join(["op"] + rest[1:] if rest[0] == "conv" else rest)
        index = 1 + level * (per_block + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{index}.1." + ".".join(rest)
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, layer, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{resnet(rest)}"
        if kind == "attentions":
            return "middle_block.1." + ".".join(rest)
    if parts[0] == "up_blocks" and len(parts) > 4:
        level, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            slot = 2 if "CrossAttn" in up_types[level] else 1
            return f"output_blocks.{level * (per_block + 1) + per_block}.{slot}." + ".".join(rest)
        index = level * (per_block + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{index}.1." + ".".join(rest)
    raise ValueError(f"no LDM name for UNet module {path}")


def module_key(prefix: str, module_path: str) -> str:
    """``lora_unet_input_blocks_4_1_..._to_q``: the prefix, then the module path with '.' -> '_'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def legacy_names(network) -> dict[str, str]:
    """Older spellings of this network's keys -> today's: SDXL UNet keys with diffusers paths.

    lorakit wrote those before it used kohya's SDXL names; ``load_state_dict`` accepts both.
    """
    aliases: dict[str, str] = {}
    for part in getattr(network, "parts", []):
        for old, new in getattr(part, "legacy_names", {}).items():
            aliases[old] = new
    return aliases


def dora_scale_shape(axis: str, weight_shape) -> tuple[int, ...]:
    """The file shape of a DoRA magnitude: ``(1, in[, 1, 1])`` on the input axis, ``(out, 1[, 1, 1])`` on the output."""
    ones = (1,) * (len(weight_shape) - 2)
    return (1, weight_shape[1], *ones) if axis == "input" else (weight_shape[0], 1, *ones)


def state_dict(network, save_precision: str = "fp16") -> dict[str, torch.Tensor]:
    """The network's weights under kohya key names, in the save precision."""
    from .network import dora_magnitude

    dtype = SAVE_DTYPES[save_precision]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in network.layers.items():
        down = layer.lora_A["default"].weight
        up = layer.lora_B["default"].weight
        tensors[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"])).to(dtype)
        dora = dora_magnitude(layer)
        if dora is not None:
            axis, magnitude = dora
            shape = dora_scale_shape(axis, layer.get_base_layer().weight.shape)
            tensors[f"{name}.dora_scale"] = magnitude.detach().reshape(shape).to("cpu", dtype).contiguous()
    return tensors


def load_state_dict(network, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put kohya-named weights back into the network (to resume). Every key must match a layer.

    Older spellings of the names (``legacy_names``) are accepted.
    """
    from lorakit.plugin_sdk import LorakitError

    from .network import dora_magnitude

    layers = network.layers
    aliases = legacy_names(network)
    seen = set()
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        name = aliases.get(name, name)
        layer = layers.get(name)
        if layer is None:
            raise LorakitError(f"{where}: {key} belongs to no layer of this network (other base model or settings?)")
        dora = dora_magnitude(layer)
        if kind == "lora_down.weight":
            target = layer.lora_A["default"].weight
        elif kind == "lora_up.weight":
            target = layer.lora_B["default"].weight
        elif kind == "dora_scale" and dora is not None:
            axis, target = dora
            expected = dora_scale_shape(axis, layer.get_base_layer().weight.shape)
            if tuple(value.shape) != expected:
                raise LorakitError(f"{where}: {key} has shape {tuple(value.shape)}; this run trains DoRA on the "
                                   f"{axis} axis, shape {expected} (set dora_axis to match the file)")
            value = value.reshape(target.shape)
        elif kind == "alpha":
            if abs(float(value) - float(layer.lora_alpha["default"])) > 1e-3:
                raise LorakitError(f"{where}: {key} = {float(value)} but this run uses alpha {layer.lora_alpha['default']}")
            continue
        else:
            raise LorakitError(f"{where}: unexpected key {key}")
        if tuple(target.shape) != tuple(value.shape):
            raise LorakitError(f"{where}: {key} has shape {tuple(value.shape)}, the network expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        seen.add(name)
    if seen != set(layers):
        missing = sorted(set(layers) - seen)
        raise LorakitError(f"{where}: no weights for {missing[0]} (and {len(missing) - 1} more)")


def merged_weight(base_weight: torch.Tensor, tensors: dict[str, torch.Tensor], name: str,
                  multiplier: float = 1.0) -> torch.Tensor:
    """The layer weight with the file's LoRA ``name`` merged in, as lorakit trains it (fp32).

    LoRA: ``W + m * (alpha / dim) * up @ down``. DoRA: ``V = W + (alpha / dim) * up @ down``, then
    ``W' = dora_scale * V / ||V||`` with the norm over the axis the ``dora_scale`` shape names,
    and a multiplier below 1 interpolates between ``W`` and ``W'``.
    """
    base = base_weight.float()
    down = tensors[f"{name}.lora_down.weight"].float()
    up = tensors[f"{name}.lora_up.weight"].float()
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(base.shape)
    delta = delta * alpha / down.shape[0]
    scale = tensors.get(f"{name}.dora_scale")
    if scale is None:
        return base + multiplier * delta
    merged = base + delta
    scale = scale.float()
    if scale.shape[0] == 1 and scale.dim() >= 2 and scale.shape[1] == base.shape[1]:
        norm = merged.transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1)
        decomposed = merged * (scale.reshape(-1) / norm).reshape(dora_scale_shape("input", base.shape))
    else:
        norm = merged.reshape(base.shape[0], -1).norm(dim=1)
        decomposed = merged * (scale.reshape(-1) / norm).reshape(dora_scale_shape("output", base.shape))
    return base + multiplier * (decomposed - base)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as kohya computes ``sshs_model_hash`` (the file minus its header)."""
    from safetensors.torch import save

    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def model_hash(path: Path) -> str:
    """kohya's ``model_hash`` (A1111's old hash): sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: Path) -> str:
    """kohya's ``calculate_sha256`` (A1111's new hash): sha256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """``sshs_legacy_hash`` as kohya's ``precalculate_safetensors_hashes`` computes it: the old A1111
    hash (``model_hash``) of the file serialised with only the ``ss_*`` metadata."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def _model_name_and_hashes(spec, prefix: str) -> dict[str, str]:
    """``ss_sd_model_name`` + ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` (or the VAE's): the file
    name and kohya's two hashes for a local file; a hub id is named as given, without hashes. kohya
    writes ``IsADirectory`` as the hash of a diffusers folder; lorakit leaves the hashes out instead."""
    path = Path(str(spec)).expanduser()
    out = {f"ss_{prefix}_name": path.name if path.exists() else str(spec)}
    if path.is_file():
        hash_key = "ss_sd_model_hash" if prefix == "sd_model" else "ss_vae_hash"
        new_key = "ss_new_sd_model_hash" if prefix == "sd_model" else "ss_new_vae_hash"
        out[hash_key] = model_hash(path)
        out[new_key] = file_sha256(path)
    return out


def metadata(*, config, data, manifest, base, network, epoch: int, step: int, max_steps: int,
             started_at: float, session_id: str, output_name: str, tensors: dict[str, torch.Tensor],
             num_epochs: int | None = None, mixed_precision: str | None = None,
             num_processes: int = 1) -> dict[str, str]:
    """The ``ss_*`` (kohya / Civitai) and ``modelspec.*`` (Stability's model spec) metadata, all strings.

    The ``ss_*`` keys have kohya train_network.py's names, formats and meanings: image counts
    include repeats, ``ss_dataset_dirs`` / ``ss_reg_dataset_dirs`` / ``ss_tag_frequency`` are keyed
    by the ``N_name`` folders ``lorakit export kohya`` writes, ``ss_num_epochs`` is the number of
    epochs the run has (``max_train_steps`` can end it early), ``ss_mixed_precision`` the resolved
    precision (``no`` / ``fp16`` / ``bf16``).
    """
    from lorakit.manifest import split_caption

    triggers: list[str] = []
    for subset in manifest.subsets.values():
        for trigger in subset.triggers:
            if trigger not in triggers:
                triggers.append(trigger)
    comment = config.training_comment if config.training_comment is not None else (
        f"triggers: {', '.join(triggers)}" if triggers else "")
    subsets = {}
    for image in data.images:
        subset = manifest.subsets.get(image.subset)
        folder = subset.kohya_folder if subset is not None else f"{image.repeats}_{image.subset}"
        entry = subsets.setdefault(folder, {"image": image, "img_count": 0, "tags": {}, "subset": subset})
        entry["img_count"] += 1
        for tag in split_caption(image.caption):
            entry["tags"][tag] = entry["tags"].get(tag, 0) + 1
    dataset_dirs = {f: {"n_repeats": e["image"].repeats, "img_count": e["img_count"]}
                    for f, e in subsets.items() if not e["image"].is_reg}
    reg_dataset_dirs = {f: {"n_repeats": e["image"].repeats, "img_count": e["img_count"]}
                        for f, e in subsets.items() if e["image"].is_reg}
    tag_frequency = {f: e["tags"] for f, e in subsets.items()}
    train_count = sum(i.repeats for i in data.train_images)
    reg_count = sum(i.repeats for i in data.reg_images)
    bucket_counts = data.bucket_counts()
    bucket_info = {
        "buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(bucket_counts.items())},
        "mean_img_ar_error": data.mean_aspect_error(),
    }
    resolution = data.resolution
    from lorakit.buckets import bucket_bounds

    try:  # the bounds the trainer used (kohya's defaults widened to the resolution)
        min_bucket, max_bucket = bucket_bounds(resolution, config.min_bucket_reso, config.max_bucket_reso,
                                               config.bucket_reso_steps)
    except ValueError:
        min_bucket, max_bucket = config.min_bucket_reso, config.max_bucket_reso
    datasets = [{
        "is_dreambooth": True, "batch_size_per_device": config.batch_size, "num_train_images": train_count,
        "num_reg_images": reg_count, "resolution": [resolution, resolution], "enable_bucket": config.enable_bucket,
        "min_bucket_reso": min_bucket, "max_bucket_reso": max_bucket, "tag_frequency": tag_frequency,
        "bucket_info": bucket_info,
        "subsets": [{
            "img_count": e["img_count"], "num_repeats": e["image"].repeats, "color_aug": False,
            "flip_aug": bool(e["image"].flip_aug),
            "random_crop": bool(e["image"].random_crop), "shuffle_caption": bool(e["image"].shuffle_caption),
            "keep_tokens": e["image"].keep_tokens, "keep_tokens_separator": e["image"].keep_tokens_separator or "",
            "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None,
            "image_dir": folder, "class_tokens": e["subset"].class_tokens if e["subset"] is not None else None,
            "is_reg": e["image"].is_reg,
        } for folder, e in subsets.items()],
    }]
    network_args: dict[str, str] = {}
    if config.conv_dim:
        network_args.update(conv_dim=str(config.conv_dim), conv_alpha=str(config.conv_alpha))
    if config.values.get("network_type", "lora") == "lora":
        from .lycoris import parse_network_args

        network_args.update(parse_network_args(config.network_args, "network_args"))  # block-wise, as given
    if config.dora:
        axis = getattr(config, "dora_axis", "input")
        network_args.update(dora_wd="True", wd_on_output=str(axis == "output"))
    now = _dt.datetime.now(_dt.timezone.utc)
    model_hash_ = tensors_hash(tensors)
    optimizer_args = dict(config.optimizer_args)
    ss = {
        "ss_session_id": session_id,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now.timestamp()),
        "ss_output_name": output_name,
        **_model_name_and_hashes(base.source, "sd_model"),
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
        "ss_num_epochs": str(num_epochs if num_epochs is not None else config.epochs),
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_max_train_steps": str(max_steps),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_total_batch_size": str(config.batch_size * num_processes * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": mixed_precision or config.mixed_precision,
        "ss_full_fp16": "False",
        "ss_save_precision": config.save_precision,
        "ss_seed": str(config.seed),
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": "None" if config.max_token_length == 75 else str(config.max_token_length),  # kohya: None = 75
        "ss_cache_latents": str(config.cache_latents != "none"),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_noise_offset": str(config.noise_offset),
        "ss_ip_noise_gamma": str(config.ip_noise_gamma),
        "ss_zero_terminal_snr": str(config.zero_terminal_snr),
        "ss_multires_noise_iterations": str(config.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(config.multires_noise_discount),
        "ss_adaptive_noise_scale": str(config.adaptive_noise_scale),
        "ss_noise_offset_random_strength": str(config.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(config.ip_noise_gamma_random_strength),
        "ss_debiased_estimation": str(config.debiased_estimation_loss),
        "ss_scale_weight_norms": str(config.scale_weight_norms),
        "ss_caption_dropout_every_n_epochs": str(config.caption_dropout_every_n_epochs),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_masked_loss": str(config.masked_loss),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(min_bucket),
        "ss_max_bucket_reso": str(max_bucket),
        "ss_bucket_no_upscale": str(bool(config.enable_bucket and config.bucket_no_upscale)),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(config.caption_tag_dropout_rate),
        "ss_flip_aug": str(config.flip_aug),
        "ss_color_aug": "False",
        "ss_random_crop": str(config.random_crop),
        "ss_datasets": json.dumps(datasets),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_comment": comment,
    }
    if config.vae:
        ss.update(_model_name_and_hashes(config.vae, "vae"))
    ss["sshs_model_hash"] = model_hash_
    ss["sshs_legacy_hash"] = legacy_hash(tensors, ss)
    ss["lorakit_version"] = _version()
    modelspec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if base.is_sdxl else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base.is_sdxl else "diffusers",
        "modelspec.title": output_name if epoch == (num_epochs or config.epochs) else f"{output_name} epoch {epoch}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if base.v_prediction else "epsilon",
        "modelspec.hash_sha256": "0x" + model_hash_,
        "modelspec.trigger_phrase": ", ".join(triggers),
        "modelspec.description": comment or f"LoRA trained by lorakit on {len(data.train_images)} images",
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


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file from its header alone; {} when it is not readable."""
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta
