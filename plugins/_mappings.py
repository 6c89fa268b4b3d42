"""Per-subset parameters: ``{subset: value}`` in pipeline.yaml, ``subset=value,...`` on the command line."""
from __future__ import annotations

from typing import Any, Callable


class SubsetMapping:
    """A Param type converting ``{outfit1: red_dress}`` or ``"outfit1=red_dress,outfit2=x"`` to a dict.

    ``convert`` turns each value into its final form and raises ValueError when it cannot. On the
    command line a list value is written with ``+`` between items: ``outfit1=red_dress+hat_trigger``.
    """

    def __init__(self, convert: Callable[[Any], Any], example: str):
        self.convert = convert
        self.example = example
        self.__name__ = f"a mapping subset -> value, e.g. {example}"

    def __call__(self, value: Any) -> dict[str, Any]:
        if isinstance(value, str):
            pairs = []
            for part in value.split(","):
                if not part.strip():
                    continue
                name, sep, val = part.partition("=")
                if not sep or not name.strip():
                    raise ValueError(part)
                pairs.append((name.strip(), val.strip()))
        elif isinstance(value, dict):
            pairs = list(value.items())
        else:
            raise ValueError(value)
        return {str(name): self.convert(val) for name, val in pairs}


def string_list(value: Any) -> list[str]:
    """``a`` -> [a]; ``a+b`` -> [a, b]; a YAML list stays a list of strings."""
    if isinstance(value, str):
        return [v.strip() for v in value.split("+") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v).strip() for v in value if str(v).strip()]
    raise ValueError(value)


def one_of(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise ValueError(value)
    return convert


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(value)
