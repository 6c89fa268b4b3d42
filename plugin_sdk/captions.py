"""Reading caption files the way users actually have them: any common encoding, capped in size.

The encoding is found in this order: a byte-order mark (UTF-32, UTF-16, UTF-8), then strict UTF-8,
then the stated fallback, Windows-1252 (the Western Windows code page; Latin-1 for the five bytes it
leaves undefined). NUL characters and stray byte-order marks are removed. A file larger than
``MAX_CAPTION_BYTES`` (64 KiB; change it with LORAKIT_MAX_CAPTION_BYTES) is refused: captions are a
few hundred bytes, and a huge one would end up in the manifest and the LoRA's metadata.
"""
from __future__ import annotations

import codecs
import os
from pathlib import Path

from .images import ImageError

MAX_CAPTION_BYTES = int(os.environ.get("LORAKIT_MAX_CAPTION_BYTES", str(64 * 1024)))
FALLBACK_ENCODING = "cp1252"

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class CaptionError(ImageError):
    """A caption file cannot be used (unreadable, over the size cap): its image is set aside."""


def decode_caption(data: bytes) -> str:
    """Text of a caption file's bytes (BOM, then UTF-8, then Windows-1252), NULs and BOMs removed."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            text = data[len(bom):].decode(encoding, errors="replace")
            break
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = data.decode(FALLBACK_ENCODING)
            except UnicodeDecodeError:
                text = data.decode("latin-1")
    return text.replace("\x00", "").replace("\ufeff", "")


def read_caption(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """The stripped text of a caption file; raises CaptionError naming the file and the problem."""
    limit = MAX_CAPTION_BYTES if max_bytes is None else max_bytes
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise CaptionError(f"{os.fspath(path)}: cannot read caption file ({exc.strerror or exc})") from None
    if len(data) > limit:
        path = Path(path)
        size = path.stat().st_size if path.is_file() else len(data)
        raise CaptionError(f"{path}: caption file is {size} bytes, over the cap of {limit} "
                           "(raise LORAKIT_MAX_CAPTION_BYTES if it is genuine)")
    return decode_caption(data).strip()
