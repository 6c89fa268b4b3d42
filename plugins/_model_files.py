"""Helpers shared by the model-backed steps (wd14, blip): a cheap, reliable identity for a model file."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lorakit.plugin_sdk import Param

_memo: dict[tuple[str, int, int], str] = {}


def model_file_digest(path: str | os.PathLike) -> str:
    """sha256 of a model file, for cache keys: a result cached with one model is not reused with another.

    Files in the Hugging Face cache are symlinks to blobs already named by their sha256, so those
    cost nothing; local files are hashed once per size and modification time.
    """
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def _check_device(value: str) -> None:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError("auto, cpu, cuda or cuda:N")


def device_param() -> Param:
    """The ``device`` option of model steps: where the model runs."""
    return Param("device", str, "auto", "where the model runs: auto (CUDA when present), cpu, cuda or cuda:N",
                 validate=_check_device, type_name="auto, cpu, cuda or cuda:N")


def chosen_device(option: str, ctx_device: str) -> str:
    """The step's own device option wins over the run's (both default to auto)."""
    return ctx_device if option == "auto" else option
