"""params.yaml: the loader. Each section's dataclass lives beside the code that uses it (ModelParams in
pgolf/model.py, CacheParams in pgolf/cache.py, ...); `section` builds one, naming the key of any mistake.

Every float param must be finite, and a numeric field's bounds are declared beside it,
`lr: Annotated[float, Range(ge=0)]`; `section` enforces both with one message,
`params.yaml: ttt.lr is nan; expected a finite float >= 0`. __post_init__ keeps what ties fields together.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pgolf.errors import InputError

PARAMS_FILE = Path("params.yaml")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric param (None: unbounded on that side), declared as Annotated[float, Range(...)]."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        lo, hi = self.gt if self.ge is None else self.ge, self.lt if self.le is None else self.le
        if lo is not None and hi is not None:
            return f"in {'(' if self.ge is None else '['}{lo:g}, {hi:g}{')' if self.le is None else ']'}"
        if lo is not None:
            return f"{'>' if self.ge is None else '>='} {lo:g}"
        return f"{'<' if self.le is None else '<='} {hi:g}" if hi is not None else ""


def load(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: params file not found (run stages from the repository root)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise InputError(f"{path}: expected a mapping of sections")
    return params


def scalar(params: dict[str, Any], name: str, kind: Any, path: Path = PARAMS_FILE) -> Any:
    """A scalar param such as `seed`, or one key of a section, `verify.max_state_bytes`; kind may be Annotated with a Range."""
    *sections, key = name.split(".")
    for s in sections:
        params = params.get(s)
        if not isinstance(params, dict):
            raise InputError(f"{path}: section '{s}' is missing or not a mapping")
    if key not in params:
        raise InputError(f"{path}: missing key {name}")
    value = _number(params[key], kind)
    if not _matches(value, kind):
        raise InputError(f"{path}: {name} is {params[key]!r}; expected {_describe(kind)}")
    return value


def section(params: dict[str, Any], name: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Build dataclass `cls` from section `name`, naming the key of any mistake."""
    return _build(cls, params.get(name), name, path)


def _build(cls: type[T], raw: Any, prefix: str, path: Path) -> T:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: section '{prefix}' is missing or not a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f"{path}: unknown key {prefix}.{unknown[0]} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for key, field in fields.items():
        if key not in raw:
            if field.default is not dataclasses.MISSING:
                continue
            raise InputError(f"{path}: missing key {prefix}.{key}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], raw[key], f"{prefix}.{key}", path)
            continue
        value = _number(raw[key], hints[key])
        if not _matches(value, hints[key]):
            raise InputError(f"{path}: {prefix}.{key} is {raw[key]!r}; expected {_describe(hints[key])}")
        values[key] = value
    return cls(**values)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: Any, hint: Any) -> Any:
    """A string written as a number, for a numeric key: YAML 1.1 reads `1e6` (no dot) as a string."""
    if not isinstance(value, str) or not _NUMBER.fullmatch(value.strip()):
        return value
    number = float(value)
    if _matches(number, hint, bounded=False):
        return number
    return int(number) if number.is_integer() and _matches(0, hint, bounded=False) else value


def _matches(value: Any, hint: Any, bounded: bool = True) -> bool:
    """value is of type `hint`, and within its Ranges when bounded."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return _matches(value, base, bounded) and (not bounded or all(value in r for r in extras if isinstance(r, Range)))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg, bounded) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item, bounded) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML's .nan and .inf are floats; no param means them
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return " ".join([_describe(base), *(str(r) for r in extras if isinstance(r, Range))])
    if hint is float:
        return "a finite float"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__
