"""Masks for masked-loss training (white = train, black = ignore), with a quality check.

Three ways to make a mask:

* ``transparent-background``: the InSPyReNet salient-object network of the transparent-background
  package (what the guides run as ``transparent-background --type map``). The checkpoint is read
  from the package's usual place (``~/.transparent-background/ckpt_base.pth``, or under
  ``$TRANSPARENT_BACKGROUND_FILE_PATH``) or from ``--model``; nothing is downloaded.
* ``alpha``: the image's own transparency (run this before the ``alpha`` step flattens it).
* ``color``: a flood fill of the flat background colour from the image border.

The quality check rejects masks that are nearly all black, nearly all white, or largely grey (the
subject "shows through"). The image stays in the dataset without a mask, the reason is kept in
``meta["mask_rejected"]``, and with ``rejected_subset`` it moves to a subset of its own, so a
masked subset only holds images with good masks.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import (
    Color, ImageStep, LorakitError, ModelNotFound, Param, Percent, SkipImage, hookimpl, pick_device, save_image,
)
from lorakit.plugin_sdk import model_file_digest

BACKENDS = ("transparent-background", "alpha", "color")
TB_MODES = ("base", "fast", "base-nightly")
# Pixels between these levels count as "grey" (neither clearly ignored nor clearly trained).
GREY_LOW, GREY_HIGH = 32, 224


# ----- the quality check ----------------------------------------------------------------------
def mask_stats(mask: np.ndarray) -> dict[str, float]:
    """Fractions of a uint8 mask that are trained (>= 128) and grey (between 32 and 224)."""
    return {
        "foreground": float((mask >= 128).mean()),
        "grey": float(((mask > GREY_LOW) & (mask < GREY_HIGH)).mean()),
    }


def mask_problem(mask: np.ndarray, min_foreground: float, max_foreground: float, max_grey: float) -> str | None:
    """Why a mask is unusable (fractions are 0..1), or None when it passes."""
    s = mask_stats(mask)
    if s["foreground"] < min_foreground:
        return (f"mask is nearly all black: {s['foreground']:.1%} of the image would be trained "
                f"(min_foreground {min_foreground:.0%})")
    if s["foreground"] > max_foreground:
        return (f"mask is nearly all white: {s['foreground']:.1%} of the image would be trained, masked loss "
                f"would change nothing (max_foreground {max_foreground:.0%})")
    if s["grey"] > max_grey:
        return (f"mask is {s['grey']:.1%} grey, the subject shows through instead of being cut out "
                f"(max_grey {max_grey:.0%})")
    return None


# ----- backends without a model ---------------------------------------------------------------
def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """The alpha channel as a mask, or None when the image has no transparency information."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(image.getchannel("A"), dtype=np.uint8)
    if "transparency" in image.info:
        return np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.uint8)
    return None


def border_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """The background colour guessed from the border: the most common colour of the outermost pixels."""
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colours, counts = np.unique(edge.reshape(-1, 3), axis=0, return_counts=True)
    return tuple(int(v) for v in colours[counts.argmax()])


def colour_mask(rgb: np.ndarray, background: tuple[int, int, int], fuzz: float) -> np.ndarray:
    """Flood-fill the background from the border: pixels within ``fuzz`` (0..1 of the black-to-white
    distance) of ``background`` and connected to the edge become black, everything else white.

    Background-coloured areas enclosed by the subject (eyes, a white shirt) stay white.
    """
    from scipy import ndimage

    distance = np.sqrt(((rgb.astype(np.float32) - np.asarray(background, np.float32)) ** 2).sum(axis=2))
    near = distance <= fuzz * np.sqrt(3) * 255.0
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge_labels = edge_labels[edge_labels != 0]
    background_px = np.isin(labels, edge_labels)
    return np.where(background_px, 0, 255).astype(np.uint8)


# ----- transparent-background (InSPyReNet) ----------------------------------------------------
def tb_config() -> dict:
    """transparent-background's model table: the user's copy in its home folder if present, else the
    package's own (mode -> url, ckpt_name, base_size)."""
    import yaml

    home = Path(os.environ.get("TRANSPARENT_BACKGROUND_FILE_PATH", os.path.expanduser("~"))) / ".transparent-background"
    candidates = [home / "config.yaml"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("transparent_background")
        if spec and spec.origin:
            candidates.append(Path(spec.origin).parent / "config.yaml")
    except (ImportError, ValueError):
        pass
    for path in candidates:
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
            if isinstance(data, dict) and "base" in data:
                return data
    raise LorakitError("transparent-background is not installed (pip install transparent-background)")


def tb_checkpoint(mode: str, model: str | os.PathLike | None = None) -> Path:
    """The checkpoint to load: ``model`` if given, else where transparent-background keeps it."""
    table = tb_config()
    if mode not in table:
        raise LorakitError(f"transparent-background has no mode '{mode}' (modes: {', '.join(table)})")
    cfg = table[mode]
    if model is not None:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"transparent-background checkpoint {path} not found (passed as --model)")
        return path
    home = Path(os.environ.get("TRANSPARENT_BACKGROUND_FILE_PATH", os.path.expanduser("~"))) / ".transparent-background"
    path = home / cfg["ckpt_name"]
    if not path.is_file():
        raise ModelNotFound(
            f"transparent-background checkpoint for mode '{mode}' not found at {path}. lorakit does not download "
            f"it: fetch {cfg['url']} and save it as {path} (or anywhere, and pass --model PATH). Running "
            "`transparent-background --source some.png` once while online also puts it there."
        )
    return path


class SalientObjectMasker:
    """InSPyReNet (Swin-B backbone) from the transparent-background package, fed the way its
    ``Remover.process(type="map")`` does with static resizing: RGB resized to the mode's base size,
    ImageNet-normalised; the saliency map is resized back to the image size."""

    def __init__(self, checkpoint: Path, mode: str = "base", device: str = "cpu"):
        import torch

        self.base_size = list(tb_config()[mode]["base_size"])
        self.device = device
        # The package warns about its optional GUI toolkit on import, and torch about a meshgrid call in
        # the Swin backbone; neither concerns the user.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transparent_background.InSPyReNet import InSPyReNet_SwinB

            net = InSPyReNet_SwinB(depth=64, pretrained=False, base_size=self.base_size, threshold=None)
        try:
            # weights_only=True: the checkpoint is a plain state dict; nothing else is unpickled.
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except Exception as exc:
            raise LorakitError(
                f"transparent-background checkpoint {checkpoint}: cannot be loaded as an InSPyReNet state dict "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
        self.net = net.eval().to(device)

    def __call__(self, image: Image.Image) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        rgb = image.convert("RGB")
        small = rgb.resize(tuple(self.base_size), Image.BILINEAR)
        x = np.asarray(small, dtype=np.float32) / 255.0
        x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        tensor = torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0).to(self.device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meshgrid")  # inside the Swin backbone, harmless
            pred = self.net(tensor)
            pred = F.interpolate(pred.float(), (rgb.height, rgb.width), mode="bilinear", align_corners=True)
        return (pred[0, 0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)


def _keep_rejected(mask: np.ndarray, ctx) -> Path:
    """Save a rejected mask in the step's work folder, named by its content; the host keeps it under
    set_aside/masks/ (the ``rejected_mask_file`` meta key is the host's convention)."""
    import hashlib

    data = np.ascontiguousarray(mask, dtype=np.uint8)
    name = hashlib.sha256(data.tobytes() + str(data.shape).encode()).hexdigest() + ".png"
    target = Path(ctx.work_dir) / "rejected" / name
    if not target.is_file():
        save_image(Image.fromarray(data, "L"), target)
    return target


# ----- the step -------------------------------------------------------------------------------
class MaskStep(ImageStep):
    """Make a mask for each image for masked-loss training (white = train, black = ignore).

    Backends: transparent-background (InSPyReNet, the guides' tool; checkpoint from
    ~/.transparent-background or --model, never downloaded), alpha (the image's own transparency: put
    this step before `alpha`), color (flood fill of a flat background from the border).
    Masks that are nearly all black, nearly all white, or largely grey are rejected: the image is kept
    without a mask, meta["mask_rejected"] says why, and --rejected-subset moves it to its own subset.
    """

    name = "mask"
    summary = "Make masked-loss masks (transparent-background, alpha or background colour) and reject bad ones."
    version = "1"
    workers = 1
    reads = frozenset({"image"})
    writes = frozenset({"mask", "meta", "subset"})
    example = "lorakit mask trimmed/ masked/ --backend transparent-background --rejected-subset '{subset}_nomask'"
    params = [
        Param("backend", str, "transparent-background", "how masks are made", choices=BACKENDS),
        Param("model", Path, None, "transparent-background checkpoint (.pth); default: "
              "~/.transparent-background/ckpt_<mode>.pth"),
        Param("mode", str, "base", "transparent-background model: base (1024 px input, best), fast (384 px) "
              "or base-nightly",
              choices=TB_MODES),
        Param("device", str, "auto", "auto (CUDA when present), cpu, cuda or cuda:N"),
        Param("background", Color, None, "color backend: the background colour (default: the most common "
              "colour on the image border)"),
        Param("fuzz", Percent, Percent(10), "color backend: colour distance still counted as background"),
        Param("threshold", float, None, "make hard masks: white where the mask is above this (0-1); default "
              "keeps soft edges", min=0.0, max=1.0),
        Param("min_foreground", Percent, Percent(5), "reject masks that train less than this much of the image"),
        Param("max_foreground", Percent, Percent(98), "reject masks that train more than this much of the image"),
        Param("max_grey", Percent, Percent(15), "reject masks with more grey (neither black nor white) than this"),
        Param("rejected_subset", str, None, "move images whose mask was rejected to this subset ('{subset}' is "
              "replaced by the image's subset); default: they stay, unmasked"),
    ]

    def __init__(self, params=None):
        super().__init__(params)
        if self.options.backend != "transparent-background":
            self.workers = None  # cheap numpy work: let the host spread it over all cores

    def cache_token(self) -> str:
        if self.options.backend != "transparent-background":
            return ""
        try:
            return model_file_digest(tb_checkpoint(self.options.mode, self.options.model))
        except LorakitError:
            return "missing"  # setup() reports the missing checkpoint before any image is processed

    def setup(self, ctx) -> None:
        if self.options.backend == "transparent-background" and getattr(self, "_masker", None) is None:
            checkpoint = tb_checkpoint(self.options.mode, self.options.model)
            device = pick_device(self.options.device)
            self._masker = SalientObjectMasker(checkpoint, self.options.mode, device)
            ctx.log(f"transparent-background {self.options.mode} ({checkpoint.name}) on {device}")

    def make_mask(self, image: Image.Image) -> tuple[np.ndarray | None, str | None]:
        """(mask, None), or (None, reason) when this backend cannot make a mask for the image."""
        backend = self.options.backend
        if backend == "alpha":
            mask = alpha_mask(image)
            return (mask, None) if mask is not None else (None, "image has no alpha channel to take the mask from")
        if backend == "color":
            rgb = np.asarray(image.convert("RGB"))
            background = tuple(self.options.background) if self.options.background else border_colour(rgb)
            return colour_mask(rgb, background, float(self.options.fuzz) / 100.0), None
        if getattr(self, "_masker", None) is None:
            raise LorakitError("mask step used before setup()")
        return self._masker(image), None

    def process(self, item, ctx):
        image = item.open()
        mask, reason = self.make_mask(image)
        if mask is not None:
            reason = mask_problem(mask, self.options.min_foreground / 100.0, self.options.max_foreground / 100.0,
                                  self.options.max_grey / 100.0)
        meta = {k: v for k, v in item.meta.items() if k not in ("mask_rejected", "mask")}
        if reason is not None:
            ctx.log(f"{item.name}: {reason}")
            meta["mask_rejected"] = reason
            if mask is not None:  # kept aside: a person can look at it and accept it (docs/curation.md)
                meta["rejected_mask_file"] = str(_keep_rejected(mask, ctx))
            changes = {"mask": None, "pending_mask": None, "meta": meta}
            if self.options.rejected_subset:
                changes["subset"] = self.options.rejected_subset.replace("{subset}", item.subset)
            return item.replace(**changes)
        meta["mask"] = {"backend": self.options.backend, **{k: round(v, 4) for k, v in mask_stats(mask).items()}}
        if self.options.threshold is not None:
            mask = np.where(mask > self.options.threshold * 255.0, 255, 0).astype(np.uint8)
        if mask.shape != (image.height, image.width):
            raise SkipImage(f"mask backend returned {mask.shape[1]}x{mask.shape[0]} for a "
                            f"{image.width}x{image.height} image")
        return item.with_mask(Image.fromarray(mask, "L"), meta=meta)


@hookimpl
def register_steps(register):
    register(MaskStep)
