"""The ``filter`` step: set aside images that are too small, too elongated, or (not) monochrome."""
from __future__ import annotations

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import ImageStep, Param, ParamError, SkipImage, hookimpl

# Pixels whose chroma is at most the tolerance count as grey; this share of the pixels may exceed it
# (a coloured signature, JPEG colour noise) before an image stops being greyscale.
COLOURED_SHARE_ALLOWED = 0.01
# A tinted monochrome (sepia, cyanotype) has most pixels coloured, all of about the same hue.
TINT_MIN_SHARE = 0.5
TINT_MIN_CONCENTRATION = 0.98  # length of the mean hue vector: 1 = every pixel the same hue
ANALYSIS_SIDE = 256


def monochrome_stats(im: Image.Image, tolerance: float) -> tuple[bool, str]:
    """Decide whether ``im`` is monochrome (greyscale, or a single tint such as sepia).

    Works on a small copy in YCbCr: chroma is the distance of (Cb, Cr) from neutral grey.
    Returns (is_monochrome, short explanation).
    """
    small = im.copy()
    small.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE))
    if small.mode in ("RGBA", "LA", "PA", "P"):
        rgba = small.convert("RGBA")
        opaque = np.asarray(rgba.getchannel("A")) > 0
        ycc = np.asarray(rgba.convert("RGB").convert("YCbCr"), dtype=np.float64)[opaque]
    else:
        ycc = np.asarray(small.convert("RGB").convert("YCbCr"), dtype=np.float64).reshape(-1, 3)
    if ycc.size == 0:
        return True, "no opaque pixels"
    cb, cr = ycc[:, 1] - 128.0, ycc[:, 2] - 128.0
    chroma = np.hypot(cb, cr)
    coloured = chroma > tolerance
    share = float(coloured.mean())
    if share <= COLOURED_SHARE_ALLOWED:
        return True, f"greyscale ({share:.1%} of pixels coloured beyond tolerance {tolerance:g})"
    if share >= TINT_MIN_SHARE:
        hue = np.arctan2(cr[coloured], cb[coloured])
        concentration = float(np.hypot(np.cos(hue).mean(), np.sin(hue).mean()))
        if concentration >= TINT_MIN_CONCENTRATION:
            return True, f"single tint ({share:.0%} of pixels share one hue, concentration {concentration:.3f})"
    return False, f"colour ({share:.0%} of pixels coloured)"


class FilterStep(ImageStep):
    """Keep only the images that meet the limits you set; the others are set aside with the reason
    (nothing is deleted). Sizes come from the file header, so size and aspect filters do not decode
    the picture; the monochrome test decodes a small copy. Every limit is off by default.

    Monochrome means greyscale (manga pages, sketches, black-and-white photos; a little colour noise
    is tolerated) or a single tint (sepia, cyanotype). `--monochrome drop` removes them, `only` keeps
    nothing else; guides suggest keeping monochrome below about half of a character dataset."""

    name = "filter"
    summary = "Set aside images by minimum side/pixels, aspect-ratio limits, or monochrome."
    version = "1"
    params = [
        Param("min_side", int, 0, "shortest side must be at least this many pixels (0 = no limit)", min=0),
        Param("min_pixels", int, 0, "width x height must be at least this (512x512 = 262144; 0 = no limit)", min=0),
        Param("min_aspect", float, 0.0, "width/height must be at least this (e.g. 0.5 drops taller than 1:2; 0 = no limit)", min=0),
        Param("max_aspect", float, 0.0, "width/height must be at most this (e.g. 2.0 drops wider than 2:1; 0 = no limit)", min=0),
        Param("monochrome", str, "keep", "keep: no test; drop: set aside monochrome images; only: set aside colour images",
              choices=("keep", "drop", "only")),
        Param("monochrome_tolerance", float, 12.0, "chroma (0-180) still counted as grey", min=0, max=180),
    ]
    reads = frozenset({"image"})
    writes = frozenset({"image"})
    example = "lorakit filter raw/ kept/ --min-side 512 --max-aspect 2.5 --monochrome drop"

    def __init__(self, params=None):
        super().__init__(params)
        o = self.options
        if o.min_aspect and o.max_aspect and o.min_aspect > o.max_aspect:
            raise ParamError(self.name, "min_aspect", o.min_aspect, f"at most max_aspect ({o.max_aspect:g})")

    def process(self, item, ctx):
        o = self.options
        if item.pending_image is not None:
            width, height = item.pending_image.size
        else:
            try:
                with Image.open(item.path) as header:
                    width, height = header.size
            except (OSError, ValueError, SyntaxError):
                item.open()  # raises an ImageError that names the file and the problem
                raise
        side = min(width, height)
        if o.min_side and side < o.min_side:
            raise SkipImage(f"too small: {width}x{height}, shortest side {side} < min_side {o.min_side}")
        if o.min_pixels and width * height < o.min_pixels:
            raise SkipImage(f"too small: {width}x{height} = {width * height} pixels < min_pixels {o.min_pixels}")
        aspect = width / height
        if o.min_aspect and aspect < o.min_aspect:
            raise SkipImage(f"too tall: {width}x{height}, aspect {aspect:.3g} < min_aspect {o.min_aspect:g}")
        if o.max_aspect and aspect > o.max_aspect:
            raise SkipImage(f"too wide: {width}x{height}, aspect {aspect:.3g} > max_aspect {o.max_aspect:g}")
        if o.monochrome != "keep":
            mono, why = monochrome_stats(item.open(), o.monochrome_tolerance)
            if mono and o.monochrome == "drop":
                raise SkipImage(f"monochrome: {why}")
            if not mono and o.monochrome == "only":
                raise SkipImage(f"not monochrome: {why}")
        return item


@hookimpl
def register_steps(register):
    register(FilterStep)
