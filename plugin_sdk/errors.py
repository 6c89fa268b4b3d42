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


def is_storage_error(exc: BaseException) -> bool:
    """True for an OSError about the disk or permissions (full, read-only, not writable)."""
    import errno

    return isinstance(exc, OSError) and exc.errno in {getattr(errno, n) for n in _STORAGE_ERRNOS if hasattr(errno, n)}


def storage_error_message(exc: BaseException) -> str | None:
    """One actionable sentence for a storage OSError (None for other exceptions)."""
    import errno

    if not is_storage_error(exc):
        return None
    name = errno.errorcode.get(exc.errno, "")
    where = exc.filename or "a file"
    advice = {
        "ENOSPC": "free some space (or choose an output or cache_dir on another disk) and run again",
        "EDQUOT": "free some space (or choose an output or cache_dir on another disk) and run again",
        "EFBIG": "choose an output on a disk without that limit",
        "EROFS": "choose an output on a writable disk",
    }.get(name, "check the folder's permissions, or choose an output you can write to")
    verb = "access" if name in ("EACCES", "EPERM") else "write"
    return (f"cannot {verb} {where}: {_STORAGE_ERRNOS[name]} ([Errno {exc.errno}] {name}). Finished results are "
            f"kept: {advice}.")
