"""Exceptions a step or the host raises; the CLI turns them into one clear line, no traceback."""
from __future__ import annotations


class LorakitError(Exception):
    """A mistake the user can fix (bad config, missing folder, missing model file).

    The CLI prints the message and exits with a non-zero code; no traceback is shown.
    """


class ParamError(LorakitError):
    """A step parameter failed validation. Names the step, the key, the value and what was expected."""

    def __init__(self, step: str, key: str, value, expected: str, where: str | None = None):
        self.step, self.key, self.value, self.expected, self.where = step, key, value, expected, where
        loc = f"{where}: " if where else ""
        super().__init__(f"{loc}step '{step}': parameter '{key}' = {value!r} is invalid: expected {expected}")


class ManyErrors(LorakitError):
    """Several independent mistakes found in one check (a pipeline, a step's parameters), reported
    together so the user fixes them in one go. ``errors`` holds each one; the message lists them all.
    ``title`` may hold ``{n}``, the number of errors."""

    def __init__(self, errors: list[LorakitError], title: str | None = None):
        self.errors = [e for err in errors for e in (err.errors if isinstance(err, ManyErrors) else [err])]
        head = (title or "{n} problems").format(n=len(self.errors))
        Exception.__init__(self, head + ":\n" + "\n".join(f"  - {e}" for e in self.errors))


class SkipImage(Exception):
    """Raised by a step to set one image aside with a reason; the run goes on with the others.

    Use it for images a step decides not to keep (too small, a duplicate, a bad mask). Any other
    exception raised while processing an image also sets it aside, with the exception as the reason.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ModelNotFound(LorakitError):
    """A model file or hub repo is not available locally; the message says what to download and where."""


# Errors about where files go, not about one image: they stop the run with a clear message.
_STORAGE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up",
                   "EFBIG": "the file is larger than this system allows", "EROFS": "the folder is on a read-only disk",
                   "EACCES": "permission denied", "EPERM": "operation not permitted"}


def _sqlite_kind(exc: BaseException) -> str | None:
    """The errno name a SQLite error stands for (the work store's index is a SQLite file)."""
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "disk is full" in text:
            return "ENOSPC"
        if "readonly" in text or "read-only" in text:
            return "EROFS"
        if "unable to open" in text or "disk i/o error" in text:
            return "EACCES"
    return None


def _kind(exc: BaseException) -> str | None:
    import errno

    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, "")
        return name if name in _STORAGE_ERRNOS else None
    return _sqlite_kind(exc)


def is_storage_error(exc: BaseException) -> bool:
    """True for an error about the disk or permissions (full, read-only, not writable), from a file
    write or from the work store's SQLite index."""
    return _kind(exc) is not None


def storage_error_message(exc: BaseException) -> str | None:
    """One actionable sentence for a storage error (None for other exceptions)."""
    name = _kind(exc)
    if name is None:
        return None
    where = getattr(exc, "filename", None) or ("a file" if isinstance(exc, OSError) else "the work store's index")
    advice = {
        "ENOSPC": "free some space (or choose an output or cache_dir on another disk) and run again",
        "EDQUOT": "free some space (or choose an output or cache_dir on another disk) and run again",
        "EFBIG": "choose an output on a disk without that limit",
        "EROFS": "choose an output on a writable disk",
    }.get(name, "check the folder's permissions, or choose an output you can write to")
    verb = "access" if name in ("EACCES", "EPERM") else "write"
    code = f"[Errno {exc.errno}] {name}" if isinstance(exc, OSError) else f"{name}: {exc}"
    return f"cannot {verb} {where}: {_STORAGE_ERRNOS[name]} ({code}). Finished results are kept: {advice}."
