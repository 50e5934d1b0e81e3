"""The JSON form of the benchmarks' dataclasses, both ways, and the one writer of results files.

`jsonable` turns dataclasses (and the mappings, sequences, paths and enums inside them) into what
`json.dumps` takes; `from_dict` builds a dataclass back from that form by field name, converting nested
dataclasses, tuples, enums and paths from its type hints. A key that is neither a field nor a property of
the class (a derived value written for readers, e.g. a record's `ttft_s`) is refused, as is a missing field
without a default: a file and the code that reads it cannot drift apart quietly.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.machine import machine_info

T = TypeVar("T")


class JsonFormError(ValueError):
    """A JSON value does not have the shape of the dataclass asked for; the message names the field."""


def jsonable(value: Any) -> Any:
    """Dataclass instances, mappings, sequences, paths and enums turned into what `json.dumps` takes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def from_dict(cls: type[T], row: object) -> T:
    """The dataclass `cls` built from its JSON form `row` (see the module docstring)."""
    if not isinstance(row, Mapping):
        raise JsonFormError(f"{cls.__name__}: expected a JSON object, got {type(row).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [k for k in row if k not in names and not isinstance(getattr(cls, k, None), property)]
    if unknown:
        raise JsonFormError(f"{cls.__name__} has no field {unknown[0]!r}")
    values = {}
    for name in names:
        if name in row:
            try:
                values[name] = _typed(hints[name], row[name])
            except (TypeError, ValueError) as exc:
                raise JsonFormError(f"{cls.__name__}.{name}: {exc}") from None
    try:
        return cls(**values)
    except TypeError as exc:  # a missing field without a default
        raise JsonFormError(f"{cls.__name__}: {exc}") from None


def _typed(hint: Any, value: Any) -> Any:
    """`value` (JSON) as the type `hint` names."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)] or [Any]
        return _typed(inner, value)
    if value is None or hint is Any or origin is typing.Literal:
        return value
    if origin is tuple:
        items = list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in items)
        return tuple(_typed(a, v) for a, v in zip(args, items, strict=True))
    if origin is list:
        return [_typed(args[0], v) for v in value]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        inner = args[1] if args else Any
        return {k: _typed(inner, v) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum | Path):
        return hint(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def write_json(path: Path, data: object) -> Path:
    """Write `data` (through `jsonable`) as strict JSON (no NaN or Infinity), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_result(path: Path, data: Mapping[str, object]) -> Path:
    """A side benchmark's results file: the machine, then `data`; says where it wrote."""
    write_json(path, {"machine": machine_info(), **data})
    print(f"wrote {path}")
    return path


def read_json(path: Path) -> Any:
    """A results file read back (its JSON value)."""
    return json.loads(path.read_text(encoding="utf-8"))
