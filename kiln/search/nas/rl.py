"""A REINFORCE controller (Zoph & Le, "Neural Architecture Search with Reinforcement Learning",
ICLR 2017): an LSTM emits one decision per step, each fed back as the next input; it is trained to
maximise the expected reward with the policy gradient (R - b) * grad log p(code), b an
exponential moving average of past rewards, plus an entropy bonus against early collapse."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.search.nas.strategy import STRATEGIES, Code, Strategy


@dataclass(frozen=True)
class RLSettings:
    hidden: int = 32
    lr: float = 0.01
    baseline_decay: float = 0.95
    entropy_weight: float = 0.01

    def __post_init__(self):
        if self.hidden < 1 or self.lr <= 0 or not 0 <= self.baseline_decay < 1 or self.entropy_weight < 0:
            raise KilnError(f"nas rl: need hidden >= 1, lr > 0, 0 <= baseline_decay < 1, entropy_weight >= 0; "
                            f"got {self}")


class Controller(nn.Module):
    """Autoregressive policy over decisions with `choices[k]` options each."""

    def __init__(self, choices: list[int], hidden: int):
        super().__init__()
        self.choices = list(choices)
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.embed = nn.ModuleList(nn.Embedding(n, hidden) for n in choices)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in choices)

    def forward(self, code: Code | None = None, gen: torch.Generator | None = None):
        """Sample a code (or score a given one): returns (code, log-probability, entropy)."""
        x, state = self.start, None
        picked, logp, entropy = [], 0.0, 0.0
        for k, head in enumerate(self.heads):
            state = self.cell(x, state)
            dist = torch.distributions.Categorical(logits=head(state[0])[0])
            c = int(torch.multinomial(dist.probs.detach(), 1, generator=gen)) if code is None else int(code[k])
            picked.append(c)
            logp = logp + dist.log_prob(torch.tensor(c))
            entropy = entropy + dist.entropy()
            x = self.embed[k](torch.tensor([c]))
        return tuple(picked), logp, entropy

    @torch.no_grad()
    def mode(self) -> Code:
        """The greedy (most likely at each step) code."""
        x, state, picked = self.start, None, []
        for k, head in enumerate(self.heads):
            state = self.cell(x, state)
            picked.append(int(head(state[0])[0].argmax()))
            x = self.embed[k](torch.tensor([picked[-1]]))
        return tuple(picked)


@STRATEGIES.register("rl")
class Reinforce(Strategy):
    def __init__(self, choices: list[int], seed: int, settings: RLSettings = RLSettings()):
        super().__init__(choices, seed)
        self.settings = settings
        self.gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):   # a seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.controller = Controller(self.choices, settings.hidden)
        self.opt = torch.optim.Adam(self.controller.parameters(), lr=settings.lr)
        self.baseline: float | None = None

    def ask(self) -> Code:
        with torch.no_grad():
            return self.controller(gen=self.gen)[0]

    def tell(self, code: Code, reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward   # the first reward only sets the baseline
            return
        advantage = reward - self.baseline
        self.baseline = self.settings.baseline_decay * self.baseline + (1 - self.settings.baseline_decay) * reward
        _, logp, entropy = self.controller(code)
        loss = -advantage * logp - self.settings.entropy_weight * entropy
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def best_guess(self) -> Code:
        return self.controller.mode()
