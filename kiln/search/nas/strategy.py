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
from kiln.search.nas.fit import Deadline

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
class Evaluation:
    """A candidate's score, and how much training it got: `complete` is False when the budget's
    deadline stopped its training early (its score is then not comparable with the others')."""
    reward: float
    steps: int = 0
    complete: bool = True


@dataclass(frozen=True)
class Trial:
    code: Code
    reward: float
    seconds: float      # since the search started, at the end of this trial
    steps: int = 0      # training steps this candidate got
    complete: bool = True


@dataclass(frozen=True)
class SearchOutcome:
    trials: list[Trial]
    best: Trial
    seconds: float

    @property
    def complete(self) -> int:
        return sum(t.complete for t in self.trials)

    @property
    def steps(self) -> int:
        return sum(t.steps for t in self.trials)


def run(strategy: Strategy, evaluate: Callable[[Code, Deadline], "float | Evaluation"], budget_s: float,
        max_archs: int, on_trial: Callable[[int, Trial], None] | None = None,
        clock: Callable[[], float] = time.perf_counter) -> SearchOutcome:
    """ask -> evaluate -> tell until `max_archs` are evaluated or `budget_s` seconds (on `clock`)
    have passed. `evaluate` gets the deadline and stops training at it; a candidate it cut short
    is kept in the history but is the best only when no candidate finished. Re-proposed
    architectures are evaluated again: each evaluation is a fresh noisy measurement, as in the papers."""
    if max_archs < 1:
        raise KilnError(f"nas: max_archs must be at least 1, got {max_archs}")
    start, trials = clock(), []
    deadline = Deadline(start + budget_s, clock)
    while len(trials) < max_archs and (not trials or not deadline.passed()):
        code = strategy.ask()
        result = evaluate(code, deadline)
        result = result if isinstance(result, Evaluation) else Evaluation(float(result))
        if result.complete:        # a cut-short score would mislead the strategy
            strategy.tell(code, result.reward)
        trials.append(Trial(code, result.reward, clock() - start, result.steps, result.complete))
        if on_trial:
            on_trial(len(trials), trials[-1])
    best = max([t for t in trials if t.complete] or trials, key=lambda t: t.reward)
    return SearchOutcome(trials, best, clock() - start)
