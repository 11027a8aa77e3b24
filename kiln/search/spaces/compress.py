"""Compression: per Linear (or group), an unstructured sparsity, a low-rank budget and the weight
bits, searched together.

    [space]
    kind = "compression"
    source = "runs/figures/minilm-v3"
    include = ".*encoder.*"
    sparsity = [0.0, 0.5]        # magnitude pruning, per layer (kiln.prune.unstructured)
    budgets = [1.0, 0.5]         # low-rank: factor weights as a fraction of the dense count
                                 # (kiln.lowrank.svd; 1.0 = stay dense)
    bits = [4, 8]                # weights, per output channel (kiln.quant); or formats =
                                 # ["int4", "fp4_e2m1", "int8"], presets as in mixed-precision

A candidate is built in that order on a copy of the float model (prune, factorise the pruned
weight, quantize, calibrate) and scored like the mixed-precision space. `params` counts the
nonzero parameters; `model_bytes` counts dense storage (factorisation shrinks it, sparsity
does not, as no sparse format is stored).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from kiln.errors import KilnError
from kiln.search.spaces import Report, register_space
from kiln.search.spaces.quant import MixedPrecisionConfig, QuantSpaceBase
from kiln.lowrank.apply import replace
from kiln.lowrank.svd import factorize_linear, rank_for_budget
from kiln.prune.unstructured import make_permanent, prune_unstructured


@dataclass(frozen=True)
class CompressionConfig(MixedPrecisionConfig):
    sparsity: tuple[float, ...] = (0.0, 0.5)
    budgets: tuple[float, ...] = (1.0, 0.5)

    def __post_init__(self):
        super().__post_init__()
        for key in ("seed_uniform", "seed_sensitivity"):
            if getattr(self, key):
                raise KilnError(f"compression space: {key} is a mixed-precision space option")
        if not self.sparsity or not all(0 <= s < 1 for s in self.sparsity):
            raise KilnError(f"compression space: sparsity needs values in [0, 1), got {list(self.sparsity)}")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise KilnError(f"compression space: budgets needs values in (0, 1], got {list(self.budgets)}")


@register_space("compression")
class CompressionSpace(QuantSpaceBase):
    Config = CompressionConfig

    def suggest(self, trial) -> dict:
        self.ensure_setup()
        c = self.config
        out = {}
        for g in self.groups:
            out[f"{g}:sparsity"] = trial.suggest_categorical(f"{g}:sparsity", list(c.sparsity))
            out[f"{g}:budget"] = trial.suggest_categorical(f"{g}:budget", list(c.budgets))
            out[f"{g}:bits"] = trial.suggest_categorical(f"{g}:bits", c.choices)
        return out

    def compress(self, choice: dict) -> tuple[nn.Module, dict[str, int]]:
        """A pruned and factorised copy of the float model, and the weight bits per Linear FQN."""

        model = copy.deepcopy(self.model)
        layer = {n: g for g, names in self.groups.items() for n in names}
        ratios = {n: choice[f"{g}:sparsity"] for n, g in layer.items() if choice[f"{g}:sparsity"] > 0}
        if ratios:
            prune_unstructured(model, 0.0, scope="local", targets=[], overrides=ratios)
            make_permanent(model)
        bits: dict[str, int | str] = {}
        for n, g in layer.items():
            b, budget = self.config.choice(choice[f"{g}:bits"]), choice[f"{g}:budget"]   # bits or a format
            linear = model.get_submodule(n)
            out_f, in_f = linear.weight.shape
            rank = min(rank_for_budget(in_f, out_f, budget), min(in_f, out_f)) if budget < 1 else None
            if rank is None or rank * (in_f + out_f) >= in_f * out_f:
                bits[n] = b
                continue
            model = replace(model, n, factorize_linear(linear, rank, n))
            bits[f"{n}.first"] = bits[f"{n}.second"] = b
        return model, bits

    def score(self, choice: dict, report: Report) -> dict[str, float]:
        self.ensure_setup()
        model, bits = self.compress(choice)
        scores = self.measure(model, self.quant_table(bits))
        scores["params"] = float(sum(int((p != 0).sum()) for p in model.parameters()))
        return scores
