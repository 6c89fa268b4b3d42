"""The plugin host: loads pluggy plugins from the ``lorakit`` entry-point group and collects steps.

Built-in steps are registered through lorakit's own entry points, the same way a third-party
plugin is. A plugin that fails to import (or implements a misspelled hook) is reported by name and
skipped; the others still load. ``LORAKIT_LOAD_PLUGINS`` restricts third-party plugins: unset loads
all, an empty value loads only the built-ins, ``a,b`` loads the built-ins plus plugins a and b.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata

import pluggy

from lorakit.plugin_sdk import DatasetStep, ImageStep, LorakitError, SourceStep, Step
from lorakit.plugin_sdk import hookspecs

ENTRY_POINT_GROUP = "lorakit"
ENV_LOAD_PLUGINS = "LORAKIT_LOAD_PLUGINS"
BUILTIN_DISTRIBUTION = "lorakit"
# Options every generated command or pipeline entry already has; a step cannot declare them.
RESERVED_PARAMS = frozenset({"subset", "workers", "resolution", "input_dir", "output_dir", "input_path"})


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    steps: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Host:
    """The loaded plugins and the steps they registered."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo]
    steps: dict[str, type[Step]]

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def step(self, name: str) -> type[Step]:
        try:
            return self.steps[name]
        except KeyError:
            raise LorakitError(f"unknown step '{name}'. Installed steps: {', '.join(sorted(self.steps))}") from None


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV_LOAD_PLUGINS)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _valid_step_class(cls) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        return f"register() was given {cls!r}, not a Step subclass"
    if not issubclass(cls, (ImageStep, DatasetStep, SourceStep)):
        return f"{cls.__name__} must subclass ImageStep, DatasetStep or SourceStep"
    if not cls.name or not cls.name.replace("-", "_").replace("_", "a").isalnum():
        return f"{cls.__name__}.name must be a non-empty word (letters, digits, - or _), not {cls.name!r}"
    if not cls.summary:
        return f"{cls.__name__} (step '{cls.name}') has no summary"
    taken = {p.name for p in cls.params} & RESERVED_PARAMS
    if taken:
        return (f"{cls.__name__} (step '{cls.name}') declares parameter(s) {', '.join(sorted(taken))}, "
                f"reserved by the host ({', '.join(sorted(RESERVED_PARAMS))})")
    return None


def load_host(extra_plugins: list[object] | None = None) -> Host:
    """Build a Host from the installed entry points (plus ``extra_plugins`` objects, for tests)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    allowed = _allowed()
    infos: list[PluginInfo] = []
    steps: dict[str, type[Step]] = {}
    candidates: list[tuple[PluginInfo, object | None]] = []

    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        dist = ep.dist.name if ep.dist else "?"
        builtin = dist.lower() == BUILTIN_DISTRIBUTION
        if not builtin and allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else "?", ep.value, builtin)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the host down
            info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
            candidates.append((info, None))
            continue
        candidates.append((info, module))
    for i, obj in enumerate(extra_plugins or []):
        name = getattr(obj, "__name__", f"plugin{i}")
        candidates.append((PluginInfo(name, "(in-process)", "", name, False), obj))

    for info, module in candidates:
        infos.append(info)
        if module is None:
            continue
        try:
            pm.register(module, name=f"{info.distribution}:{info.name}")
            pm.check_pending()
        except Exception as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            info.error = f"{type(exc).__name__}: {exc}"
            continue
        info.hooks = sorted(h.name for h in pm.get_hookcallers(module) or [])
        registered: list[type[Step]] = []
        try:
            hook_impls = [impl for impl in pm.hook.register_steps.get_hookimpls() if impl.plugin is module]
            for impl in hook_impls:
                impl.function(register=registered.append)
        except Exception as exc:
            pm.unregister(module)
            info.error = f"register_steps failed: {type(exc).__name__}: {exc}"
            continue
        problems = [p for p in map(_valid_step_class, registered) if p]
        clashes = [c.name for c in registered if c.name in steps and steps[c.name] is not c]
        if problems or clashes:
            pm.unregister(module)
            info.error = "; ".join(problems + [f"step name '{n}' is already taken by another plugin" for n in clashes])
            continue
        for cls in registered:
            steps[cls.name] = cls
            info.steps.append(cls.name)
    return Host(pm=pm, plugins=infos, steps=steps)


@lru_cache(maxsize=1)
def get_host() -> Host:
    """The process-wide host (entry points are read once)."""
    return load_host()


def warn_failed(host: Host, stream=None) -> None:
    stream = stream or sys.stderr
    for info in host.failed:
        print(f"warning: plugin '{info.name}' ({info.distribution}) was skipped: {info.error}", file=stream)
