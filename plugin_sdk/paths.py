"""Path confinement: a path that comes from data (a manifest, pipeline.yaml, a kohya config, the
network, an image name) is resolved and must stay inside its root folder, or it is refused.

    from lorakit.plugin_sdk import confined_path, PathEscape

    target = confined_path(ctx.output_dir, f"{subset_folder}/{name}.txt", what="caption")

Every place in lorakit that turns such a string into a file path goes through ``confined_path``
(or ``check_relative`` when only the string is known yet, e.g. while validating pipeline.yaml).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import LorakitError


class PathEscape(LorakitError):
    """A path from data points outside the folder it must stay in (``../x``, ``/etc/x``, a symlink out)."""


def check_relative(relative: str, what: str = "path") -> str:
    """``relative`` as a clean POSIX relative path, or PathEscape: no absolute path, no ``..``, no
    drive letter or backslash, no NUL. ``""`` and ``"."`` mean the root itself and are returned as ``""``."""
    text = str(relative)
    if _plain_relative(text):  # the common case, decided without building a path object
        return text
    if "\x00" in text:
        raise PathEscape(f"{what} {text!r} contains a NUL byte")
    if "\\" in text or (len(text) > 1 and text[1] == ":"):
        raise PathEscape(f"{what} {text!r}: use forward slashes and no drive letter (a path relative to its folder)")
    pure = PurePosixPath(text)
    if pure.is_absolute() or text.startswith("~"):
        raise PathEscape(f"{what} {text!r} is absolute; it must be relative to its folder")
    if ".." in pure.parts:
        raise PathEscape(f"{what} {text!r} leaves its folder ('..' is not allowed)")
    clean = pure.as_posix()
    return "" if clean == "." else clean


def _plain_relative(text: str) -> bool:
    """True for a non-empty relative POSIX path that is already clean (no ``.``/``..``/empty parts,
    no backslash, NUL, drive letter or ``~``): ``check_relative`` returns it unchanged."""
    if not text or text[0] in "/~" or "\\" in text or "\x00" in text or text[1:2] == ":" or text[-1] == "/":
        return False
    return "//" not in text and all(part not in (".", "..") for part in text.split("/"))


def is_within(path: str | os.PathLike, root: str | os.PathLike, real_root: str | None = None) -> bool:
    """True when ``path``, with symlinks resolved, is ``root`` or inside it. A caller checking many
    paths under one root passes ``real_root = os.path.realpath(root)`` once."""
    real, base = os.path.realpath(path), real_root or os.path.realpath(root)  # strings: a dataset has many files
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def confined_path(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """``root / relative`` after checking that it stays inside ``root`` (also through symlinks).

    Returns the joined path (not resolved, so names stay as the user sees them); raises PathEscape
    naming ``what`` and the offending value otherwise.
    """
    rel = check_relative(os.fspath(relative), what)
    target = Path(root) / rel if rel else Path(root)
    if not is_within(target, root):
        raise PathEscape(f"{what} {os.fspath(relative)!r} resolves to {target.resolve()}, outside {Path(root).resolve()}")
    return target
