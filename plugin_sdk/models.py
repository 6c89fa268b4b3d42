"""Finding model files: a local file or folder, or a Hugging Face hub repo (using the hub cache).

No step downloads behind the user's back when offline: if the files are neither local nor in the
hub cache, ``ModelNotFound`` says exactly what to download and where to put it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFound
from .images import file_digest


def _looks_like_repo(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model_files(spec: str | os.PathLike, filenames: list[str], what: str) -> dict[str, Path]:
    """Return ``{filename: local path}`` for each of ``filenames``.

    ``spec`` is a local folder that holds the files, a local file (when one file is needed), or a
    hub repo id such as ``SmilingWolf/wd-vit-tagger-v3`` (taken from the hub cache; downloaded only
    when online and allowed by ``HF_HUB_OFFLINE``).
    """
    path = Path(str(spec)).expanduser()
    if path.is_file() and len(filenames) == 1:
        return {filenames[0]: path}
    if path.is_dir():
        missing = [f for f in filenames if not (path / f).is_file()]
        if missing:
            raise ModelNotFound(f"{what}: folder {path} lacks {', '.join(missing)} (it needs {', '.join(filenames)})")
        return {f: path / f for f in filenames}
    if not _looks_like_repo(str(spec)):
        raise ModelNotFound(f"{what}: {spec} is neither an existing file or folder nor a hub repo id (owner/name)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency
        raise ModelNotFound(f"{what}: huggingface_hub is not installed; pass a local folder instead") from None
    found: dict[str, Path] = {}
    for name in filenames:
        try:
            found[name] = Path(hf_hub_download(str(spec), name))
        except Exception as exc:  # offline, missing repo, missing file: all end the same way for the user
            raise ModelNotFound(
                f"{what}: cannot get {name} from the hub repo {spec} ({type(exc).__name__}). "
                f"Download {', '.join(filenames)} from https://huggingface.co/{spec} into a folder and pass "
                "that folder instead, or run once while online to fill the Hugging Face cache "
                "(set HF_HUB_OFFLINE=1 on a machine without network to fail fast)."
            ) from None
    return found


_DIGESTS: dict[tuple[str, int, int], str] = {}


def model_file_digest(path: str | os.PathLike) -> str:
    """sha256 of a model file, for ``cache_token()``: results made with one model are not reused with another.

    Files in the Hugging Face cache are symlinks to blobs already named by their sha256, so those
    cost nothing; other files are hashed once per (path, size, modification time). A missing file
    gives ``"missing"`` (the step's setup() reports it properly).
    """
    real = Path(os.path.realpath(Path(path).expanduser()))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return real.name
    try:
        stat = real.stat()
    except OSError:
        return "missing"
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(real)
    return _DIGESTS[key]
