"""ESRGAN-family upscaling of images that are too small to train on (and 1x ESRGAN filters).

The model file (``.safetensors``, or ``.pth`` read with a weights-only load) is recognised by
spandrel, which builds the right network (ESRGAN / Real-ESRGAN RRDBNet, including the 6-block anime
model and the pixel-unshuffle x2 models). Images are processed in overlapping tiles so a large
picture fits in memory; each tile is given ``tile_overlap`` pixels of surrounding context that is cut
off again, so the tiled result equals the one-pass result wherever the context covers the model's
reach (tested).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import (
    ImageStep, LorakitError, ModelNotFound, Param, ParamError, degenerate_reason, hookimpl, pick_device,
)
from lorakit.plugin_sdk import model_file_digest

MODEL_SUFFIXES = (".safetensors", ".pth")


# ----- loading --------------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike) -> dict:
    """Read an upscaler's tensors from ``.safetensors``, or from ``.pth`` through a weights-only load."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFound(
            f"upscale model {path} not found. Download an ESRGAN model (e.g. RealESRGAN_x4plus_anime_6B.pth "
            "from https://github.com/xinntao/Real-ESRGAN/releases, or one from https://openmodeldb.info) "
            "and pass its path with --model."
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise LorakitError(f"upscale model {path}: not a readable .safetensors file ({exc})") from None
    elif suffix == ".pth":
        try:
            # weights_only=True: only tensors and plain containers are unpickled, never code.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LorakitError(
                f"upscale model {path}: cannot be read with a safe weights-only load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). lorakit never unpickles code: use the .safetensors "
                "version of the model, or convert it once in a sandbox you trust."
            ) from None
    else:
        raise LorakitError(f"upscale model {path}: expected a {' or '.join(MODEL_SUFFIXES)} file, not '{suffix}'")
    if not isinstance(state, dict):
        raise LorakitError(f"upscale model {path}: the file holds a {type(state).__name__}, not a state dict")
    from spandrel import canonicalize_state_dict

    return canonicalize_state_dict(state)


def load_upscaler(path: str | os.PathLike, device: str = "cpu", half: bool = False):
    """A spandrel ``ImageModelDescriptor`` (eval mode, on ``device``; fp16 only when asked and supported)."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    state = load_state_dict(path)
    try:
        model = ModelLoader().load_from_state_dict(state)
    except UnsupportedModelError:
        sample = ", ".join(list(state)[:4])
        raise LorakitError(
            f"upscale model {path}: the architecture is not recognised (first tensors: {sample}). Use an "
            "ESRGAN-family model such as RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B or 2x_MangaScaleV3."
        ) from None
    if not isinstance(model, ImageModelDescriptor) or model.purpose not in ("SR", "Restoration"):
        raise LorakitError(
            f"upscale model {path}: a {model.architecture.name} {model.purpose} model is not an image upscaler or filter"
        )
    model = model.to(device).eval()
    if half and model.supports_half:
        model = model.half()
    return model


# ----- tiled inference ------------------------------------------------------------------------
def tile_windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Windows along one axis as ``(start, end, keep_start, keep_end)``.

    Every window is ``tile`` long (the last one is moved back to end at the edge, so all tiles share a
    shape and can be batched); each keeps only its part away from the neighbours' overlap, and the
    kept parts cover ``0..length`` without gaps.
    """
    if tile <= 0 or length <= tile:
        return [(0, length, 0, length)]
    stride = tile - 2 * overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    out = []
    for i, a in enumerate(starts):
        keep_start = a if i == 0 else a + overlap
        keep_end = a + tile if i == len(starts) - 1 else a + tile - overlap
        out.append((a, a + tile, keep_start, keep_end))
    return out


def run_tiled(model, image, *, tile: int = 512, overlap: int = 32, batch: int = 1):
    """Run an image model over a (1, C, H, W) tensor in overlapping tiles; returns a float32 CPU tensor.

    ``model`` is any callable from (B, C, h, w) to (B, C', h*s, w*s) with ``model.scale == s``.
    """
    import torch

    _, _, height, width = image.shape
    scale = model.scale
    rows = tile_windows(height, tile, overlap)
    cols = tile_windows(width, tile, overlap)
    windows = [(r, c) for r in rows for c in cols]
    out = None
    for i in range(0, len(windows), max(batch, 1)):
        group = windows[i:i + max(batch, 1)]
        x = torch.cat([image[:, :, r[0]:r[1], c[0]:c[1]] for r, c in group])
        with torch.inference_mode():
            y = model(x).float().cpu()
        if out is None:
            out = torch.empty((1, y.shape[1], height * scale, width * scale), dtype=torch.float32)
        for k, (r, c) in enumerate(group):
            ry0, ry1 = (r[2] - r[0]) * scale, (r[3] - r[0]) * scale
            cx0, cx1 = (c[2] - c[0]) * scale, (c[3] - c[0]) * scale
            out[:, :, r[2] * scale:r[3] * scale, c[2] * scale:c[3] * scale] = y[k:k + 1, :, ry0:ry1, cx0:cx1]
    return out


def needed_size(width: int, height: int, min_pixels: int) -> tuple[int, int]:
    """The smallest size with the same aspect ratio and at least ``min_pixels`` (never below the original)."""
    if width * height >= min_pixels:
        return width, height
    factor = math.sqrt(min_pixels / (width * height))
    w, h = math.ceil(width * factor), math.ceil(height * factor)
    while w * h < min_pixels:  # rounding can leave it a few pixels short
        w, h = w + 1, math.ceil((w + 1) * height / width)
    return w, h


# ----- the step -------------------------------------------------------------------------------
def _check_tiling(step: str, tile: int, overlap: int) -> None:
    if tile and tile < 2 * overlap + 16:
        raise ParamError(step, "tile", tile, f"0 (no tiling) or at least 2 x tile_overlap + 16 = {2 * overlap + 16}")


class UpscaleStep(ImageStep):
    """Upscale images that are too small with an ESRGAN-family model (RealESRGAN_x4plus, ..._anime_6B,
    2x_MangaScaleV3), then resize down to what training needs, keeping the aspect ratio.

    By default (apply_to=auto) a 2x/4x model only touches images with fewer pixels than the training
    resolution squared (262,144 at 512; 1,048,576 at 1024) and leaves the others as they are; a 1x
    model (JPEG/noise filter) is applied to every image. Runs on the GPU when there is one (fp16), in
    overlapping tiles so that large images fit in memory. .pth files are read with a weights-only load.
    """

    name = "upscale"
    summary = "Upscale too-small images with an ESRGAN model (or apply a 1x ESRGAN filter)."
    version = "1"
    workers = 1
    reads = frozenset({"image", "mask"})
    writes = frozenset({"image", "mask", "meta"})
    example = "lorakit upscale raw/ upscaled/ --model models/RealESRGAN_x4plus_anime_6B.pth --resolution 1024"
    params = [
        Param("model", Path, help="ESRGAN-family model file (.safetensors, or .pth read weights-only)"),
        Param("apply_to", str, "auto", "small: images under the target pixel count; all: every image; "
              "auto: small for 2x/4x models, all for 1x filters", choices=("auto", "small", "all")),
        Param("min_pixels", int, None, "pixel count an image must reach (default: the training resolution squared)",
              min=1),
        Param("downscale", bool, True, "resize the upscaled result down to the size needed (keeping the aspect "
              "ratio; never below the original size)"),
        Param("max_passes", int, 2, "run the model again while the image is still too small (at most this many times)",
              min=1, max=4),
        Param("tile", int, 512, "tile size in input pixels (0 = the whole image at once)", min=0),
        Param("tile_overlap", int, 32, "context pixels around each tile, cut off afterwards (hides seams)", min=0),
        Param("device", str, "auto", "auto (CUDA when present), cpu, cuda or cuda:N"),
        Param("half", bool, True, "fp16 inference on CUDA (ignored on CPU)"),
    ]

    def __init__(self, params=None):
        super().__init__(params)
        _check_tiling(self.name, self.options.tile, self.options.tile_overlap)

    def cache_token(self) -> str:
        return model_file_digest(self.options.model)

    def setup(self, ctx) -> None:
        import torch

        if getattr(self, "_model", None) is not None:
            return
        self._device = pick_device(self.options.device)
        half = self.options.half and self._device.startswith("cuda")
        self._model = load_upscaler(self.options.model, self._device, half)
        self._dtype = next(self._model.model.parameters()).dtype
        ctx.log(f"model {Path(self.options.model).name}: {self._model.architecture.name} x{self._model.scale} "
                f"on {self._device}{' (fp16)' if self._dtype == torch.float16 else ''}")

    # ----- one image ---------------------------------------------------------------------------
    def process(self, item, ctx):
        if getattr(self, "_model", None) is None:
            self.setup(ctx)
        image = item.open()
        width, height = image.size
        min_pixels = self.options.min_pixels or ctx.resolution * ctx.resolution
        scale = self._model.scale
        small = width * height < min_pixels
        apply_to = self.options.apply_to
        if apply_to == "auto":
            apply_to = "all" if scale == 1 else "small"
        if apply_to == "small" and not small:
            return item

        grey = image.mode in ("L", "LA", "1", "I", "I;16", "F")
        alpha = None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = image.convert("LA" if grey else "RGBA").getchannel("A")
        rgb = image.convert("L" if self._model.input_channels == 1 else "RGB")

        passes = 0
        result = rgb
        while True:
            result = self._run_model(result)
            passes += 1
            if scale == 1 or passes >= self.options.max_passes or result.width * result.height >= min_pixels:
                break

        target = (width * scale ** passes, height * scale ** passes)
        if self.options.downscale:
            want = needed_size(width, height, min_pixels)
            if want[0] * want[1] < target[0] * target[1]:
                target = want
        if result.size != target:
            result = result.resize(target, Image.LANCZOS)
        if grey and result.mode != "L":
            result = result.convert("L")
        elif not grey and result.mode != "RGB":
            result = result.convert("RGB")
        if alpha is not None:
            result = result.convert("LA" if grey else "RGBA")
            result.putalpha(alpha.resize(target, Image.LANCZOS))

        meta = dict(item.meta)
        meta["upscale"] = {"model": Path(self.options.model).name, "scale": scale, "passes": passes,
                           "from": [width, height], "to": list(target)}
        changed = item.with_image(result, meta=meta)
        problems = [degenerate_reason(result)]
        if scale > 1 and small and target[0] * target[1] < min_pixels:
            problems.append(f"still below the target size after {passes} pass(es): {target[0]}x{target[1]} "
                            f"< {min_pixels} pixels (raise max_passes, or use a model with a larger scale)")
        for message in filter(None, problems):
            ctx.log(f"{item.name}: {message}")
            changed = changed.warned(self.name, message)
        mask = item.open_mask()
        if mask is not None:
            changed = changed.with_mask(mask.convert("L").resize(target, Image.BILINEAR))
        return changed

    def _run_model(self, image: Image.Image) -> Image.Image:
        import torch

        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(self._device, self._dtype)
        from spandrel import ModelTiling

        tile = 0 if self._model.tiling == ModelTiling.INTERNAL else self.options.tile
        batch = 4 if self._device.startswith("cuda") else 1
        while True:
            try:
                out = run_tiled(self._model, tensor, tile=tile, overlap=self.options.tile_overlap, batch=batch)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                smaller = (tile or max(image.size)) // 2
                if smaller < 2 * self.options.tile_overlap + 16:
                    raise
                tile, batch = smaller, 1
        pixels = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        if pixels.shape[2] == 1:
            return Image.fromarray(pixels[:, :, 0], "L")
        return Image.fromarray(pixels[:, :, :3], "RGB")


@hookimpl
def register_steps(register):
    register(UpscaleStep)
