"""Safe image reading and atomic writing, shared by the host and every step.

* Decoding is capped (decompression bombs): images over ``MAX_PIXELS`` are refused with a clear
  error instead of allocating gigabytes.
* Every write goes to a temporary file in the destination folder, is flushed, then renamed over the
  target, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from struct import error as struct_error
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image

# 16k x 16k. Larger pictures exist but are not training data; raise it with LORAKIT_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("LORAKIT_MAX_PIXELS", str(16384 * 16384)))
# One cap for every decode in the process: Pillow's own bomb check (used by any Image.open in core,
# plugins, the trainer or a third-party library) then never refuses an image under MAX_PIXELS.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# PNG compression used for images the pipeline writes. zlib level 3 is ~3x faster than the default 6
# and the files are a few percent larger: a good trade for a dataset that is rewritten often.
PNG_COMPRESS_LEVEL = 3

_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Temporary files of atomic writes: ``.lorakit-tmp-`` + 8 random characters + the target's suffix.
# Only names of exactly this shape are ever deleted as partial files of a killed run.
TMP_PREFIX = ".lorakit-tmp-"
_TMP_NAME = re.compile(r"\.lorakit-tmp-[a-z0-9_]{8}(\.[A-Za-z0-9]{1,10})?")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".jxl"}


class ImageError(ValueError):
    """An image file cannot be used: empty, truncated, not an image, or too large to decode."""


def _register_avif() -> None:
    try:  # Pillow >= 11.3 ships AVIF support; older versions may have the plugin package.
        from PIL import AvifImagePlugin  # noqa: F401
    except ImportError:
        try:
            import pillow_avif  # noqa: F401
        except ImportError:
            pass


_register_avif()


@contextmanager
def _guarded(path: Path, limit: int | None) -> Iterator[None]:
    """Decode under a pixel cap; turn every way a file can be unusable into one clear ImageError."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror})") from None
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            if limit is not None:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as a possible decompression bomb: over the decode limit of {limit} "
                         f"pixels ({exc}; raise LORAKIT_MAX_PIXELS if it is genuine)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised content, whatever the extension says)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        raise ImageError(f"{path}: broken or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_size(path: Path, im: Image.Image, limit: int) -> None:
    w, h = im.size
    if w * h > limit:
        raise ImageError(f"{path}: {w}x{h} = {w * h} pixels is over the decode limit of {limit} "
                         "(possible decompression bomb; raise LORAKIT_MAX_PIXELS if it is genuine)")


def open_image(path: str | os.PathLike, max_pixels: int | None = None,
               reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image, refusing empty, broken, non-image and oversized files.

    The returned image is loaded (the file is closed). Raises ImageError with the file name and the
    problem in the message. With ``reduce_to``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale where
    both sides stay at least that size (the decoder's DCT scaling: several times cheaper, for work
    that shrinks the picture anyway, such as a perceptual hash); ``im.info["full_size"]`` then
    holds the size of the whole picture. Other formats are decoded whole.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    with _guarded(path, limit):
        im = Image.open(path)
        _check_size(path, im, limit)
        if reduce_to is not None and im.format == "JPEG":
            full = im.size
            im.draft(im.mode, reduce_to)
            im.info["full_size"] = full
        im.load()
    return im


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (sha256 by default; md5 for booru checks)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height from the header only: nothing is decoded, so any size can be measured.

    Raises ImageError naming the file when it is not a readable image."""
    path = Path(path)
    with _guarded(path, None):
        with Image.open(path) as im:
            return im.size


@contextmanager
def image_header(path: str | os.PathLike, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The opened, not decoded, image (size, mode, info) for steps that decide from the header.

    Refuses what ``open_image`` refuses (ImageError), so a later decode of the same file is safe."""
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    with _guarded(path, limit):
        im = Image.open(path)
        try:
            _check_size(path, im, limit)
        except ImageError:
            im.close()
            raise
    try:
        yield im  # the caller's code runs outside the guard: its own errors stay its own
    finally:
        im.close()


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=target.suffix, dir=target.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def is_partial_file(path: str | os.PathLike) -> bool:
    """True for a temporary file that ``atomic_path`` made (and a killed process left behind)."""
    return bool(_TMP_NAME.fullmatch(Path(path).name))


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def save_image(image: Image.Image, target: str | os.PathLike, format: str | None = None, **options) -> Path:
    """Save a PIL image atomically; PNG by default with the pipeline's compression level."""
    target = Path(target)
    fmt = (format or {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(target.suffix.lower(), "PNG")).upper()
    if fmt == "PNG":
        options.setdefault("compress_level", PNG_COMPRESS_LEVEL)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return atomic_write_bytes(target, buf.getvalue())


def verify_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """Cheap check that a file is a usable image (header, size cap, structure) without decoding it.

    Returns (width, height); raises ImageError naming the file and the problem.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    with _guarded(path, limit):
        with Image.open(path) as im:
            _check_size(path, im, limit)
            size = im.size
            im.verify()
    return size


def degenerate_reason(image: Image.Image, tolerance: float = 1.0) -> str | None:
    """Why ``image`` looks like a broken model output (all black, all white, one flat colour), or
    None. A model step calls it on what it made: a random or wrong model gives such pictures."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    if arr.size == 0:
        return "empty picture"
    if float(arr.std(axis=(0, 1)).max()) > tolerance:
        return None
    mean = arr.mean(axis=(0, 1))
    if mean.max() < 4:
        return "the result is all black"
    if mean.min() > 251:
        return "the result is all white"
    return "the result is one flat colour (rgb %d,%d,%d)" % tuple(int(round(v)) for v in mean)
