"""Samplers and pruners by name (one registry each), and the seeding that makes a study's
points a function of the study, not of the process that ran them.

Every sampler is wrapped in `SlotSeeded`: before each trial its random states are seeded from
the config's seed and the trial's slot (its place in the budget, kiln.search.resume.slot).
Seeding once per process would make a resumed search replay the first trials' points (an
8-trial study killed after 4 ended with trials 4-7 equal to 0-3), and workers would need seeds
of their own; seeded per slot, a resumed or parallel search draws what a single unkilled one
would (exactly so for the random and grid samplers, and for TPE when one process runs it).
"""
from __future__ import annotations

import math
import warnings
import zlib
from typing import TYPE_CHECKING, Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.samplers._lazy_random_state import LazyRandomState

from kiln.errors import KilnError
from kiln.registry import Registry
from kiln.search.resume import slot, stamp

if TYPE_CHECKING:     # the config checks its names against these registries: no import back
    from kiln.search.config import SearchConfig
    from kiln.search.spaces import Space

# name -> factory(cfg, space) -> optuna sampler
SAMPLERS: Registry[Callable] = Registry("sampler")
# name -> factory(cfg) -> optuna pruner
PRUNERS: Registry[Callable] = Registry("pruner")


@SAMPLERS.register("tpe")
def _tpe(cfg: SearchConfig, space: Space):
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials, multivariate=True)


@SAMPLERS.register("nsga2")
def _nsga2(cfg: SearchConfig, space: Space):
    return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.population or 50,
                                         mutation_prob=cfg.mutation_prob or None, swapping_prob=cfg.swapping_prob)


@SAMPLERS.register("random")
def _random(cfg: SearchConfig, space: Space):
    return optuna.samplers.RandomSampler(seed=cfg.seed)


@SAMPLERS.register("qmc")
def _qmc(cfg: SearchConfig, space: Space):
    # the sequence's position is a counter in the study: resumed and parallel searches go on
    # along it; only its independent sampler (parameters outside the QMC space) is slot-seeded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=cfg.seed, scramble=True, warn_independent_sampling=False)


@SAMPLERS.register("grid")
def _grid(cfg: SearchConfig, space: Space):
    grid = space.grid()
    if grid is None:
        raise KilnError(f"search config: the grid sampler needs a finite space; {space.kind!r} has "
                        "continuous parameters (use tpe, random or qmc)")
    if grid_size(space) > 1_000_000:
        raise KilnError(f"search config: the grid sampler would walk {grid_size(space):.3g} points of "
                        f"{space.kind!r}; use tpe, nsga2, random or qmc")
    return optuna.samplers.GridSampler(grid, seed=cfg.seed)


def grid_size(space: Space) -> int | None:
    grid = space.grid()
    return math.prod(len(v) for v in grid.values()) if grid else None


@PRUNERS.register("none")
def _no_pruner(cfg: SearchConfig):
    return optuna.pruners.NopPruner()


@PRUNERS.register("median")
def _median(cfg: SearchConfig):
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


@PRUNERS.register("hyperband")
def _hyperband(cfg: SearchConfig):
    return optuna.pruners.HyperbandPruner()


def make_sampler(cfg: SearchConfig, space: Space):
    """The configured sampler, seeded per slot."""
    return SlotSeeded(SAMPLERS.get(cfg.sampler)(cfg, space), cfg.seed)


def make_pruner(cfg: SearchConfig):
    # Optuna's pruners do not handle several objectives: those use kiln's early stop instead
    return PRUNERS.get("none" if cfg.multi else cfg.pruner)(cfg)


def random_states(obj, seen: set[int] | None = None, depth: int = 0) -> list:
    """Every optuna LazyRandomState reachable from a sampler's attributes (its own, its inner
    samplers', its strategies'), once each, in a fixed order."""
    seen = set() if seen is None else seen
    found = []
    for _, value in sorted(vars(obj).items()):
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, LazyRandomState):
            found.append(value)
        elif depth < 3 and type(value).__module__.startswith("optuna.") and hasattr(value, "__dict__"):
            found += random_states(value, seen, depth + 1)
    return found


class SlotSeeded(BaseSampler):
    """An Optuna sampler whose random states are seeded from (seed, the trial's slot) before
    each trial; otherwise the wrapped sampler (`inner`) does everything."""

    def __init__(self, inner: BaseSampler, seed: int):
        self.inner, self.seed = inner, seed
        self._states = random_states(inner)
        self._slots: dict[int, int] = {}        # trial id -> slot, of the trial now running

    def _seed(self, *key: int) -> None:
        for i, state in enumerate(self._states):
            state.rng.seed(np.random.SeedSequence([self.seed, *key, i]).generate_state(1)[0])

    def before_trial(self, study, trial) -> None:
        stamp(study, trial)        # first thing: a process killed from here on is found (resume.recover)
        self._slots = {trial._trial_id: slot(study, trial)}
        self._seed(self._slots[trial._trial_id])
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # seeded per parameter too: a retry whose first parameters are fixed (its process was
        # killed between two suggestions) draws the rest as the interrupted trial would have
        n = self._slots.get(trial._trial_id)
        if n is not None:
            self._seed(n, zlib.crc32(param_name.encode()))
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:      # before_trial seeds every trial: nothing to reseed
        pass
