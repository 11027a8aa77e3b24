"""Compression: per layer (Linear or Conv1d/2d/3d, or per group), an unstructured sparsity, a
low-rank budget and the weight bits, searched together.

    [space]
    kind = "compression"
    source = "runs/minilm-rt"
    include = ".*encoder.*"
    sparsity = [0.0, 0.5]        # magnitude pruning, per layer (kiln.prune.unstructured)
    budgets = [1.0, 0.5]         # low-rank: factor weights as a fraction of the dense count
                                 # (kiln.lowrank: SVD of a Linear, Tucker-2 of a Conv2d; 1.0 =
                                 # stay dense; a group holding another layer type stays dense)
    bits = [4, 8]                # weights, per output channel (kiln.quant); or formats =
                                 # ["int4", "fp4_e2m1", "int8"], presets as in mixed-precision

A candidate is built in that order on a copy of the float model (prune, factorise the pruned
weight, quantize, calibrate) and scored like the mixed-precision space. `params` counts the
nonzero parameters; `model_bytes` counts dense storage (factorisation shrinks it, sparsity
does not, as no sparse format is stored).

A trial exports the chain as kiln's own commands run it: prune.toml (magnitude, local, one rule
per pruned layer), lowrank.toml (one rule per factorised layer: a Linear at the trial's rank, a
Conv2d at its budget, which gives kiln lowrank the same two Tucker ranks) and
quant.toml (quantize last), each only when the trial uses that step, and README.txt with the
command lines in that order.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kiln.config import to_toml
from kiln.errors import KilnError
from kiln.io import atomic_write_text
from kiln.lowrank.apply import decide, factorized, replace
from kiln.lowrank.config import Choice
from kiln.lowrank.config import parse_config as parse_lowrank
from kiln.lowrank.config import to_table as lowrank_to_table
from kiln.prune.config import parse_config as parse_prune
from kiln.prune.config import to_table as prune_to_table
from kiln.prune.unstructured import make_permanent, prune_unstructured
from kiln.quant.config import parse_config as parse_quant
from kiln.quant.config import to_table as quant_to_table
from kiln.search.spaces import Report, register_space
from kiln.search.spaces.quant import MixedPrecisionConfig, QuantSpaceBase

# the layers kiln.lowrank factorises, and the parts each becomes (quantized one by one)
RANKABLE = (nn.Linear, nn.Conv2d)
PARTS = {nn.Linear: ("first", "second"), nn.Conv2d: ("first", "core", "last")}


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

    def setup(self) -> None:
        super().setup()
        # groups whose every layer kiln.lowrank can factorise (a grouped conv it leaves dense itself)
        self.rankable = [g for g, names in self.groups.items()
                         if all(isinstance(self.model.get_submodule(n), RANKABLE) for n in names)]

    def suggest(self, trial) -> dict:
        self.ensure_setup()
        c = self.config
        out = {}
        for g in self.groups:
            out[f"{g}:sparsity"] = trial.suggest_categorical(f"{g}:sparsity", list(c.sparsity))
            if g in self.rankable:
                out[f"{g}:budget"] = trial.suggest_categorical(f"{g}:budget", list(c.budgets))
            out[f"{g}:bits"] = trial.suggest_categorical(f"{g}:bits", self.group_choices[g])
        return out

    def plan(self, choice: dict) -> tuple[dict[str, float], dict[str, tuple[int, ...]], dict[str, int | str]]:
        """What a choice does to each layer, by FQN: the sparsity of those pruned, the ranks of
        those factorised (lowrank's own decision, so a rank that saves nothing stays dense) and
        the weight bits (or format) of every layer left after factorising (`fqn.first`, ...)."""
        self.ensure_setup()
        layer = {n: g for g, names in self.groups.items() for n in names}
        ratios = {n: choice[f"{g}:sparsity"] for n, g in layer.items() if choice[f"{g}:sparsity"] > 0}
        ranks: dict[str, tuple[int, ...]] = {}
        bits: dict[str, int | str] = {}
        for n, g in layer.items():
            b, budget = self.config.choice(choice[f"{g}:bits"]), choice.get(f"{g}:budget", 1.0)   # bits or a format
            module = self.model.get_submodule(n)
            d = decide(n, module, Choice("budget", budget)) if budget < 1 else None
            if d is None or d.ranks is None:
                bits[n] = b
                continue
            ranks[n] = d.ranks
            bits |= {f"{n}.{part}": b for part in next(p for t, p in PARTS.items() if isinstance(module, t))}
        return ratios, ranks, bits

    def compress(self, choice: dict) -> tuple[nn.Module, dict[str, int]]:
        """A pruned and factorised copy of the float model, and the weight bits per Linear FQN."""
        ratios, ranks, bits = self.plan(choice)
        model = copy.deepcopy(self.model)
        if ratios:
            prune_unstructured(model, 0.0, scope="local", targets=[], overrides=ratios)
            make_permanent(model)
        for n, r in ranks.items():
            model = replace(model, n, factorized(model.get_submodule(n), r, n))
        return model, bits

    def configs(self, choice: dict) -> dict[str, dict]:
        """The chain's config tables by file name, in the order the commands run, each as its
        config's own table writer gives it back; steps the choice does not use are left out."""
        ratios, ranks, bits = self.plan(choice)
        out = {}
        if ratios:
            # targets = []: only the rules' Linears are pruned, each at its own ratio. The default
            # ratio prunes no target, but kiln prune scales the rules' ratios by ratio / ratio
            # (schedules start below it), so it is nonzero.
            table = {"method": "unstructured", "criterion": "magnitude", "scope": "local",
                     "ratio": max(ratios.values()),
                     "targets": [], "rules": [{"match": f"fqn:{n}", "ratio": r} for n, r in ratios.items()]}
            out["prune.toml"] = prune_to_table(parse_prune(table, "compression export"))
        if ranks:       # the default rank is required by the parser but applies to no target
            layer = {n: g for g, names in self.groups.items() for n in names}
            rules = [{"match": f"fqn:{n}", "rank": r[0]} if len(r) == 1 else
                     {"match": f"fqn:{n}", "budget": choice[f"{layer[n]}:budget"]} for n, r in ranks.items()]
            table = {"targets": [], "rank": min(min(r) for r in ranks.values()), "rules": rules}
            out["lowrank.toml"] = lowrank_to_table(parse_lowrank(table, "compression export"))
        out["quant.toml"] = quant_to_table(parse_quant(self.quant_table(bits), "compression export"))
        return out

    def commands(self, files: list[str]) -> list[str]:
        """The command lines that run the exported configs in order, each on the one before's output."""
        c = self.config
        steps = {"prune.toml": ("prune", "pruned"), "lowrank.toml": ("lowrank", "factorised"),
                 "quant.toml": ("quantize", "quantized")}
        src, lines = c.source, []
        data = f" --dataset {c.dataset}" if c.dataset else ""
        for name in files:
            command, out = steps[name]
            extra = (f" --calib-batches {c.calib_batches} --batch-size {c.batch_size} --seed {self.ctx.seed}"
                     + (f" --calib-dataset {c.dataset}" if c.dataset else "")) if command == "quantize" else data
            lines.append(f"kiln {command} {src} --config {name} --out {out}{extra}")
            src = out
        return lines

    def export(self, params: dict, out: Path) -> list[Path]:
        self.ensure_setup()
        configs = self.configs(params)
        header = f"# trial of a compression search over {self.config.source}; run in the order of README.txt\n"
        paths = [atomic_write_text(out / name, header + to_toml(table)) for name, table in configs.items()]
        readme = (f"A trial of a compression search over {self.config.source}: prune, factorise, then quantize\n"
                  "last, with kiln's own commands (steps the trial does not use are left out):\n\n"
                  + "".join(f"    {line}\n" for line in self.commands(list(configs))))
        return paths + [atomic_write_text(out / "README.txt", readme)]

    def score(self, choice: dict, report: Report) -> dict[str, float]:
        self.ensure_setup()
        model, bits = self.compress(choice)
        scores = self.measure(model, self.quant_table(bits))
        scores["params"] = float(sum(int((p != 0).sum()) for p in model.parameters()))
        return scores
