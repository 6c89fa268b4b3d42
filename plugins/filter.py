"""The ``filter`` step: set aside images that are too small, too elongated, or (not) monochrome."""
from __future__ import annotations

import numpy as np
from PIL import Image

from lorakit.plugin_sdk import ImageStep, Param, ParamError, SkipImage, hookimpl, image_size

# Pixels whose chroma is at most the tolerance count as grey; this share of the pixels may exceed it
# (a coloured signature, JPEG colour noise) before an image stops being greyscale.
COLOURED_SHARE_ALLOWED = 0.01
# A tinted monochrome (sepia, cyanotype) has most pixels coloured, all of about the same hue...
TINT_MIN_SHARE = 0.5
TINT_MIN_CONCENTRATION = 0.9  # length of the mean hue vector: 1 = every pixel the same hue
# ...and, above all, its colour is a function of lightness: pixels of equal lightness have the same
# colour. In CIELAB, the 90th percentile distance of (a*, b*) from the median colour of pixels of
# the same lightness is about 1 for a sepia print and 2-4 after JPEG; warm photographs (a ginger
# cat, a cup of coffee) share one hue too, but their saturation varies freely: 14 and more.
TINT_MAX_SPREAD = 8.0
LIGHTNESS_BINS = 16
ANALYSIS_SIDE = 256


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(n, 3) sRGB values in 0..255 to (n, 3) CIELAB (D65): L* 0..100, a*, b*."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def tint_spread(rgb: np.ndarray) -> float:
    """How far colours stray from one tint: the 90th percentile (a*, b*) distance of each pixel
    from the median colour of the pixels of about the same lightness (16 lightness bands)."""
    lab = srgb_to_lab(rgb)
    band = np.clip((lab[:, 0] / 100 * LIGHTNESS_BINS).astype(int), 0, LIGHTNESS_BINS - 1)
    residual = np.empty(len(lab))
    for k in np.unique(band):
        sel = band == k
        a, b = lab[sel, 1], lab[sel, 2]
        residual[sel] = np.hypot(a - np.median(a), b - np.median(b))
    return float(np.percentile(residual, 90))


def monochrome_stats(im: Image.Image, tolerance: float) -> tuple[bool, str]:
    """Decide whether ``im`` is monochrome (greyscale, or a single tint such as sepia).

    Works on a small copy. Greyscale: the chroma (distance of YCbCr's Cb, Cr from neutral grey) of
    nearly every pixel is within ``tolerance``. Single tint: most pixels share one hue and pixels
    of equal lightness share one colour (see ``tint_spread``). Returns (is_monochrome, explanation).
    """
    small = im.copy()
    small.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE))
    if small.mode in ("RGBA", "LA", "PA", "P"):
        rgba = small.convert("RGBA")
        opaque = np.asarray(rgba.getchannel("A")) > 0
        rgb_image = rgba.convert("RGB")
        ycc = np.asarray(rgb_image.convert("YCbCr"), dtype=np.float64)[opaque]
        rgb = np.asarray(rgb_image, dtype=np.float64)[opaque]
    else:
        rgb_image = small.convert("RGB")
        ycc = np.asarray(rgb_image.convert("YCbCr"), dtype=np.float64).reshape(-1, 3)
        rgb = np.asarray(rgb_image, dtype=np.float64).reshape(-1, 3)
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
            spread = tint_spread(rgb)
            if spread <= TINT_MAX_SPREAD:
                return True, (f"single tint ({share:.0%} of pixels coloured, one hue, colour spread "
                              f"{spread:.1f} at equal lightness)")
            return False, (f"colour ({share:.0%} of pixels share one hue, but colour spread {spread:.1f} at "
                           f"equal lightness > {TINT_MAX_SPREAD:g}: a warm- or cool-toned picture, not a tint)")
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
            width, height = image_size(item.path)  # header only: raises ImageError naming the file
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
