"""Loading a Stable Diffusion base model (SD1.x or SDXL) for training or for inference.

A base model is given as one of:

- a single-file ``.safetensors`` checkpoint, what model sites distribute (SD1 vs SDXL is detected
  from the tensor names; diffusers' ``from_single_file`` converts it);
- a diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``...);
- a Hugging Face hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (taken from the hub
  cache; when offline and not cached, ``ModelNotFound`` says what to download).

Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused: unpickling can run code.
This module is the one way lorakit loads diffusion models: the trainer and the ``reg`` step
(regularisation images) both go through it.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.plugin_sdk import LorakitError, ModelNotFound

def _dtype_kw() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype``; use whichever this version understands."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except ImportError:  # pragma: no cover
        return "torch_dtype"


PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# The diffusers repos whose configs describe the standard architectures; ``from_single_file`` needs
# them (configs only, a few kB) when a single-file checkpoint is loaded without ``config=``.
DEFAULT_CONFIG_REPOS = {
    False: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    True: "stabilityai/stable-diffusion-xl-base-1.0",
}


@dataclass
class BaseModel:
    """The parts of a base model the trainer uses, plus what kind of model it is."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any  # a DDPMScheduler with the model's betas and prediction type
    is_sdxl: bool
    v_prediction: bool
    source: str = ""
    pipeline_class: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def text_encoder_2(self):
        return self.text_encoders[1] if len(self.text_encoders) > 1 else None

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def tokenizer_2(self):
        return self.tokenizers[1] if len(self.tokenizers) > 1 else None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# ----- what kind of model is it? --------------------------------------------------------------
def _refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LorakitError(
            f"{what}: {path} is a pickled checkpoint ({path.suffix}); lorakit loads only .safetensors because "
            "unpickling a file can run arbitrary code. Download the .safetensors version, or convert it once "
            "in a sandbox you trust."
        )


def single_file_kind(path: str | Path) -> dict[str, bool]:
    """Inspect a single-file checkpoint's tensor names: ``{"is_sdxl": ..., "v_prediction": ...}``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise LorakitError(f"{path}: not a readable .safetensors file ({exc})") from None
    is_sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    is_sd = is_sdxl or any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in keys)
    if not is_sd:
        sample = ", ".join(keys[:3])
        raise LorakitError(
            f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors; first keys: {sample}). "
            "Is it a LoRA or a VAE rather than a base model?"
        )
    # Some v-prediction checkpoints mark themselves with an empty ``v_pred`` tensor.
    return {"is_sdxl": is_sdxl, "v_prediction": "v_pred" in keys}


def _folder_is_sdxl(folder: Path) -> bool:
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LorakitError(f"{index}: cannot read the diffusers model index ({exc})") from None
    return "XL" in str(data.get("_class_name", "")) or "text_encoder_2" in data


def _looks_like_repo(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


# ----- loading --------------------------------------------------------------------------------
def _pipeline_class(is_sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline


def _load_vae(vae: str | os.PathLike, dtype):
    from diffusers import AutoencoderKL

    path = Path(str(vae)).expanduser()
    if path.is_file():
        _refuse_pickle(path, "VAE")
        if path.suffix.lower() != ".safetensors":
            raise LorakitError(f"VAE: {path} is not a .safetensors file")
        try:
            return AutoencoderKL.from_single_file(str(path), **{_dtype_kw(): dtype})
        except Exception as exc:
            raise _single_file_error(path, "VAE", exc) from None
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        _refuse_pickled_folder(sub, "VAE")
        try:
            return AutoencoderKL.from_pretrained(str(sub), use_safetensors=True, **{_dtype_kw(): dtype})
        except (OSError, ValueError) as exc:
            raise LorakitError(f"VAE: cannot load the folder {sub}: {str(exc).splitlines()[0][:300]}") from None
    if _looks_like_repo(str(vae)):
        try:
            return AutoencoderKL.from_pretrained(str(vae), **{_dtype_kw(): dtype})
        except Exception as exc:
            raise ModelNotFound(
                f"VAE: cannot load hub repo {vae} ({type(exc).__name__}: {exc}). Download it while online "
                f"(huggingface-cli download {vae}) or pass a local .safetensors file or folder."
            ) from None
    raise ModelNotFound(f"VAE: {vae} is neither an existing file or folder nor a hub repo id (owner/name)")


def _single_file_error(path: Path, what: str, exc: Exception, is_sdxl: bool | None = None,
                       config: str | None = None) -> LorakitError:
    text = f"{type(exc).__name__}: {exc}"
    offline_words = ("offline", "connect", "resolve", "Cannot find", "LocalEntryNotFound", "couldn't", "Max retries",
                     "HF_HUB_OFFLINE", "not found in the cache", "Network")
    # A local config folder needs no download, so only a hub config (the user's or the standard one)
    # can be what is missing offline.
    if not (config and os.path.isdir(config)) and any(w.lower() in text.lower() for w in offline_words):
        repo = config or DEFAULT_CONFIG_REPOS[bool(is_sdxl)]
        return ModelNotFound(
            f"{what}: loading the single-file checkpoint {path} needs the model configuration of {repo} "
            f"(a few kB of JSON), which is not in the Hugging Face cache and cannot be downloaded now. Run once "
            f"online, or `huggingface-cli download {repo} --include '*.json' '*.txt'`, or pass a diffusers "
            f"folder of the same architecture as the config. ({text.splitlines()[0][:300]})"
        )
    return LorakitError(f"{what}: cannot load the single-file checkpoint {path}: {text.splitlines()[0][:500]}")


def load_pipeline(spec: str | os.PathLike, *, vae: str | os.PathLike | None = None, device: str = "cpu",
                  dtype=None, config: str | os.PathLike | None = None, v_prediction: bool | None = None):
    """A ready diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` for inference.

    ``vae`` replaces the checkpoint's VAE (a .safetensors file, a folder or a hub id). ``config`` is
    only for single-file checkpoints: a diffusers folder or hub id whose configs describe the
    architecture (by default the standard SD1.5 / SDXL repos, which must be in the hub cache when
    offline). ``v_prediction=True`` makes the scheduler predict velocity (v-prediction models).
    """
    with _quiet_loading():
        return _load_pipeline(spec, vae=vae, device=device, dtype=dtype, config=config, v_prediction=v_prediction)


@contextmanager
def _quiet_loading():
    """diffusers' and transformers' own tqdm bars ("Loading pipeline components", "Loading weights")
    would break through lorakit's progress display; the caller shows one bar or spinner instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _load_pipeline(spec, *, vae, device, dtype, config, v_prediction):
    import torch

    dtype = dtype or torch.float32
    vae_model = _load_vae(vae, dtype) if vae is not None else None
    extra = {"vae": vae_model} if vae_model is not None else {}
    path = Path(str(spec)).expanduser()
    if path.is_file():
        _refuse_pickle(path, "base model")
        if path.suffix.lower() != ".safetensors":
            raise LorakitError(f"base model: {path} is not a .safetensors checkpoint")
        kind = single_file_kind(path)
        cls = _pipeline_class(kind["is_sdxl"])
        kwargs: dict[str, Any] = {_dtype_kw(): dtype, **extra}
        if config is not None:
            # diffusers takes a string that is not an existing folder for a hub id, so expand ``~``.
            kwargs["config"] = os.path.expanduser(str(config))
        if not kind["is_sdxl"]:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = cls.from_single_file(str(path), **kwargs)
        except Exception as exc:
            raise _single_file_error(path, "base model", exc, kind["is_sdxl"], kwargs.get("config")) from None
        if v_prediction is None and kind["v_prediction"]:
            v_prediction = True
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(
                f"base model: folder {path} is not a diffusers model (no model_index.json). Pass a single-file "
                ".safetensors checkpoint, a diffusers folder or a hub id."
            )
        is_sdxl = _folder_is_sdxl(path)
        pipe = _from_pretrained(_pipeline_class(is_sdxl), str(path), dtype, extra, is_sdxl, str(path))
    elif _looks_like_repo(str(spec)):
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(str(spec), "model_index.json"))
        except Exception as exc:
            raise ModelNotFound(
                f"base model: cannot get hub repo {spec} ({type(exc).__name__}). Run once while online to fill "
                f"the Hugging Face cache (huggingface-cli download {spec}), or download a single-file "
                ".safetensors checkpoint and pass its path."
            ) from None
        is_sdxl = _folder_is_sdxl(index.parent)
        pipe = _from_pretrained(_pipeline_class(is_sdxl), str(spec), dtype, extra, is_sdxl, str(spec))
    else:
        raise ModelNotFound(
            f"base model: {spec} is neither an existing .safetensors file or diffusers folder nor a hub repo id "
            "(owner/name)"
        )
    if v_prediction is not None:
        wanted = "v_prediction" if v_prediction else "epsilon"
        if pipe.scheduler.config.get("prediction_type") != wanted:
            pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=wanted)
    return pipe.to(device)


def _refuse_pickled_folder(folder: Path, what: str) -> None:
    """A diffusers folder whose weights are only pickles (``*.bin``) is refused before anything loads."""
    pickles = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles and not any(folder.rglob("*.safetensors")):
        raise LorakitError(
            f"{what}: {folder} holds only pickled weights ({pickles[0].relative_to(folder)}"
            f"{' and more' if len(pickles) > 1 else ''}); lorakit loads only .safetensors because unpickling a "
            "file can run arbitrary code. Download the .safetensors version of the model.")


def _from_pretrained(cls, where: str, dtype, extra: dict, is_sdxl: bool, label: str):
    if Path(where).is_dir():
        _refuse_pickled_folder(Path(where), "base model")
    # use_safetensors=True: diffusers never falls back to unpickling a .bin file.
    kwargs: dict[str, Any] = {_dtype_kw(): dtype, "use_safetensors": True, **extra}
    if not is_sdxl:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, EnvironmentError, ValueError) as exc:
        raise ModelNotFound(
            f"base model: cannot load {label}: {str(exc).splitlines()[0][:400]}. Complete the download "
            f"(huggingface-cli download {label}) or pass another model."
        ) from None


def load_base_model(spec: str | os.PathLike, *, vae: str | os.PathLike | None = None, device: str = "cpu",
                    dtype=None, v_prediction: bool | None = None,
                    config: str | os.PathLike | None = None) -> BaseModel:
    """Load the parts the trainer needs; see the module docstring for what ``spec`` may be.

    ``v_prediction=None`` takes the model's own setting (scheduler config, or a ``v_pred`` marker
    tensor in a single file); True/False overrides it.
    """
    from diffusers import DDPMScheduler

    pipe = load_pipeline(spec, vae=vae, device=device, dtype=dtype, config=config, v_prediction=v_prediction)
    is_sdxl = hasattr(pipe, "text_encoder_2")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    # Training always uses DDPM's noising (the forward process), with the model's own betas.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
    return BaseModel(
        unet=pipe.unet, vae=pipe.vae, text_encoders=text_encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler, is_sdxl=is_sdxl, v_prediction=prediction == "v_prediction",
        source=str(spec), pipeline_class=type(pipe).__name__,
    )


# ----- describing a model without loading it (for --dry-run) ----------------------------------
# Parameter counts of the standard models, used when a hub model's weights are not at hand.
STANDARD_PARAMETERS = {
    False: {"unet": 859_520_964, "text_encoders": 123_060_480, "vae": 83_653_863},
    True: {"unet": 2_567_463_684, "text_encoders": 817_844_224, "vae": 83_653_863},
}


def _count_safetensors(files: list[Path], prefix: str | tuple[str, ...] = "") -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not prefix or key.startswith(prefix):
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


def describe_base_model(spec: str | os.PathLike) -> dict[str, Any]:
    """``{"is_sdxl", "unet", "text_encoders", "vae", "counted"}`` from file headers only (no weights read)."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        _refuse_pickle(path, "base model")
        kind = single_file_kind(path)
        return {
            "is_sdxl": kind["is_sdxl"],
            "unet": _count_safetensors([path], "model.diffusion_model."),
            "text_encoders": _count_safetensors([path], ("cond_stage_model.", "conditioner.")),
            "vae": _count_safetensors([path], "first_stage_model."),
            "counted": True,
        }
    if path.is_dir() and (path / "model_index.json").is_file():
        is_sdxl = _folder_is_sdxl(path)
        counts: dict[str, Any] = {"is_sdxl": is_sdxl, "counted": True}
        for part, folders in (("unet", ["unet"]), ("vae", ["vae"]),
                              ("text_encoders", ["text_encoder", "text_encoder_2"])):
            files = [f for folder in folders for f in sorted((path / folder).glob("*.safetensors"))]
            if not files and any((path / folder).is_dir() for folder in folders):
                counts["counted"] = False
                counts[part] = STANDARD_PARAMETERS[is_sdxl][part]
            else:
                counts[part] = _count_safetensors(files)
        return counts
    if _looks_like_repo(str(spec)):
        try:
            from huggingface_hub import hf_hub_download

            is_sdxl = _folder_is_sdxl(Path(hf_hub_download(str(spec), "model_index.json")).parent)
        except Exception:
            is_sdxl = "xl" in str(spec).lower()
        return {"is_sdxl": is_sdxl, **STANDARD_PARAMETERS[is_sdxl], "counted": False}
    raise ModelNotFound(f"base model: {spec} is neither an existing .safetensors file or diffusers folder nor a hub repo id")
