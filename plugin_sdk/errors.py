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
