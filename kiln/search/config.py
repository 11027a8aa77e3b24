"""The search config: one frozen dataclass for the study, one per search space kind.

    # s.toml
    study = "minilm-mp"
    objectives = ["accuracy", "avg_bits"]     # names from kiln.search.objectives
    sampler = "nsga2"                         # tpe, nsga2, random, grid, qmc
    trials = 40
    seed = 0
    reference = [0.5, 32.0]                   # hypervolume reference point (multi-objective)

    [space]
    kind = "mixed-precision"                  # the rest of the table is that kind's config
    source = "runs/minilm-rt"
    bits = [4, 6, 8]

Unknown keys are KilnErrors naming the key, here and in the space's table.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from kiln.config import from_dict, read_toml
from kiln.errors import KilnError
from kiln.search.objectives import resolve
from kiln.search.samplers import PRUNERS, SAMPLERS
from kiln.search.spaces import space_config


@dataclass(frozen=True)
class SearchConfig:
    space: dict = field(default_factory=dict)   # {"kind": NAME, ...that kind's keys}
    objectives: tuple[str, ...] = ("accuracy",)
    sampler: str = "tpe"
    trials: int = 20
    seed: int = 0
    study: str = "kiln-search"
    timeout_s: float = 0.0           # stop starting trials after this long (0 = no limit)
    pruner: str = "none"             # single-objective studies: median or hyperband
    population: int = 0              # NSGA-II population (0: optuna's default, 50)
    mutation_prob: float = 0.0       # NSGA-II: chance each parameter of a child is resampled
                                     # (0: optuna's default, 1 / number of parameters)
    swapping_prob: float = 0.5       # NSGA-II uniform crossover: chance each parameter of a child
                                     # comes from its other parent (0.5, optuna's default, mixes
                                     # evenly; lower keeps children near one parent)
    startup_trials: int = 10         # TPE's random start
    early_stop: bool = True          # multi-objective: stop trials whose partial scores are hopeless
    early_stop_warmup: int = 5       # completed trials before early stopping starts
    early_stop_dominators: int = 3   # stop when this many completed trials dominate at a step
    reference: tuple[float, ...] = ()   # hypervolume reference point, objectives' own units
    hardware: str = "h100"           # profile for the roofline_ms objective
    storage: str = ""                # optuna storage URL; empty: SQLite (or a journal file) in the run dir
    workers: int = 1
    threads: int = 0                 # torch threads of a single-process search (0: torch's default);
                                     # each of several workers always gets 1

    def __post_init__(self):
        checks = [
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}"),
            (self.pruner in PRUNERS, f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}"),
            (self.trials >= 1, f"trials must be >= 1, got {self.trials}"),
            (self.timeout_s >= 0, "timeout_s must be >= 0"),
            (self.population == 0 or self.population >= 2, "population must be 0 (default) or >= 2"),
            (0 <= self.mutation_prob <= 1, f"mutation_prob must be in [0, 1], got {self.mutation_prob}"),
            (0 <= self.swapping_prob <= 1, f"swapping_prob must be in [0, 1], got {self.swapping_prob}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (not self.reference or len(self.reference) == len(self.objectives),
             f"reference has {len(self.reference)} values for {len(self.objectives)} objectives"),
            (bool(self.study.strip()), "study needs a name"),
            (isinstance(self.space, dict) and isinstance(self.space.get("kind"), str),
             "needs a [space] table with kind = NAME"),
        ]
        for ok, message in checks:
            if not ok:
                raise KilnError(f"search config: {message}")

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def parse_search_config(table: dict[str, Any], where: str = "search config") -> SearchConfig:
    """A SearchConfig from a TOML table; the [space] table is checked by its kind's config."""
    table = dict(table)
    if "space" not in table:
        raise KilnError(f"{where}: needs a [space] table with kind = NAME")
    cfg = from_dict(SearchConfig, table, where)
    space_config(cfg.space, f"{where}.space")      # unknown kinds and keys fail here, before any work
    resolve(cfg.objectives)
    return cfg


def load_search_config(path) -> SearchConfig:
    return parse_search_config(read_toml(path), str(path))
