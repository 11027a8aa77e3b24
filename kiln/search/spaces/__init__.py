"""Search spaces: each turns an Optuna trial into a candidate (define-by-run) and scores it.

A space is registered under a kind name with its own frozen config (the `[space]` table of a
search config). Its three jobs, small on purpose:

    suggest(trial) -> candidate          ask the trial for parameters (conditional is fine)
    score(candidate, report) -> Scores   measure the objectives; `report(step, partial)` along
                                         the way lets the engine prune or stop the trial early
    export(params, out) -> [paths]       write a best trial as ready-to-run config files

`grid()` lists every parameter's choices for the grid sampler when the space is finite.
Heavy state (a model, a dataset) is loaded once per process in `setup()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.registry import Registry
from kiln.search.objectives import Scores

Report = Callable[[int, Scores], None]
SPACES: Registry[type["Space"]] = Registry("search space", plugins=(
    "kiln.search.spaces.python", "kiln.search.spaces.quant", "kiln.search.spaces.arch", "kiln.search.spaces.compress"))


@dataclass(frozen=True)
class Context:
    """What every space may need besides its own config."""
    wanted: frozenset[str]        # the objectives the study optimises
    seed: int = 0
    hardware: str = "h100"


class Space(ABC):
    Config: type = object
    # the same parameters always score the same (seeded training, fixed subsets): a trial that
    # repeats a completed one's parameters takes its values instead of running again
    deterministic: bool = True

    def __init__(self, config: Any, ctx: Context):
        self.config = config
        self.ctx = ctx
        self._ready = False

    def setup(self) -> None:
        """Load what every trial shares (once per process)."""

    def check(self) -> None:
        """Raise a KilnError when the space has no valid point (after setup, before any trial)."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self.check()
            self._ready = True

    @abstractmethod
    def suggest(self, trial) -> Any: ...

    @abstractmethod
    def score(self, candidate: Any, report: Report) -> Scores: ...

    def grid(self) -> dict[str, list] | None:
        return None

    def initial_points(self) -> list[dict]:
        """Parameter sets a new study runs first (enqueued, counted in the budget)."""
        return []

    def export(self, params: dict, out: Path) -> list[Path]:
        return []


def register_space(kind: str):
    def deco(cls):
        cls.kind = kind
        return SPACES.register(kind)(cls)
    return deco


def space_config(table: dict, where: str) -> tuple[type[Space], Any]:
    """(space class, its typed config) for a `[space]` table; unknown kinds and keys are KilnErrors."""
    table = dict(table)
    kind = table.pop("kind", None)
    if not isinstance(kind, str):
        raise KilnError(f"{where}: needs kind = NAME; known: {', '.join(SPACES.names())}")
    cls = SPACES.get(kind)
    return cls, from_dict(cls.Config, table, f"{where} ({kind})")


def build_space(table: dict, ctx: Context, where: str = "search config.space") -> Space:
    cls, cfg = space_config(table, where)
    return cls(cfg, ctx)
