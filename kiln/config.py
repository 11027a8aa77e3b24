"""Typed configs: frozen dataclasses that TOML and JSON map onto one to one.

An unknown key is an error naming the key and the accepted ones; a value of the wrong type
is an error naming the key and the type it needs.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kiln.errors import KilnError, first_line

C = TypeVar("C")


def _options(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def _coerce(where: str, name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names: scalars, enums (by value), nested config dataclasses (from
    tables), tuples and lists (from arrays) and dicts, recursively; anything else is a KilnError."""
    options = _options(hint)
    if value is None and type(None) in options:
        return None
    for t in options:
        origin, args = typing.get_origin(t) or t, typing.get_args(t)
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if t is Any:
            return value
        if isinstance(t, type) and hasattr(t, "from_config"):   # a value type written as one string, e.g. rules.Match
            return t.from_config(value, f"{where}.{name}")
        if isinstance(t, type) and issubclass(t, enum.Enum):
            try:
                return t(value)
            except ValueError:
                accepted = ", ".join(str(m.value) for m in t)
                raise KilnError(f"{where}: key {name!r} is {value!r}; accepted: {accepted}") from None
        if dataclasses.is_dataclass(t) and isinstance(value, dict):
            return from_dict(t, value, f"{where}.{name}")
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            items = (args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args) or (Any,)
            if origin is tuple and len(items) != 1 and len(items) != len(value):
                raise KilnError(f"{where}: key {name!r} needs {len(items)} items, got {len(value)}")
            hints = items * len(value) if len(items) == 1 else items
            out = [_coerce(where, f"{name}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, hints))]
            return tuple(out) if origin is tuple else out
        if origin is dict and isinstance(value, dict):
            kh, vh = args or (Any, Any)
            return {_coerce(where, name, k, kh): _coerce(where, f"{name}.{k}", v, vh) for k, v in value.items()}
        if origin is typing.Literal and value in args:
            return value
    wanted = " or ".join(_type_name(t) for t in options if t is not type(None))
    raise KilnError(f"{where}: key {name!r} needs {wanted}, got {value!r}")


def _type_name(t: Any) -> str:
    origin, args = typing.get_origin(t) or t, typing.get_args(t)
    if origin in (tuple, list):
        items = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else ()
        return f"a list of {_type_name(items[0])}" if items and items[0] is not Any else "a list"
    if origin is dict or dataclasses.is_dataclass(t):
        return "a table"
    return getattr(t, "__name__", str(t))


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build a config dataclass from a dict, recursively (nested configs, tuples, enums); unknown
    keys, wrong types and a `version` newer than the class's `VERSION` are KilnErrors."""
    if not isinstance(data, dict):
        raise KilnError(f"{where}: needs a table, got {data!r}")
    data = dict(data)
    version = data.pop("version", None)
    known = getattr(cls, "VERSION", 1)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= known):
        raise KilnError(f"{where}: version {version!r} is not one this kiln reads (1 to {known})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KilnError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(fields)}")
    missing = [f.name for f in fields.values() if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KilnError(f"{where}: missing key {missing[0]!r}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(where, k, v, hints[k]) for k, v in data.items()}
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
    """A config as plain data that from_dict reads back to an equal config: enums by value, tuples
    as lists, nested configs as tables, None left out (TOML has no null: absent means default)."""
    return _plain(config)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_config"):
        return value.to_config()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    return value


def to_toml(config: Any) -> str:
    """A config (or a plain table) as TOML text that read_toml gives back."""
    table = to_dict(config) if dataclasses.is_dataclass(config) else _plain(config)
    return _toml_table(table, ())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else \
            ("nan" if value != value else "inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(table: dict, path: tuple[str, ...]) -> str:
    lines, nested = [], []
    for key, value in table.items():
        if isinstance(value, dict) or _is_table_array(value):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in nested:
        sub = (*path, _toml_key(key))
        for item in (value if isinstance(value, list) else [value]):
            header = f"[[{'.'.join(sub)}]]" if isinstance(value, list) else f"[{'.'.join(sub)}]"
            text += ("\n" if text else "") + header + "\n" + _toml_table(item, sub)
    return text
