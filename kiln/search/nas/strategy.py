"""Sampling strategies over a flat categorical encoding, and the one loop that drives them.

An architecture is a list of integers, one per decision, `choices[k]` options at decision k
(CellSpace.choices(), a SPOS path). A strategy proposes (`ask`) and learns from a reward (`tell`);
the loop owns the budget (wall time, number of architectures) and the history.
"""
from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from kiln.errors import KilnError
from kiln.registry import Registry

Code = tuple[int, ...]


class Strategy(ABC):
    """Propose architectures and learn from their rewards (higher is better)."""

    def __init__(self, choices: list[int], seed: int):
        if not choices or any(n < 1 for n in choices):
            raise KilnError(f"nas: search space has no valid architecture (option counts {choices})")
        self.choices = list(choices)
        self.rng = random.Random(seed)

    def random_code(self) -> Code:
        return tuple(self.rng.randrange(n) for n in self.choices)

    @abstractmethod
    def ask(self) -> Code: ...

    @abstractmethod
    def tell(self, code: Code, reward: float) -> None: ...

    def best_guess(self) -> Code | None:
        """The strategy's own answer, if it has one beyond the best evaluated (e.g. a policy's mode)."""
        return None


STRATEGIES: Registry[Callable[..., Strategy]] = Registry("nas strategy")


@dataclass(frozen=True)
class Trial:
    code: Code
    reward: float
    seconds: float      # since the search started, at the end of this trial


@dataclass(frozen=True)
class SearchOutcome:
    trials: list[Trial]
    best: Trial
    seconds: float


def run(strategy: Strategy, evaluate: Callable[[Code], float], budget_s: float, max_archs: int,
        on_trial: Callable[[int, Trial], None] | None = None) -> SearchOutcome:
    """ask -> evaluate -> tell until `max_archs` are evaluated or `budget_s` seconds have passed
    (a trial running at the deadline finishes). Re-proposed architectures are evaluated again:
    each evaluation is a fresh noisy measurement, as in the papers."""
    if max_archs < 1:
        raise KilnError(f"nas: max_archs must be at least 1, got {max_archs}")
    start, trials = time.perf_counter(), []
    while len(trials) < max_archs and (not trials or time.perf_counter() - start < budget_s):
        code = strategy.ask()
        reward = float(evaluate(code))
        strategy.tell(code, reward)
        trials.append(Trial(code, reward, time.perf_counter() - start))
        if on_trial:
            on_trial(len(trials), trials[-1])
    best = max(trials, key=lambda t: t.reward)
    return SearchOutcome(trials, best, time.perf_counter() - start)
