"""Realistic dataset pictures for the image benches, built from the photos that ship inside the
scikit-image wheel (``skimage/data``, BSD-3-Clause; nothing is downloaded).

``make_photo_set(folder, count)`` writes ``count`` pictures of about one megapixel (SDXL bucket
shapes, 832x1216 to 1216x832) the way scraped training images look: a photo (random crop of one of
nine colour photos or six grey ones, camera grain added) inside padding borders of uneven width,
white or a solid light colour; every third picture is RGBA with a transparent surround (a hard
rectangle or a feathered oval cut-out), a few opaque ones are RGBA with an alpha that is 255
everywhere (what many editors save). Formats are mixed: PNG, JPEG (some re-encoded twice, so the
borders carry JPEG noise that only a fuzz trim removes), lossy and lossless WEBP, BMP.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOUR_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
                 "motorcycle_left.png", "motorcycle_right.png", "ihc.png"]
GREY_PHOTOS = ["camera.png", "moon.png", "coins.png", "grass.png", "gravel.png", "brick.png"]
CANVASES = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216)]


def skimage_data_dir() -> Path:
    """The folder of photos bundled in the scikit-image wheel (``pip install scikit-image``)."""
    try:
        import skimage
    except ImportError:
        raise SystemExit("these benches need scikit-image for its bundled sample photos: pip install scikit-image")
    folder = Path(skimage.__file__).parent / "data"
    missing = [n for n in COLOUR_PHOTOS + GREY_PHOTOS if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"scikit-image at {folder} lacks bundled photos {missing}")
    return folder


@dataclass
class PhotoInput:
    path: Path
    transparent: bool  # has pixels that are not fully opaque
    opaque_rgba: bool  # RGBA file whose alpha is 255 everywhere


def _photo(rng: np.random.Generator, photos: list[Image.Image], size: tuple[int, int], grain: np.ndarray) -> Image.Image:
    src = photos[int(rng.integers(len(photos)))]
    w, h = src.size
    scale = float(rng.uniform(0.55, 1.0))
    cw, ch = max(64, int(w * scale)), max(64, int(h * scale))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = src.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.resize(size, Image.Resampling.LANCZOS)
    # Camera grain (upscaled photos are too smooth): a window of one noise field, at a random offset.
    arr = np.asarray(crop, dtype=np.int16)
    gy, gx = int(rng.integers(0, grain.shape[0] - size[1] + 1)), int(rng.integers(0, grain.shape[1] - size[0] + 1))
    noise = grain[gy:gy + size[1], gx:gx + size[0]]
    arr = arr + (noise if arr.ndim == 3 else noise[..., 0])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), crop.mode)


def make_photo_set(folder: Path, count: int = 200, seed: int = 0) -> list[PhotoInput]:
    folder.mkdir(parents=True, exist_ok=True)
    data = skimage_data_dir()
    colour = [Image.open(data / n).convert("RGB") for n in COLOUR_PHOTOS]
    grey = [Image.open(data / n).convert("L") for n in GREY_PHOTOS]
    rng = np.random.default_rng(seed)
    grain = np.round(rng.normal(0.0, 2.5, (1400, 1400, 3))).astype(np.int16)
    made: list[PhotoInput] = []
    for i in range(count):
        cw, ch = CANVASES[int(rng.integers(len(CANVASES)))]
        # Uneven borders; about one picture in eight has none on some side.
        left, top, right, bottom = (0 if rng.random() < 0.12 else int(rng.integers(12, 140)) for _ in range(4))
        size = (cw - left - right, ch - top - bottom)
        is_grey = rng.random() < 0.15
        content = _photo(rng, grey if is_grey else colour, size, grain)
        transparent = i % 3 == 0
        opaque_rgba = False
        if transparent:
            canvas = Image.new("RGBA", (cw, ch), (0, 0, 0, 0))
            rgba = content.convert("RGBA")
            if rng.random() < 0.5:  # a feathered oval cut-out: soft partial transparency
                mask = Image.new("L", size, 0)
                ImageDraw.Draw(mask).ellipse((size[0] * 0.05, size[1] * 0.05, size[0] * 0.95, size[1] * 0.95), fill=255)
                rgba.putalpha(mask.filter(ImageFilter.GaussianBlur(12)))
            canvas.paste(rgba, (left, top))
            ext = ".png" if rng.random() < 0.75 else ".webp"
        else:
            border = (255, 255, 255) if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(200, 256, 3))
            canvas = Image.new("RGB", (cw, ch), border)
            canvas.paste(content.convert("RGB"), (left, top))
            if is_grey and border[0] == border[1] == border[2] and rng.random() < 0.5:
                canvas = canvas.convert("L")
            roll = rng.random()
            ext = ".jpg" if roll < 0.45 else ".png" if roll < 0.8 else ".webp" if roll < 0.92 else ".bmp"
            if ext == ".png" and canvas.mode == "RGB" and rng.random() < 0.3:
                canvas = canvas.convert("RGBA")  # alpha 255 everywhere, as many editors save
                opaque_rgba = True
        path = folder / f"photo{i:04d}{ext}"
        if ext == ".jpg":
            if rng.random() < 0.4:  # re-encoded: a download of a re-saved picture
                buf = io.BytesIO()
                canvas.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
                canvas = Image.open(buf).convert(canvas.mode)
            canvas.save(path, "JPEG", quality=int(rng.integers(75, 93)))
        elif ext == ".webp":
            if transparent and rng.random() < 0.5:
                canvas.save(path, "WEBP", lossless=True, method=0)
            else:
                canvas.save(path, "WEBP", quality=int(rng.integers(80, 95)))
        elif ext == ".png":
            canvas.save(path, "PNG", compress_level=1)  # how the inputs were compressed does not matter here
        else:
            canvas.save(path, "BMP")
        made.append(PhotoInput(path, transparent, opaque_rgba))
    return made
