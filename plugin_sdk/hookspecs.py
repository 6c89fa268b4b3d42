"""The hooks a lorakit plugin can implement. Each is documented in CONTRIBUTING.md with its signature."""
from __future__ import annotations

import pluggy

PROJECT = "lorakit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_steps(register):
    """Register step classes (image, dataset or source steps) by calling ``register(StepClass)``."""


@hookspec
def register_commands(cli):
    """Add extra click commands to the ``lorakit`` command group ``cli``."""
