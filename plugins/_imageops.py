"""Pixel operations shared by the image-cleaning steps (trim, alpha, convert, buckets, filter).

Everything here works on numpy arrays or PIL images in memory; the steps do the file handling.
The trim maths reproduces ImageMagick 6's ``-fuzz N% -trim`` exactly (see ``trim_box``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ImageMagick's Q16 quantum: an 8-bit sample v is stored as v * 257, full scale is 65535.
QUANTUM_RANGE = 65535.0
_Q = 257.0
_QUANTUM_SCALE = 1.0 / QUANTUM_RANGE
_MAGICK_EPSILON = 1.0e-12
_MAGICK_SQ1_2 = math.sqrt(0.5)  # IM's lower bound on the fuzz distance (MagickSQ1_2)

ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


# ----- transparency --------------------------------------------------------------------------
def has_alpha_channel(im: Image.Image) -> bool:
    """True when the image carries transparency information (an alpha band or a tRNS colour)."""
    return im.mode in ALPHA_MODES or (im.mode in ("P", "L", "RGB", "I", "I;16") and "transparency" in im.info)


def is_transparent(im: Image.Image) -> bool:
    """True when at least one pixel is not fully opaque."""
    if not has_alpha_channel(im):
        return False
    if im.mode == "RGBA" or im.mode == "LA":
        alpha = im.getchannel("A")
    else:
        alpha = im.convert("RGBA").getchannel("A")
    lo, _ = alpha.getextrema()
    return lo < 255


def to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB, or RGBA when the image has transparency.

    Palette images with a transparent index, grey + alpha and RGB with a tRNS colour become RGBA;
    16-bit and 32-bit grey are scaled (not clipped) to 8 bits; CMYK and YCbCr become RGB. An alpha
    channel that is fully opaque is dropped: it carries no information.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _high_depth_grey_to_l(im)
    if im.mode == "1":
        im = im.convert("L")
    if has_alpha_channel(im):
        out = im.convert("RGBA") if im.mode != "RGBA" else im
        if out.getchannel("A").getextrema()[0] == 255:
            return out.convert("RGB")
        return out
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    return im.convert("RGB") if im.mode != "RGB" else im


def _high_depth_grey_to_l(im: Image.Image) -> Image.Image:
    """16-bit grey PNG/TIFF (Pillow modes I;16*, I, F) to 8-bit L, scaling 0..65535 to 0..255.

    Mode I and F have no declared depth: values that all fit in 0..255 (or 0..1 for F) are taken
    as 8-bit (or unit) data rather than darkened 257-fold.
    """
    transparency = im.info.get("transparency")
    raw = np.asarray(im)
    arr = np.nan_to_num(raw.astype(np.float64))
    peak = float(arr.max()) if arr.size else 0.0
    if im.mode == "F" and arr.size and arr.min() >= 0.0 and peak <= 1.0:
        scaled = arr * 255.0
    elif im.mode in ("I", "F") and peak <= 255.0:
        scaled = arr
    else:
        scaled = arr * (255.0 / 65535.0)
    grey = Image.fromarray(np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8), "L")
    if isinstance(transparency, int):
        alpha = Image.fromarray(np.where(raw == transparency, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK to sRGB through the embedded ICC profile when there is one (Pillow's plain formula otherwise)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except Exception:  # a broken profile: fall back to the formula rather than lose the image
            pass
    return im.convert("RGB")


def flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite ``im`` over an opaque ``background`` (ImageMagick ``-alpha remove -alpha off``).

    Grey images stay grey when the background is grey; the result has no alpha channel. Each pixel
    is ``round((a*C + (255-a)*B) / 255)`` (Pillow's masked paste computes exactly that, in C).
    """
    grey = im.mode in ("LA", "La", "L") and background[0] == background[1] == background[2]
    src = im.convert("LA") if grey else (im if im.mode == "RGBA" else im.convert("RGBA"))
    colour = src.getchannel("L") if grey else src.convert("RGB")
    out = Image.new("L" if grey else "RGB", src.size, background[0] if grey else tuple(background))
    out.paste(colour, mask=src.getchannel("A"))
    return out


# ----- ImageMagick -trim ---------------------------------------------------------------------
def fuzz_from_percent(percent: float) -> float:
    """``-fuzz N%`` as ImageMagick stores it: N percent of QuantumRange + 1 (Q16)."""
    return percent / 100.0 * (QUANTUM_RANGE + 1.0)


@dataclass(frozen=True)
class TrimResult:
    """Where ImageMagick's -trim would crop: ``box`` = (left, top, right, bottom) for PIL, or None
    when -trim leaves nothing (ImageMagick then returns a 1x1 transparent image)."""

    box: tuple[int, int, int, int] | None
    size: tuple[int, int]

    @property
    def unchanged(self) -> bool:
        return self.box == (0, 0, self.size[0], self.size[1])


class _Similarity:
    """IsMagickColorSimilar (ImageMagick 6, magick/color.c) against one reference pixel, vectorised.

    Distances are computed in Q16 units in float64, in the same order of operations as ImageMagick,
    so that the comparison with the fuzz gives the same answer even at the boundary. Every term
    depends on one 8-bit sample, so each is looked up in a 256-entry table made once per reference
    (the same float values the formula gives, several times faster than computing them per pixel).
    """

    def __init__(self, target: np.ndarray, fuzz: float, matte: bool):
        fuzz = max(fuzz, _MAGICK_SQ1_2)
        self.fuzz2 = fuzz * fuzz
        self.fuzz2_x3 = self.fuzz2 * 3.0
        self.matte = matte
        self.target = target.astype(np.int32)
        values = np.arange(256, dtype=np.float64)
        if matte:
            target_alpha_scaled = _QUANTUM_SCALE * (float(target[3]) * _Q)
            da = (values - float(target[3])) * _Q  # opacity difference has the magnitude of the alpha difference
            self.alpha_distance = da * da
            self.alpha_ok = self.alpha_distance <= self.fuzz2
            self.scale = (_QUANTUM_SCALE * (values * _Q)) * target_alpha_scaled
            self.transparent = self.scale <= _MAGICK_EPSILON
            # A fully transparent reference: every pixel counts as transparent, colour never matters.
            self.colour_matters = not bool(self.transparent.all())
            self.colour_sq = [((values - float(target[c])) * _Q) ** 2 for c in range(3)]
        else:
            # Opaque images: distance = 257^2 * sum(dc^2) (exact integers); precompute the integer bound.
            bound = int(self.fuzz2_x3 // (_Q * _Q))
            while (bound + 1) * _Q * _Q <= self.fuzz2_x3:
                bound += 1
            while bound > 0 and bound * _Q * _Q > self.fuzz2_x3:
                bound -= 1
            self.int_bound = bound
            self.colour_sq_int = [((np.arange(256) - int(target[c])) ** 2).astype(np.uint32) for c in range(3)]

    def differs(self, pixels: np.ndarray) -> np.ndarray:
        """Boolean array (pixels.shape[:-1]): True where a pixel is NOT similar to the reference."""
        if not self.matte:
            sq = self.colour_sq_int
            total = np.take(sq[0], pixels[..., 0])
            total += np.take(sq[1], pixels[..., 1])
            total += np.take(sq[2], pixels[..., 2])
            return total > self.int_bound
        alpha = pixels[..., 3]
        alpha_ok = np.take(self.alpha_ok, alpha)
        if not self.colour_matters:
            return ~alpha_ok
        scale = np.take(self.scale, alpha)
        distance = np.take(self.alpha_distance, alpha) * 3.0
        for c in range(3):
            distance = distance + np.take(self.colour_sq[c], pixels[..., c]) * scale
        similar = alpha_ok & (np.take(self.transparent, alpha) | (distance <= self.fuzz2_x3))
        return ~similar


def _first_hit(arr: np.ndarray, sim: _Similarity, axis: int, from_end: bool) -> int | None:
    """Index along ``axis`` (0 rows, 1 columns) of the first line, scanning from the start or the
    end, that holds a pixel differing from the reference; None when every pixel is similar.

    Scanning from the edge in growing blocks touches only the border plus a little: an image with
    no border is decided after a few lines.
    """
    n = arr.shape[axis]
    block, done = 2, 0
    while done < n:
        size = min(block, n - done)
        if from_end:
            lo, hi = n - done - size, n - done
        else:
            lo, hi = done, done + size
        strip = arr[lo:hi] if axis == 0 else arr[:, lo:hi]
        mask = sim.differs(strip)
        lines = mask.any(axis=1) if axis == 0 else mask.any(axis=0)
        idx = np.flatnonzero(lines)
        if idx.size:
            return lo + int(idx[-1] if from_end else idx[0])
        done += size
        block *= 2
    return None


def trim_box(arr: np.ndarray, fuzz: float) -> TrimResult:
    """The crop of ImageMagick 6 ``-fuzz F -trim`` for an 8-bit image array (H, W, 3 or 4).

    ``fuzz`` is in Q16 units (``fuzz_from_percent(20)`` for ``-fuzz 20%``). As in ImageMagick's
    GetImageBoundingBox: the left and top edges are found against the top-left pixel, the right edge
    against the top-right pixel and the bottom edge against the bottom-left pixel; the colour distance
    includes alpha, and a fully transparent pixel is similar to a fully transparent reference whatever
    its colour. The box is then clipped the way CropImage clips it.
    """
    h, w = arr.shape[:2]
    matte = arr.shape[2] == 4
    top_left, top_right, bottom_left = arr[0, 0], arr[0, w - 1], arr[h - 1, 0]
    sim0 = _Similarity(top_left, fuzz, matte)
    sim1 = sim0 if np.array_equal(top_right, top_left) else _Similarity(top_right, fuzz, matte)
    sim2 = sim0 if np.array_equal(bottom_left, top_left) else _Similarity(bottom_left, fuzz, matte)

    left = _first_hit(arr, sim0, axis=1, from_end=False)
    top = _first_hit(arr, sim0, axis=0, from_end=False)
    right = _first_hit(arr, sim1, axis=1, from_end=True)
    bottom = _first_hit(arr, sim2, axis=0, from_end=True)
    x0 = w if left is None else left
    y0 = h if top is None else top
    # IM starts the right/bottom edges at 0 and only moves them for x > edge: a hit in column 0 or
    # row 0 alone leaves them at 0, which IM treats as "no bounding box".
    xr = right or 0
    yb = bottom or 0
    if xr == 0 or yb == 0:
        return TrimResult(None, (w, h))  # -trim returns a 1x1 transparent image
    if x0 > xr or y0 > yb:
        # The edges cross (possible because similarity to three different corners is not
        # transitive). Debian's ImageMagick 6.9.11 (patched for GHSA-q6h4-6f2h-8hfq) then returns
        # the raw edges as the geometry: width = right edge, height = bottom edge, unadjusted.
        width, height = xr, yb
    else:
        width, height = xr - x0 + 1, yb - y0 + 1
    # CropImage clips the geometry to the image; an empty crop makes -trim leave the image as is.
    crop_w, crop_h = min(width, w - x0), min(height, h - y0)
    if crop_w <= 0 or crop_h <= 0:
        return TrimResult((0, 0, w, h), (w, h))
    return TrimResult((x0, y0, x0 + crop_w, y0 + crop_h), (w, h))


def trim_array(im: Image.Image) -> np.ndarray:
    """The image as the 8-bit array -trim compares: RGB, or RGBA when it has an alpha channel."""
    if im.mode == "RGB" or im.mode == "RGBA":
        return np.asarray(im)
    if has_alpha_channel(im):
        return np.asarray(im.convert("RGBA"))
    return np.asarray(to_rgb_or_rgba(im).convert("RGB"))
