"""Declared step parameters: one place for type, default, help and validation.

The host validates every parameter of every step before any work starts, builds the standalone
command's options from these declarations, and exports them to the pipeline JSON Schema.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ManyErrors, ParamError


class ParamErrors(ManyErrors, ParamError):
    """Every invalid parameter of one step (a ``ParamError`` too, for callers that catch that)."""

    def __init__(self, errors: list[ParamError]):
        ManyErrors.__init__(self, errors, f"step '{errors[0].step}': {{n}} invalid parameters")
        first = errors[0]
        self.step, self.key, self.value, self.expected, self.where = (first.step, first.key, first.value,
                                                                       first.expected, first.where)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default value for a parameter that has no default and must be given."""


class Percent(float):
    """A percentage such as ``20%`` (ImageMagick style) or ``20``; the value is the number of percent."""


class Fuzz(float):
    """A colour distance spelled as ImageMagick's ``-fuzz`` reads it: ``20%`` is a percentage of the
    colour range, a bare number such as ``20`` is in absolute units of a 16-bit channel (0..65535).

    The value is the percentage (``20`` absolute is about 0.03%); ``text`` keeps the spelling, so the
    cache key and the help show what the user wrote.
    """

    QUANTUM = 65535.0

    def __new__(cls, percent: float, text: str | None = None):
        obj = super().__new__(cls, percent)
        obj.text = text if text is not None else f"{float(percent):g}%"
        return obj

    def __reduce__(self):
        return (Fuzz, (float(self), self.text))

    def __repr__(self) -> str:
        return repr(self.text)


class ModelRef(str):
    """A model given as a local file or folder, or as a Hugging Face hub repo id (``owner/name``).

    In pipeline.yaml a relative value that names an existing path next to the pipeline file is made
    absolute; anything else is kept as written (a hub id).
    """


class Color(tuple):
    """An RGB colour: a name (``white``), ``#rrggbb``, ``#rgb`` or ``rgb(r,g,b)``; the value is (r, g, b)."""


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    Path: "a path",
    Percent: "a percentage such as 20%",
    Fuzz: "20% (of the colour range) or 20 (of 65535), as ImageMagick's -fuzz",
    Color: "a colour such as white or #ffffff",
    ModelRef: "a model file or folder, or a hub repo id",
    list: "a list of strings",
}

_JSON_TYPES = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    Path: {"type": "string"},
    Percent: {"type": ["string", "number"], "pattern": r"^\s*[0-9.]+\s*%?\s*$"},
    Fuzz: {"type": ["string", "number"], "pattern": r"^\s*[0-9.]+\s*%?\s*$"},
    Color: {"type": "string"},
    ModelRef: {"type": "string"},
    list: {"type": ["array", "string"], "items": {"type": "string"}},
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(type_: type, value: Any) -> Any:
    """Convert a YAML or command-line value to ``type_``; raise ValueError when it cannot."""
    if type_ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if type_ is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        raise ValueError
    if type_ is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if type_ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    if type_ is Path:
        if isinstance(value, (str, Path)) and str(value).strip():
            return Path(str(value)).expanduser()
        raise ValueError
    if type_ is Percent:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return Percent(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%?\s*", value)
            if m:
                return Percent(float(m.group(1)))
        raise ValueError
    if type_ is Fuzz:
        if isinstance(value, Fuzz):
            return value
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return Fuzz(float(value) / (Fuzz.QUANTUM + 1.0) * 100.0, f"{value:g}")
        if isinstance(value, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", value)
            if m and m.group(2):
                return Fuzz(float(m.group(1)), f"{float(m.group(1)):g}%")
            if m:
                return Fuzz(float(m.group(1)) / (Fuzz.QUANTUM + 1.0) * 100.0, f"{float(m.group(1)):g}")
        raise ValueError
    if type_ is ModelRef:
        if isinstance(value, (str, Path)) and str(value).strip():
            return ModelRef(str(value).strip())
        raise ValueError
    if type_ is Color:
        from PIL import ImageColor

        if isinstance(value, (list, tuple)) and len(value) in (3, 4):
            return Color(int(v) for v in value[:3])
        if isinstance(value, str):
            rgb = ImageColor.getrgb(value.strip())
            return Color(rgb[:3])
        raise ValueError
    if type_ is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ValueError
    # A custom converter: any callable that raises ValueError on bad input.
    return type_(value)


@dataclass
class Param:
    """One parameter of a step.

    ``type`` is one of str, int, float, bool, Path, list (of strings), Percent, Fuzz, Color, ModelRef, or any
    callable that converts a value and raises ValueError when it cannot. ``choices`` restricts the
    value; ``min``/``max`` bound numbers; ``validate`` is an extra check that raises ValueError with
    a message. Never declare credentials as parameters (pipeline files get shared): read them from
    the environment or the tool's own config, as the booru step does.
    """

    name: str
    type: Any = str
    default: Any = REQUIRED
    help: str = ""
    choices: Sequence[Any] | None = None
    min: float | None = None
    max: float | None = None
    validate: Callable[[Any], None] | None = None
    type_name: str | None = None
    cli_only: bool = False
    json_schema: dict | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def expected(self) -> str:
        if self.type_name:
            return self.type_name
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        base = _TYPE_NAMES.get(self.type, getattr(self.type, "__name__", "a value"))
        if self.min is not None and self.max is not None:
            return f"{base} from {self.min} to {self.max}"
        if self.min is not None:
            return f"{base} >= {self.min}"
        if self.max is not None:
            return f"{base} <= {self.max}"
        return base

    def convert(self, value: Any, step: str, where: str | None = None) -> Any:
        """Return the validated value, or raise ParamError naming step, key, value and expectation."""
        if value is None and not self.required and self.default is None:
            return None
        try:
            out = _coerce(self.type, value)
        except (ValueError, TypeError):
            raise ParamError(step, self.name, value, self.expected, where) from None
        if self.choices is not None and out not in self.choices:
            raise ParamError(step, self.name, value, "one of " + ", ".join(map(str, self.choices)), where)
        if self.min is not None and out < self.min:
            raise ParamError(step, self.name, value, self.expected, where)
        if self.max is not None and out > self.max:
            raise ParamError(step, self.name, value, self.expected, where)
        if self.validate is not None:
            try:
                self.validate(out)
            except ValueError as exc:
                raise ParamError(step, self.name, value, str(exc) or self.expected, where) from None
        return out

    def to_json_schema(self) -> dict:
        if self.json_schema is not None:
            schema = dict(self.json_schema)
        elif self.choices is not None:
            schema = {"enum": list(self.choices)}
        else:
            schema = dict(_JSON_TYPES.get(self.type, {}))
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        schema["description"] = self.help
        if not self.required:
            schema["default"] = _jsonable(self.default)
        return schema

    def default_text(self) -> str:
        if self.required:
            return "(required)"
        return repr(_jsonable(self.default))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Path, ModelRef)):
        return str(value)
    if isinstance(value, Fuzz):
        return value.text
    if isinstance(value, Percent):
        return f"{float(value):g}%"
    if isinstance(value, Color):
        return "#%02x%02x%02x" % tuple(value)
    if isinstance(value, tuple):
        return list(value)
    return value


class Params:
    """Validated parameter values of one configured step, readable as attributes or as a dict."""

    def __init__(self, values: dict[str, Any]):
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def as_json(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in self._values.items()}

    def __repr__(self) -> str:
        return f"Params({self._values!r})"

    def __getstate__(self):
        return self._values

    def __setstate__(self, state):
        self._values = state


def validate_params(step: str, declared: Sequence[Param], given: dict[str, Any], where: str | None = None) -> Params:
    """Check ``given`` against ``declared``: unknown keys, missing required keys, types and bounds."""
    known = {p.name: p for p in declared}
    # Accept dashes as in the command line (``--min-side``) for underscores (``min_side``).
    given = {str(k).replace("-", "_"): v for k, v in (given or {}).items()}
    errors: list[ParamError] = []
    for key in given:
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            errors.append(ParamError(step, key, given[key], f"a known parameter ({hint}this step takes: {names})", where))
    values = {}
    for p in declared:
        try:
            if p.name in given:
                values[p.name] = p.convert(given[p.name], step, where)
            elif p.required:
                raise ParamError(step, p.name, None, f"a value ({p.expected}); this parameter is required", where)
            else:
                values[p.name] = p.default
        except ParamError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ParamErrors(errors)
    return Params(values)


__all__ = ["Param", "Params", "Percent", "Fuzz", "Color", "ModelRef", "REQUIRED", "validate_params", "field"]
