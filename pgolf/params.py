"""params.yaml: the loader. Each section's dataclass lives beside the code that uses it (ModelParams in
pgolf/model.py, CacheParams in pgolf/cache.py, ...); `section` builds one, naming the key of any mistake."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pgolf.errors import InputError

PARAMS_FILE = Path("params.yaml")

T = TypeVar("T")


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


def scalar(params: dict[str, Any], name: str, kind: type[T], path: Path = PARAMS_FILE) -> T:
    """A top-level scalar param such as `seed`."""
    if name not in params:
        raise InputError(f"{path}: missing key {name}")
    value = _number(params[name], kind)
    if not _matches(value, kind):
        raise InputError(f"{path}: {name} is {params[name]!r}; expected {_describe(kind)}")
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
    hints = typing.get_type_hints(cls)
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
    if _matches(number, hint):
        return number
    return int(number) if number.is_integer() and _matches(0, hint) else value


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__
