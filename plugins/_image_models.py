"""Helpers shared by the model-backed image steps (upscale, mask): identifying a model file's content."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a model file, remembered per (path, size, mtime) so each file is read once.

    Steps return it from ``cache_token()``: replacing a model under the same path invalidates the
    cached results made with the old one.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:
        return "missing"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]
