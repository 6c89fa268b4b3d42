"""The trainer's settings: one schema for the command line, ``pipeline.yaml``'s ``train:`` section and
config files (TOML, YAML or JSON). Everything is validated before any model loads.

Each setting is a ``Setting`` (name, type, default, help, allowed choices, bounds); ``TrainConfig``
is the validated result. ``lorakit train --show-config`` prints the defaults in TOML.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import LorakitError


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # str, int, float, bool, list (of str), dict, "path"
    default: Any
    help: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    is_path: bool = False
    group: str = "training"


S = Setting
SETTINGS: list[Setting] = [
    # model
    S("base_model", str, None, "base model: single-file .safetensors, diffusers folder or hub id", nullable=True,
      is_path=True, group="model"),
    S("base_config", str, None, "for a single-file checkpoint offline: a diffusers folder/hub id with its configs",
      nullable=True, is_path=True, group="model"),
    S("vae", str, None, "external VAE (.safetensors, folder or hub id) instead of the checkpoint's", nullable=True,
      is_path=True, group="model"),
    S("v_prediction", bool, None, "train a v-prediction model (default: what the model says)", nullable=True,
      group="model"),
    S("device", str, "auto", "auto (CUDA when present), cpu or cuda[:N]", group="model"),
    S("model_type", str, None, "sd15 or sdxl: what the base model is, for --dry-run without its weights",
      choices=("sd15", "sdxl"), nullable=True, group="model"),
    # network
    S("network_dim", int, 32, "LoRA rank (dim)", min=1, max=1024, group="network"),
    S("network_alpha", float, 16.0, "LoRA alpha; the LoRA is scaled by alpha / dim", min=0, group="network"),
    S("conv_dim", int, 0, "LoCon: rank of the 3x3 conv layers (0 = plain LoRA)", min=0, max=1024, group="network"),
    S("conv_alpha", float, 1.0, "LoCon: alpha of the conv layers", min=0, group="network"),
    S("network_dropout", float, 0.0, "dropout on each LoRA's down output (kohya; 0.1 is common)", min=0, max=1,
      group="network"),
    S("rank_dropout", float, 0.0, "chance of dropping each rank per sample (kohya's network_args)", min=0, max=0.99,
      group="network"),
    S("module_dropout", float, 0.0, "chance of skipping a whole LoRA layer per step (kohya's network_args)", min=0,
      max=1, group="network"),
    S("dora", bool, False, "DoRA: weight-decomposed LoRA (about 40% more memory)", group="network"),
    S("dora_axis", str, "input", "DoRA magnitude per input channel (A1111, Forge, ComfyUI read it) or per "
      "output channel (LyCORIS)", choices=("input", "output"), group="network"),
    S("network_type", str, "lora", "lora, or a LyCORIS type (locon, loha, lokr, ia3, dylora, diag_oft); a type's guide "
      "recipe fills the dims, alphas and LR left at their defaults", choices=("lora", "locon", "loha", "lokr", "ia3",
                                                                              "dylora", "diag_oft"), group="network"),
    S("network_module", str, None, "kohya spelling: networks.lora, or lycoris.kohya with network_args algo=...",
      nullable=True, group="network"),
    S("network_args", list, [], "kohya/LyCORIS network arguments as key=value (algo=loha, preset=attn-mlp, "
      "block_size=4...); plain LoRA: kohya's block-wise down_lr_weight, mid_lr_weight, up_lr_weight, "
      "block_lr_zero_threshold, block_dims, block_alphas, conv_block_dims, conv_block_alphas", group="network"),
    S("train_unet", bool, True, "train LoRA on the UNet", group="network"),
    S("train_text_encoder", bool, True, "train LoRA on the text encoder(s)", group="network"),
    # optimisation
    S("learning_rate", float, 1e-4, "base learning rate (default 1.0 with an adaptive optimiser: Prodigy)", min=0,
      group="optimiser"),
    S("unet_lr", float, None, "UNet learning rate (default: learning_rate)", min=0, nullable=True, group="optimiser"),
    S("text_encoder_lr", float, None, "text encoder learning rate (default: learning_rate)", min=0, nullable=True,
      group="optimiser"),
    S("text_encoder_2_lr", float, None, "SDXL: the second text encoder's rate (default: text_encoder_lr)", min=0,
      nullable=True, group="optimiser"),
    S("loraplus_lr_ratio", float, None, "LoRA+: the up matrices train at this x the rate (16 is common)", min=0,
      nullable=True, group="optimiser"),
    S("loraplus_unet_lr_ratio", float, None, "LoRA+ ratio for the UNet only (default: loraplus_lr_ratio)", min=0,
      nullable=True, group="optimiser"),
    S("loraplus_text_encoder_lr_ratio", float, None, "LoRA+ ratio for the text encoders (default: loraplus_lr_ratio)",
      min=0, nullable=True, group="optimiser"),
    S("optimizer", str, "adamw", "adamw, adamw8bit (CUDA), prodigy, dadaptation, lion, came, or any optimiser "
      "class by dotted path (torch.optim.SGD)", group="optimiser"),
    S("optimizer_args", dict, {}, "extra optimiser arguments; prodigy starts from the guide's preset", group="optimiser"),
    S("weight_decay", float, 0.01, "weight decay", min=0, group="optimiser"),
    S("lr_scheduler", str, "cosine_with_restarts", "constant, linear, cosine or cosine_with_restarts",
      choices=("constant", "linear", "cosine", "cosine_with_restarts"), group="optimiser"),
    S("lr_scheduler_cycles", int, 1, "cosine_with_restarts: number of cycles (restarts + 1)", min=1, group="optimiser"),
    S("lr_warmup_steps", int, 0, "linear warm-up steps", min=0, group="optimiser"),
    S("scale_weight_norms", float, None, "scale down any layer whose change has a norm above this (1 is common; "
      "not with Prodigy)", min=0, nullable=True, group="optimiser"),
    S("max_grad_norm", float, 1.0, "gradient clipping norm (0 = off)", min=0, group="optimiser"),
    S("gradient_accumulation_steps", int, 1, "batches per optimiser step", min=1, group="optimiser"),
    # schedule
    S("epochs", int, 8, "training epochs", min=1, group="training"),
    S("max_train_steps", int, None, "stop after this many steps (overrides epochs)", min=1, nullable=True,
      group="training"),
    S("batch_size", int, 1, "images per batch (batches stay within one bucket)", min=1, group="training"),
    S("seed", int, 42, "random seed (noise, shuffles, dropout)", min=0, group="training"),
    S("mixed_precision", str, "auto", "auto (bf16/fp16 on CUDA, fp32 on CPU), no, fp16 or bf16",
      choices=("auto", "no", "fp16", "bf16"), group="training"),
    S("gradient_checkpointing", bool, False, "trade speed (30-100% slower) for memory", group="training"),
    S("max_token_length", int, 75, "caption tokens read by the text encoder: 75, 150 or 225 (chunks of 75, as kohya)",
      min=75, max=225, group="training"),
    S("clip_skip", int, 1, "use the output of the Nth-from-last text encoder layer (2 for anime)", min=1, max=12,
      group="training"),
    # loss
    S("min_snr_gamma", float, 0.0, "min-SNR weighting gamma (5 is common; 0 = off)", min=0, group="loss"),
    S("noise_offset", float, 0.0, "noise offset (0.1 is common; 0 = off)", min=0, group="loss"),
    S("ip_noise_gamma", float, 0.0, "input perturbation noise gamma (0.1 is common; 0 = off)", min=0, group="loss"),
    S("noise_offset_random_strength", bool, False, "noise offset strength drawn uniformly in 0..noise_offset per step",
      group="loss"),
    S("adaptive_noise_scale", float, None, "add |mean of each latent channel| x this to the noise offset",
      nullable=True, group="loss"),
    S("multires_noise_iterations", int, 0, "multires (pyramid) noise iterations (6-10 is common; 0 = off)", min=0,
      group="loss"),
    S("multires_noise_discount", float, 0.3, "multires noise: weight of each coarser level", min=0, max=1,
      group="loss"),
    S("ip_noise_gamma_random_strength", bool, False, "ip noise strength drawn uniformly in 0..ip_noise_gamma per step",
      group="loss"),
    S("zero_terminal_snr", bool, False, "rescale the noise schedule so the last timestep is pure noise (use with v-pred)",
      group="loss"),
    S("min_timestep", int, None, "smallest training timestep (default 0)", min=0, max=1000, nullable=True,
      group="loss"),
    S("max_timestep", int, None, "training timesteps are below this (default 1000)", min=0, max=1000, nullable=True,
      group="loss"),
    S("debiased_estimation_loss", bool, False, "weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-pred)", group="loss"),
    S("scale_v_pred_loss_like_noise_pred", bool, False, "v-pred: weight the loss by SNR/(SNR+1), like epsilon's",
      group="loss"),
    S("v_pred_like_loss", float, 0.0, "add this much of a v-prediction-like loss (0 = off)", min=0, group="loss"),
    S("loss_type", str, "l2", "l2, huber or smooth_l1", choices=("l2", "huber", "smooth_l1"), group="loss"),
    S("huber_schedule", str, "snr", "huber/smooth_l1: snr, exponential or constant",
      choices=("snr", "exponential", "constant"), group="loss"),
    S("huber_c", float, 0.1, "huber/smooth_l1: the c parameter", min=0, max=1, group="loss"),
    S("prior_loss_weight", float, 1.0, "loss weight of regularisation images", min=0, group="loss"),
    S("masked_loss", bool, False, "weight the loss by the dataset's masks (white = train, black = ignore)",
      group="loss"),
    # data
    S("resolution", int, None, "training resolution (default: the dataset's, else 512 SD1 / 1024 SDXL)", min=64,
      max=4096, nullable=True, group="data"),
    S("enable_bucket", bool, True, "aspect-ratio bucketing (kohya's buckets)", group="data"),
    S("min_bucket_reso", int, None, "smallest bucket side (default: kohya's 256, or the resolution when smaller)",
      min=8, nullable=True, group="data"),
    S("max_bucket_reso", int, None, "largest bucket side (default: kohya's 1024, or the resolution when larger)",
      min=8, nullable=True, group="data"),
    S("bucket_reso_steps", int, 64, "bucket sides are multiples of this", min=8, group="data"),
    S("bucket_no_upscale", bool, False, "never upscale: each image's bucket is its own size (scaled down to the "
      "resolution's area when larger) rounded down to bucket_reso_steps; min/max_bucket_reso unused (kohya)",
      group="data"),
    S("random_crop", bool, False, "crop each sample at a random place instead of the centre when fitting it to its "
      "bucket (kohya); needs cache_latents none, which it then defaults to", group="data"),
    S("shuffle_caption", bool, False, "shuffle the tags of each caption (keep tokens stay first)", group="data"),
    S("keep_tokens", int, 0, "leading tags never shuffled or dropped (a subset's own setting wins)", min=0,
      group="data"),
    S("caption_dropout_rate", float, 0.0, "chance of training an image with an empty caption", min=0, max=1,
      group="data"),
    S("caption_tag_dropout_rate", float, 0.0, "chance of dropping each (not kept) tag", min=0, max=1, group="data"),
    S("caption_dropout_every_n_epochs", int, 0, "train every Nth epoch (counted from 1) with empty captions (0 = off)",
      min=0, group="data"),
    S("caption_prefix", str, None, "text put before every caption (joined with a space, as kohya does)",
      nullable=True, group="data"),
    S("caption_suffix", str, None, "text put after every caption (joined with a space)", nullable=True,
      group="data"),
    S("token_warmup_min", int, 1, "token warm-up: shuffled tags used at step 0 (kept tags always are)", min=1,
      group="data"),
    S("token_warmup_step", int, 0, "token warm-up: steps until all tags are used (0 = off)", min=0, group="data"),
    S("flip_aug", bool, False, "random horizontal flips (only for symmetric subjects)", group="data"),
    S("cache_latents", str, "memory", "memory, disk or none", choices=("memory", "disk", "none"), group="data"),
    S("cache_dir", str, None, "disk latent cache folder (default: <dataset>/.lorakit-cache/latents)",
      nullable=True, is_path=True, group="data"),
    # output and running
    S("output", str, None, "the LoRA file to write (default: <dataset>.safetensors next to the dataset)",
      nullable=True, is_path=True, group="output"),
    S("save_precision", str, "fp16", "fp16, bf16 or fp32 weights in the file", choices=("fp16", "bf16", "fp32"),
      group="output"),
    S("save_every_n_epochs", int, None, "also save name-00000N.safetensors every N epochs", min=1, nullable=True,
      group="output"),
    S("save_last_n_epochs", int, None, "keep only the last N epoch files", min=1, nullable=True, group="output"),
    S("save_state", bool, False, "save the training state (optimiser, step, epoch) with each save, to resume",
      group="output"),
    S("resume", str, None, "resume from a saved state folder (name-00000N-state)", nullable=True, is_path=True,
      group="output"),
    S("sample_every_n_epochs", int, None, "generate sample images every N epochs", min=1, nullable=True,
      group="output"),
    S("sample_prompts", list, [], "prompts for sample images", group="output"),
    S("sample_steps", int, 20, "sampling steps for sample images", min=1, group="output"),
    S("compare_epochs", bool, False, "at the end, render an epochs x weights grid of the epoch saves with "
      "sample_prompts (lorakit compare): <output>-compare.png and .html", group="output"),
    S("compare_weights", str, "0.4,0.7,1.0", "compare_epochs: the LoRA weights of the grid's columns", group="output"),
    S("logging_dir", str, None, "write TensorBoard logs here", nullable=True, is_path=True, group="output"),
    S("training_comment", str, None, "stored in the file (default: the triggers)", nullable=True, group="output"),
]
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}

# The optimisers known by a short name (kohya's optimizer_type spellings, lower case) and their classes;
# any other class is given by dotted path. lion, came and dadaptation are in the `optimizers` extra.
OPTIMIZER_PRESETS = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "prodigy": "prodigyopt.Prodigy",
    "dadaptation": "dadaptation.DAdaptAdam",
    "lion": "lion_pytorch.Lion",
    "came": "came_pytorch.CAME",
}
# Optimisers that find their own step size: the learning rate is a multiplier, 1.0 by default.
ADAPTIVE_OPTIMIZERS = {"prodigy", "dadaptation"}


def is_adaptive(optimizer: str) -> bool:
    """kohya's test: D-Adaptation and Prodigy classes (by preset or by dotted path) adapt the step size."""
    name = optimizer.rsplit(".", 1)[-1].lower()
    return optimizer in ADAPTIVE_OPTIMIZERS or name.startswith(("dadapt", "prodigy"))

# The guide's Prodigy arguments (seed 002): lr 1 with these.
PRODIGY_PRESET = {"weight_decay": 0.01, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True,
                  "d_coef": 2.0}


@dataclass
class TrainConfig:
    """Validated trainer settings; attribute names are the setting names."""

    values: dict[str, Any] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()  # the settings the user gave (the rest are defaults)

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def replace(self, where: str = "settings", **changes: Any) -> "TrainConfig":
        """These settings with ``changes`` applied; defaults that depend on others are worked out again."""
        return validate_settings({**{k: self.values[k] for k in self.explicit}, **changes}, where)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def non_defaults(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if v != SETTINGS_BY_NAME[k].default}

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate


def _type_name(s: Setting) -> str:
    if s.choices:
        return "one of " + ", ".join(s.choices)
    name = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list of strings", dict: "a mapping"}[s.type]
    bounds = []
    if s.min is not None:
        bounds.append(f">= {s.min:g}")
    if s.max is not None:
        bounds.append(f"<= {s.max:g}")
    if bounds:
        name += " " + " and ".join(bounds)
    if s.nullable:
        name += " (or empty)"
    return name


def _coerce(s: Setting, value: Any, where: str) -> Any:
    def bad():
        return LorakitError(f"{where}: train setting '{s.name}' = {value!r} is invalid: expected {_type_name(s)}")

    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null") and s.nullable):
        if s.nullable or s.type in (list, dict):
            return None if s.nullable else s.type()
        raise bad()
    if s.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if s.nullable and isinstance(value, str) and value.lower() == "auto":
            return None
        raise bad()
    if s.type is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad()
    elif s.type is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise bad()
        value = float(value)
    elif s.type is str:
        if not isinstance(value, (str, Path)):
            raise bad()
        value = str(value)
        if s.choices:
            value = value.lower().replace("-", "_")
            if value not in s.choices:
                raise bad()
    elif s.type is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad()
        value = list(value)
    elif s.type is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad() from None
        if not isinstance(value, dict):
            raise bad()
        value = dict(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (s.min is not None and value < s.min) or (s.max is not None and value > s.max):
            raise bad()
    return value


def validate_settings(settings: dict[str, Any] | None, where: str = "train", *, base_dir: Path | None = None) -> TrainConfig:
    """Check every key, type and bound; return a ``TrainConfig`` with the defaults filled in.

    Raises ``LorakitError`` naming the key, the value and what was expected. Relative paths are
    resolved against ``base_dir`` when given (e.g. the folder of ``pipeline.yaml``).
    """
    settings = dict(settings or {})
    if not isinstance(settings, dict):
        raise LorakitError(f"{where}: train settings must be a mapping")
    values: dict[str, Any] = {}
    for key in settings:
        name = str(key).replace("-", "_")
        if name not in SETTINGS_BY_NAME:
            import difflib

            near = difflib.get_close_matches(name, SETTINGS_BY_NAME, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else " (see `lorakit train --show-config`)"
            raise LorakitError(f"{where}: unknown train setting '{key}'{hint}")
    normalised = {str(k).replace("-", "_"): v for k, v in settings.items()}
    for s in SETTINGS:
        value = normalised.get(s.name, s.default)
        if s.name in normalised:
            value = _coerce(s, value, where)
        elif isinstance(value, (list, dict)):
            value = type(value)(value)
        if s.is_path and value is not None and base_dir is not None:
            candidate = Path(str(value)).expanduser()
            if not candidate.is_absolute() and (s.name != "base_model" and s.name != "vae" and s.name != "base_config"
                                                or (Path(base_dir) / candidate).exists()):
                value = str(Path(base_dir) / candidate)
        values[s.name] = value
    if values["output"] is not None and not str(values["output"]).endswith(".safetensors"):
        raise LorakitError(f"{where}: train setting 'output' = {values['output']!r} is invalid: expected a .safetensors file name")
    if values["save_last_n_epochs"] and not values["save_every_n_epochs"]:
        raise LorakitError(f"{where}: train setting 'save_last_n_epochs' needs 'save_every_n_epochs'")
    if values["sample_every_n_epochs"] and not values["sample_prompts"]:
        raise LorakitError(f"{where}: train setting 'sample_every_n_epochs' needs 'sample_prompts'")
    if not values["train_unet"] and not values["train_text_encoder"]:
        raise LorakitError(f"{where}: train settings: train_unet and train_text_encoder are both false; nothing to train")
    optimizer = values["optimizer"]
    if optimizer.lower() in OPTIMIZER_PRESETS:
        values["optimizer"] = optimizer = optimizer.lower()
    elif not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", optimizer):
        raise LorakitError(f"{where}: train setting 'optimizer' = {optimizer!r} is invalid: expected one of "
                           f"{', '.join(OPTIMIZER_PRESETS)}, or an optimiser class by dotted path (torch.optim.SGD)")
    if values["optimizer"] == "prodigy":
        unknown = set(values["optimizer_args"]) - {"weight_decay", "decouple", "use_bias_correction", "safeguard_warmup",
                                                    "d_coef", "betas", "beta3", "eps", "d0", "growth_rate", "fsdp_in_use",
                                                    "slice_p"}
        if unknown:
            raise LorakitError(f"{where}: train setting 'optimizer_args' has '{sorted(unknown)[0]}', which Prodigy does not take")
    if values["max_token_length"] not in (75, 150, 225):
        raise LorakitError(f"{where}: train setting 'max_token_length' = {values['max_token_length']} is invalid: "
                           "expected 75, 150 or 225")
    low, high = values["min_timestep"], values["max_timestep"]
    if low is not None and high is not None and low > high:
        raise LorakitError(f"{where}: train setting 'min_timestep' = {low} is above 'max_timestep' = {high}")
    if values["random_crop"]:
        if "cache_latents" not in normalised:
            values["cache_latents"] = "none"  # a cached latent has one crop; kohya refuses the two together
        elif values["cache_latents"] != "none":
            raise LorakitError(f"{where}: train setting 'random_crop' needs cache_latents = none (a cached latent has "
                               f"one crop; kohya refuses the two together), not {values['cache_latents']!r}")
    if is_adaptive(values["optimizer"]) and "learning_rate" not in normalised:
        values["learning_rate"] = 1.0  # an adaptive optimiser finds the step size; its LR is a multiplier
    if values["device"] not in ("auto", "cpu") and not values["device"].startswith("cuda"):
        raise LorakitError(f"{where}: train setting 'device' = {values['device']!r} is invalid: expected auto, cpu or cuda[:N]")
    from .compare import check_compare_settings
    from .lycoris import resolve_network_settings

    values = resolve_network_settings(values, where, {s.name: s.default for s in SETTINGS})
    check_compare_settings(values, where)
    return TrainConfig(values, frozenset(normalised))


def config_warnings(config: TrainConfig) -> list[str]:
    """Settings that are valid but almost certainly a mistake (kohya warns about the same)."""
    warnings = []
    if is_adaptive(config.optimizer) and config.scale_weight_norms:
        warnings.append(f"scale_weight_norms with {config.optimizer}: the guides advise against it (the optimiser "
                        "already adapts the step size)")
    if is_adaptive(config.optimizer):
        rates = {"learning_rate": config.learning_rate, "unet_lr": config.unet_lr,
                 "text_encoder_lr": config.text_encoder_lr}
        low = [f"{name} = {value:g}" for name, value in rates.items() if value is not None and value <= 0.1]
        if low:
            warnings.append(f"optimizer {config.optimizer} adapts its step size and expects a learning rate around 1.0; "
                            f"{', '.join(low)} trains almost nothing")
    if config.values.get("bucket_no_upscale") and config.values.get("enable_bucket"):
        ignored = [f"{name} = {config.values[name]}" for name in ("min_bucket_reso", "max_bucket_reso")
                   if name in config.explicit]
        if ignored:
            warnings.append(f"bucket_no_upscale makes each image's bucket from its own size: {', '.join(ignored)} "
                            "is not used (kohya ignores it too)")
    if not config.values.get("enable_bucket") and (config.values.get("bucket_no_upscale")
                                                    and "bucket_no_upscale" in config.explicit):
        warnings.append("bucket_no_upscale has no effect with enable_bucket = false (every image is cropped to "
                        "the resolution)")
    return warnings


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id (``owner/name``)."""
    parts = spec.split("/")
    hub_id = len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and "\\" not in spec
    return not hub_id or spec.endswith(".safetensors")


def check_model_paths(config: TrainConfig, where: str = "train") -> None:
    """Local base model / VAE / config paths must exist before any work starts (hub ids are left to the loader)."""
    for name in ("base_model", "vae", "base_config"):
        value = config.values.get(name)
        if value and _looks_local(str(value)) and not Path(str(value)).expanduser().exists():
            raise LorakitError(f"{where}: train setting '{name}' = {value!r}: no such file or folder")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file; a ``train`` table/section is used when present."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise LorakitError(f"{path}: config files are .toml, .yaml or .json")
    except LorakitError:
        raise
    except Exception as exc:
        raise LorakitError(f"{path}: cannot parse the config file ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: a config file holds a mapping of train settings")
    return data


def show_config(config: TrainConfig | None = None) -> str:
    """The settings as TOML, grouped, each with its help as a comment (None values commented out)."""
    values = config.values if config is not None else {s.name: s.default for s in SETTINGS}
    import tomli_w

    lines: list[str] = []
    group = None
    for s in SETTINGS:
        if s.group != group:
            group = s.group
            lines.append(f"\n# ----- {group}")
        lines.append(f"# {s.help}")
        value = values.get(s.name)
        if value is None:
            lines.append(f"# {s.name} =")
        else:
            lines.append(tomli_w.dumps({s.name: value}).strip())
    return "\n".join(lines).strip() + "\n"


def config_schema() -> dict[str, Any]:
    """A JSON Schema of the ``train:`` section (for editors and ``lorakit schema``)."""
    props = {}
    for s in SETTINGS:
        t = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}[s.type]
        prop: dict[str, Any] = {"type": [t, "null"] if s.nullable else t, "description": s.help}
        if s.choices:
            prop["enum"] = list(s.choices)
        if s.min is not None:
            prop["minimum"] = s.min
        if s.max is not None:
            prop["maximum"] = s.max
        if s.default is not None:
            prop["default"] = s.default
        props[s.name] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


def fields() -> list[str]:
    return [s.name for s in SETTINGS]


__all__ = ["Setting", "SETTINGS", "TrainConfig", "validate_settings", "load_config_file", "show_config",
           "config_schema", "config_warnings", "check_model_paths", "PRODIGY_PRESET", "ADAPTIVE_OPTIMIZERS"]
