"""Gallery thumbnails: made once per image content and kept in the dataset's work store.

A thumbnail is keyed by the image file's content (its SHA-256 from the manifest, or its size and
modification time for set-aside copies), so a re-run that changes an image makes a new one and an
unchanged image is never decoded twice. ``lorakit review`` makes the missing ones in a background
thread as soon as it starts (gallery order), so pages after the first open from the cache. They live in ``DATASET/.lorakit/review/thumbs/`` (safe to
delete, like the rest of ``.lorakit``).
"""
from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps

from lorakit.plugin_sdk import MAX_PIXELS, atomic_write_bytes

THUMB_SIDE = 256


class ThumbnailError(ValueError):
    """The image cannot be made into a thumbnail (broken, too large)."""


class Thumbnails:
    def __init__(self, cache_dir: Path, side: int = THUMB_SIDE):
        self.dir = Path(cache_dir)
        self.side = side
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def key(self, image: Path, content: str | None) -> str:
        if not content:
            st = image.stat()
            content = f"{image}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha1(f"{content}|{self.side}".encode()).hexdigest()

    def path_for(self, image: Path, content: str | None = None) -> Path:
        """The cached thumbnail of ``image`` (a JPEG), made now if it is not there yet."""
        key = self.key(image, content)
        target = self.dir / key[:2] / f"{key}.jpg"
        if target.is_file():
            return target
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # two requests for the same new thumbnail make it once
            if not target.is_file():
                atomic_write_bytes(target, self.render(image))
        return target

    def is_cached(self, image: Path, content: str | None = None) -> bool:
        key = self.key(image, content)
        return (self.dir / key[:2] / f"{key}.jpg").is_file()

    def prefetch(self, items: Iterable[tuple[Path, str | None]], stop: threading.Event) -> int:
        """Make the missing thumbnails of ``items`` (path, content) in order, until done or ``stop``;
        returns how many were made. Broken images are skipped (the page shows the reason on request)."""
        made = 0
        for image, content in items:
            if stop.is_set():
                break
            try:
                if not self.is_cached(image, content):
                    self.path_for(image, content)
                    made += 1
            except (ThumbnailError, OSError):
                continue
        return made

    def thumbnail(self, image: Path, content: str | None = None) -> bytes:
        """The thumbnail's bytes (small: read whole, which is faster to send than streaming a file)."""
        return self.path_for(image, content).read_bytes()

    def render(self, image: Path, side: int | None = None) -> bytes:
        side = side or self.side
        try:
            with Image.open(image) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ThumbnailError(f"{image.name}: {im.width}x{im.height} is over the pixel limit")
                im.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
                im = ImageOps.exif_transpose(im)
                im.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                if im.mode in ("RGBA", "LA", "P", "PA"):
                    im = im.convert("RGBA")
                    flat = Image.new("RGB", im.size, (128, 128, 128))
                    flat.paste(im, mask=im.getchannel("A"))
                    im = flat
                elif im.mode != "RGB":
                    im = im.convert("RGB")
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=82)
                return buf.getvalue()
        except ThumbnailError:
            raise
        except Exception as exc:  # broken or unreadable: the page shows a placeholder with the reason
            raise ThumbnailError(f"{image.name}: cannot make a thumbnail ({type(exc).__name__}: {exc})") from None
