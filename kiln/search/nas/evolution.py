"""Regularized (aging) evolution (Real, Aggarwal, Huang, Le, AAAI 2019).

The population is a queue: each cycle samples `sample_size` members uniformly, mutates the best
of that tournament, appends the child and removes the *oldest* member (not the worst), which
favours architectures that keep scoring well when retrained.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.search.nas.strategy import STRATEGIES, Code, Strategy


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 20
    sample_size: int = 5

    def __post_init__(self):
        if self.population < 2 or not 1 <= self.sample_size <= self.population:
            raise KilnError(f"nas evolution: need population >= 2 and 1 <= sample_size <= population, "
                            f"got population={self.population}, sample_size={self.sample_size}")


def mutate(code: Code, choices: list[int], rng) -> Code:
    """Change one decision that has an alternative to a different value."""
    free = [k for k, n in enumerate(choices) if n > 1]
    if not free:
        return code
    k = rng.choice(free)
    new = rng.randrange(choices[k] - 1)
    new += new >= code[k]   # skip the current value
    return code[:k] + (new,) + code[k + 1:]


@STRATEGIES.register("evolution")
class RegularizedEvolution(Strategy):
    def __init__(self, choices: list[int], seed: int, settings: EvolutionSettings = EvolutionSettings()):
        super().__init__(choices, seed)
        self.settings = settings
        self.population: deque[tuple[Code, float]] = deque()

    def ask(self) -> Code:
        if len(self.population) < self.settings.population:
            return self.random_code()       # the initial population is random
        contenders = [self.rng.choice(self.population) for _ in range(self.settings.sample_size)]
        parent = max(contenders, key=lambda member: member[1])[0]
        return mutate(parent, self.choices, self.rng)

    def tell(self, code: Code, reward: float) -> None:
        self.population.append((tuple(code), reward))
        if len(self.population) > self.settings.population:
            self.population.popleft()       # aging: the oldest dies
