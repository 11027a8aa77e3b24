"""Typed configs: frozen dataclasses that TOML and JSON map onto one to one.

An unknown key is an error naming the key and the accepted ones; a value of the wrong type
is an error naming the key and the type it needs.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kiln.errors import KilnError, first_line

C = TypeVar("C")


def _coerce(cls, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    wanted = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise KilnError(f"{cls.__name__}: key {name!r} needs {wanted}, got {value!r}")


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build a config dataclass from a dict; unknown keys and wrong types are KilnErrors."""
    if not isinstance(data, dict):
        raise KilnError(f"{where}: expected a table of {cls.__name__} keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KilnError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(cls, k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError, OverflowError) as exc:   # a config's own checks beyond types
        raise KilnError(f"{where}: {first_line(exc)}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line KilnError."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise KilnError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise KilnError(f"config file {path} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
    except OSError as exc:
        raise KilnError(f"cannot read config file {path}: {exc.strerror}") from None


def load_toml(cls: type[C], path: str | Path) -> C:
    return from_dict(cls, read_toml(path), str(path))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config: Any) -> str:
    lines = []
    for key, value in to_dict(config).items():
        if value is None:
            continue   # TOML has no null: an absent key means the default
        lines.append(f"{key} = {json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)}")
    return "\n".join(lines) + "\n"
