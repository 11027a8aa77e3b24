"""Random search: uniform samples from the space, the baseline every NAS result is compared to
(Li & Talwalkar, "Random Search and Reproducibility for NAS", 2019)."""
from __future__ import annotations

from kiln.search.nas.strategy import STRATEGIES, Code, Strategy


@STRATEGIES.register("random")
class RandomSearch(Strategy):
    def ask(self) -> Code:
        return self.random_code()

    def tell(self, code: Code, reward: float) -> None:
        pass   # memoryless: the loop keeps the history and the best
