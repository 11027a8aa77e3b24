"""kiln.config: one recursive loader and writer. Oracle: the round trip gives back an equal
config, through TOML (tomllib reads kiln's writer) and through JSON."""
from __future__ import annotations

import enum
import json
import tomllib
from dataclasses import dataclass

import pytest

from kiln.config import from_dict, to_dict, to_toml
from kiln.errors import KilnError


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    n: int = 1
    color: Color = Color.RED


@dataclass(frozen=True)
class Outer:
    VERSION = 2
    name: str = "x"
    names: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)
    inner: Inner = Inner()
    items: tuple[Inner, ...] = ()
    table: dict | None = None
    scale: float | None = None


CASES = [
    Outer(),
    Outer('quote " and \\ backslash', ("a", "b c"), (3, 0.5), Inner(2, Color.BLUE), (Inner(), Inner(5, Color.BLUE)),
          {"k": 1, "nested": {"z": [1, 2], "s": "t"}}, 1e-7),
    Outer("ünïcode", scale=float("inf")),
]


@pytest.mark.parametrize("config", CASES)
def test_round_trip_through_toml_and_json(config):
    assert from_dict(Outer, tomllib.loads(to_toml(config))) == config
    assert from_dict(Outer, json.loads(json.dumps(to_dict(config)))) == config


@pytest.mark.parametrize("table, message", [
    ({"nope": 1}, "unknown key 'nope'; accepted: name, names"),
    ({"inner": {"color": "green"}}, "key 'color' is 'green'; accepted: red, blue"),
    ({"pair": [1]}, "key 'pair' needs 2 items, got 1"),
    ({"items": [{"n": "one"}]}, "key 'n' needs int"),
    ({"items": [{"m": 1}]}, r"outer.items\[0\]: unknown key .m."),
    ({"version": 3}, "version 3 is not one this kiln reads"),
    ({"inner": 5}, "key .inner. needs a table"),
])
def test_bad_tables_are_one_line_errors_naming_the_key(table, message):
    with pytest.raises(KilnError, match=message):
        from_dict(Outer, table, "outer")


def test_version_up_to_the_class_version_is_accepted_and_not_a_field():
    assert from_dict(Outer, {"version": 2, "name": "y"}) == Outer(name="y")
