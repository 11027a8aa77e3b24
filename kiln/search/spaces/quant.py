"""Mixed precision: a weight format and bit width per layer (Linear or Conv1d/2d/3d, or per
group of them), scored by the task metric on a fixed subset and by the bits it costs.

    [space]
    kind = "mixed-precision"
    source = "runs/minilm-rt"      # spec, train run or artifact (kiln.runs.artifact.load_source)
    bits = [4, 6, 8]                       # the choices per layer (format `format`, default int)
    formats = []                           # or: format presets per layer, instead of bits, e.g.
                                           # ["int8", "int4", "fp8_e4m3", "mxfp4"] (avg bits counts
                                           # each format's own bits, MX's shared scales included)
    include = ".*encoder.*"                # layers searched (regex over FQNs); the rest at fixed_bits
    group = ""                             # "" one choice per layer; or a regex with one group:
                                           # layers with the same captured text share a choice
    act_bits = 8                           # layer inputs, per tensor, calibrated (0: float)
    seed_uniform = false                   # true: a new study first runs every uniform point (all
                                           # layers at one choice), then its sampler takes over
    seed_sensitivity = 0                   # N > 0: it also first runs up to N points of the
                                           # sensitivity path (below), spaced evenly in average bits

The sensitivity path (`seed_sensitivity`): each layer's output distortion when it alone takes
a narrower choice, every other layer at the widest (KL divergence of the softmax outputs from
the float model's on the calibration batches, per example or token; for a model scored by its
own loss, such as a VAE, the outputs' squared error over their mean square), less the
distortion with all at the widest. From all layers at the widest, the path then repeatedly
lowers the one layer whose change costs the least added distortion per weight bit saved, down
to all at the narrowest (a greedy allocation under the assumption that layer distortions add,
as HAWQ-style sensitivity methods assume). Choices of equal width (int4 and fp4_e2m1) are
not traded for each other: the path only ever lowers bits. Measuring it costs one quantized,
calibrated and scored copy of the model per layer and narrower choice, plus one at the widest.
Points that repeat a uniform one (or each other) are run once.

The layers are those kiln.quant wraps with a weight: Linear, Conv1d, Conv2d, Conv3d. A block
format (MX, BFP: a scale shared by a block of the reduction axis) is a choice of Linears only:
a convolution's weight has its kernel width last (3 in a 3x3), which holds no block of 32, so a
group holding a convolution chooses among the other formats (kiln.compare.config says the same).

Each trial quantizes a fresh copy of the float model (fake quantization, `kiln.quant`),
calibrates the activations on `calib_batches` training batches, and scores `samples` examples
of `split`. A trial's best configs export as quant.toml, ready for `kiln quantize SRC --config`.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kiln.config import to_toml
from kiln.data import load_dataset
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.hw.gemms import graph_gemms
from kiln.io import atomic_write_text
from kiln.models.loaded import LoadedModel
from kiln.quant.apply import calibrate, quantize, report
from kiln.quant.config import parse_config
from kiln.quant.formats import parse_format
from kiln.quant.modules import QuantOp
from kiln.runs.artifact import load_source
from kiln.search.objectives import FPGA_OBJECTIVES, SYSTOLIC_OBJECTIVES, HwConfig, fpga_scores, systolic_scores
from kiln.search.spaces import Report, Space, register_space
from kiln.train.evaluation import calibration_batches, check_batches, evaluate_model
from kiln.train.tasks import forward as model_forward
from kiln.train.tasks import scored_by_own_loss

GRANULARITIES = ("tensor", "channel")
# the layers a space chooses a weight format for: those kiln.quant wraps with a weight and a
# matmul-like reduction (an Embedding is a lookup)
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    source: str = ""
    dataset: str = ""                 # default: the source's
    split: str = "val"
    samples: int = 400                # scored examples (the first N of the split)
    bits: tuple[int, ...] = (4, 6, 8)
    format: str = "int"
    formats: tuple[str, ...] = ()
    granularity: str = "channel"
    include: str = ".*"
    fixed_bits: int = 8               # layers outside `include` (0: left in float)
    group: str = ""
    act_bits: int = 8
    calib_batches: int = 2
    batch_size: int = 32
    eval_batch_size: int = 100
    seed_uniform: bool = False
    seed_sensitivity: int = 0
    hw: HwConfig = HwConfig()        # where luts/dsps/fpga_cycles and systolic_* price a trial

    def __post_init__(self):
        checks = [
            (bool(self.source), "source needs a model spec or run directory"),
            (bool(self.bits) and all(2 <= b <= 16 for b in self.bits), f"bits needs values in 2..16, got {list(self.bits)}"),
            (len(set(self.bits)) == len(self.bits), f"bits {list(self.bits)} repeats a value"),
            (self.granularity in GRANULARITIES, f"granularity must be one of {', '.join(GRANULARITIES)}"),
            (self.samples >= 1 and self.calib_batches >= 1, "samples and calib_batches must be >= 1"),
            (self.act_bits == 0 or 2 <= self.act_bits <= 16, "act_bits must be 0 (float) or 2..16"),
            (self.split in ("train", "val", "test"), "split must be train, val or test"),
            (len(set(self.formats)) == len(self.formats), f"formats {list(self.formats)} repeats a value"),
            (self.seed_sensitivity >= 0, "seed_sensitivity must be >= 0 (points of the sensitivity path)"),
        ]
        for ok, message in checks:
            if not ok:
                raise KilnError(f"mixed-precision space: {message}")

        for name in self.formats:
            parse_format(name, "mixed-precision space: formats")
        if self.formats and tuple(self.bits) != (4, 6, 8):
            raise KilnError("mixed-precision space: give bits or formats, not both (formats are presets "
                            "with their own widths, e.g. int4, fp8_e4m3)")
        for pattern in (self.include, self.group):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise KilnError(f"mixed-precision space: bad regex {pattern!r}: {exc}") from None

    @property
    def choices(self) -> list:
        """What each layer (group) chooses among: bit widths of `format`, or format presets."""
        return list(self.formats) if self.formats else list(self.bits)

    @staticmethod
    def choice(value: Any) -> int | str:
        """A stored parameter as a choice: a format preset name, or a bit width."""
        return value if isinstance(value, str) else int(value)

    def choice_bits(self, choice: int | str) -> float:
        """Storage bits per weight element of one choice (MX shared scales amortised)."""
        return self._format(choice).bits

    def blocked(self, choice: int | str) -> bool:
        """Whether a choice's format shares a scale over blocks of the reduction axis (MX, BFP)."""
        return hasattr(self._format(choice), "block")

    def _format(self, choice: int | str):
        table = {k: v for k, v in self.weight(choice).items() if k != "granularity"}
        return parse_format(table["format"] if isinstance(choice, str) else table, "mixed-precision space")

    def weight(self, choice: int | str) -> dict[str, Any]:
        """The quant config's weight table for one choice."""
        if isinstance(choice, str):
            return {"format": choice, "granularity": self.granularity}
        return {"format": self.format, "bits": choice, "granularity": self.granularity}


def layer_groups(names: list[str], include: str, group: str) -> dict[str, list[str]]:
    """Searched layers by choice name: each its own, or grouped by the regex's first group."""
    chosen = [n for n in names if re.fullmatch(include, n)]
    if not chosen:
        raise KilnError(f"mixed-precision space: include {include!r} matches none of the model's "
                        f"{len(names)} Linear and Conv layers (e.g. {', '.join(names[:3])}): the space has no point")
    if not group:
        return {n: [n] for n in chosen}
    groups: dict[str, list[str]] = {}
    for n in chosen:
        m = re.fullmatch(group, n)
        if m is None or not m.groups():
            raise KilnError(f"mixed-precision space: group {group!r} (needs one capture group) does not match {n!r}")
        groups.setdefault(m.group(1), []).append(n)
    return groups


class QuantSpaceBase(Space):
    """Loads the float model, the scoring subset and calibration batches once per process."""

    def setup(self) -> None:
        import torch
        from torch.utils.data import Subset



        c = self.config
        source = load_source(c.source, c.dataset or None)
        if not source.dataset:
            raise KilnError(f"mixed-precision space: {c.source} has no dataset; set dataset")
        self.source = source
        self.model = source.model.eval()
        self.splits = load_dataset(source.dataset, seed=self.ctx.seed)
        split = getattr(self.splits, c.split)
        setattr(self.splits, c.split, Subset(split, range(min(c.samples, len(split)))))
        self.batches = calibration_batches(self.splits, c.calib_batches, c.batch_size, self.ctx.seed)
        check_batches(self.model, self.batches, f"dataset {source.dataset}")
        modules = dict(self.model.named_modules())
        self.layers = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES) and n]
        self.groups = layer_groups(self.layers, c.include, c.group)
        self.group_choices = {g: group_choices(c, g, [modules[n] for n in names]) for g, names in self.groups.items()}
        self.example = tuple(source.example_inputs)
        self.gemms = []
        if self.ctx.wanted & SYSTOLIC_OBJECTIVES:   # shapes only: captured once, priced per trial
            self.gemms = graph_gemms(capture(LoadedModel(c.source, self.model, self.example)))
        torch.manual_seed(self.ctx.seed)

    def nearest(self, g: str, choice: int | str) -> int | str:
        """`choice` when group `g` may take it, else its allowed choice nearest in bits (the
        wider of two as near): a convolution's stand-in for a block format."""
        allowed = self.group_choices[g]
        if choice in allowed:
            return choice
        bits = self.config.choice_bits
        return min(allowed, key=lambda a: (abs(bits(a) - bits(choice)), -bits(a)))

    def quant_table(self, bits_of: dict[str, int | str]) -> dict[str, Any]:
        """The quant config (TOML table) giving each layer its choice (bits, or a format
        preset); `bits_of` by layer FQN."""
        c = self.config
        table: dict[str, Any] = {"targets": [t.__name__ for t in LAYER_TYPES]}
        if c.fixed_bits:
            table["weight"] = c.weight(c.fixed_bits)
        if c.act_bits:
            table["input"] = {"format": "int", "bits": c.act_bits, "granularity": "tensor", "calib": "minmax"}
        rules = [{"match": f"fqn:{n}", "weight": c.weight(b)} for n, b in bits_of.items()]
        if not c.fixed_bits:
            rules += [{"match": f"fqn:{n}", "skip": True} for n in self.layers if n not in bits_of]
        table["rules"] = rules
        return table

    def measure(self, model: nn.Module, table: dict, splits=None, split: str = "") -> dict[str, float]:
        """Quantize a copy of `model` by `table`, calibrate, score: accuracy, avg_bits, model_bytes.
        Scored on the space's subset unless other `splits`/`split` are given."""

        config = parse_config(table, "mixed-precision trial")
        if config.smoothquant is not None or config.gptq is not None:
            raise KilnError("mixed-precision space: smoothquant and gptq are not searched")
        qmodel = quantize(copy.deepcopy(model), config)
        with frozen_weights(qmodel):
            calibrate(qmodel, self.batches, model_forward)
            key, value = evaluate_model(qmodel, splits or self.splits, split or self.config.split,
                                        self.config.eval_batch_size)
        rep = report(model, qmodel, lambda m: None)     # bits and bytes only: no SQNR forwards
        return {"accuracy" if key == "accuracy" else key: value, "avg_bits": rep["avg_weight_bits"],
                "model_bytes": float(rep["model_bytes"]), **self.hw_scores(qmodel, table)}

    def hw_scores(self, qmodel: nn.Module, table: dict) -> dict[str, float]:
        """The hardware objectives the study wants (kiln.hw's estimator and systolic model):
        each layer's operands at max(its weight bits, the input bits)."""
        wanted = set(self.ctx.wanted)
        out = fpga_scores(qmodel, self.example[0], wanted, self.config.hw) if wanted & FPGA_OBJECTIVES else {}
        if wanted & SYSTOLIC_OBJECTIVES:
            c = self.config
            fixed = c.choice_bits(c.fixed_bits) if c.fixed_bits else 32
            weight = {r["match"][4:]: c.choice_bits(c.choice(r["weight"].get("bits") or r["weight"]["format"]))
                      for r in table.get("rules", []) if "weight" in r}
            bits = {n: max(weight.get(n, fixed), c.act_bits or 32) for n in self.layers}
            out |= systolic_scores(self.gemms, bits, wanted, c.hw)
        return out


def group_choices(c: MixedPrecisionConfig, g: str, modules: list[nn.Module]) -> list:
    """The choices a group may take: all of them, less the block formats where it holds a
    convolution (see the module docstring)."""
    if not any(isinstance(m, CONV_TYPES) for m in modules):
        return list(c.choices)
    allowed = [ch for ch in c.choices if not c.blocked(ch)]
    if not allowed:
        raise KilnError(f"mixed-precision space: {g} holds a convolution and every choice ({', '.join(map(str, c.choices))}) "
                        f"is a block format, which a convolution's weight cannot hold: add an int or fp format, "
                        f"or leave it out of include")
    return allowed


def outputs(model: nn.Module, batches: list) -> list:
    import torch


    with torch.no_grad():
        return [model_forward(model, b).detach().float() for b in batches]


def output_distortion(reference: list, quantized: list, logits: bool) -> float:
    """How far quantized outputs are from the float ones, mean over batches: for `logits` (a
    model scored by cross-entropy over its last dimension) the KL divergence of the softmax per
    example or token, else the mean squared error over the reference's mean square."""
    import torch.nn.functional as F

    total = 0.0
    for r, q in zip(reference, quantized):
        if logits:
            r, q = r.reshape(-1, r.shape[-1]), q.reshape(-1, q.shape[-1])
            total += float(F.kl_div(F.log_softmax(q, 1), F.log_softmax(r, 1), log_target=True, reduction="batchmean"))
        else:
            total += float(((q - r) ** 2).mean() / (r ** 2).mean().clamp_min(1e-12))
    return total / len(reference)


def spaced(path: list[tuple[float, dict]], n: int) -> list[dict]:
    """`n` points of a path (average bits falling from its first point to its last) at evenly
    spaced bit targets strictly between its ends: for each, the first point at or below it."""
    hi, lo = path[0][0], path[-1][0]
    picked: list[dict] = []
    for k in range(1, n + 1):
        target = hi - k * (hi - lo) / (n + 1)
        point = next(choice for bits, choice in path if bits <= target + 1e-9)
        if point not in picked:
            picked.append(point)
    return picked


@contextlib.contextmanager
def frozen_weights(model: nn.Module):
    """Fake-quantize every wrapped weight once instead of on every forward (the weights do not
    change while a trial is scored): the same numbers, a fraction of the time."""
    import torch


    saved = []
    with torch.no_grad():
        for op in model.modules():
            if isinstance(op, QuantOp) and op.weight_q is not None:
                saved.append((op, op.weight_q, op.module.weight.detach().clone()))
                op.module.weight.copy_(op.quantized_weight())
                op.weight_q = None
    try:
        yield model
    finally:
        with torch.no_grad():
            for op, wq, w in saved:
                op.module.weight.copy_(w)
                op.weight_q = wq


@register_space("mixed-precision")
class MixedPrecisionSpace(QuantSpaceBase):
    Config = MixedPrecisionConfig

    def suggest(self, trial) -> dict[str, int]:
        self.ensure_setup()
        return {g: trial.suggest_categorical(g, self.group_choices[g]) for g in self.groups}

    def bits_of(self, choice: dict[str, int | str]) -> dict[str, int | str]:
        """Each layer's choice (bits or a format preset), by FQN."""
        return {n: self.config.choice(choice[g]) for g, names in self.groups.items() for n in names}

    def uniform(self, choice: int | str) -> dict[str, int | str]:
        """Every group at `choice` (or, where it may not take it, the nearest it may)."""
        return {g: self.nearest(g, choice) for g in self.groups}

    def initial_points(self) -> list[dict]:
        c = self.config
        if not (c.seed_uniform or c.seed_sensitivity):
            return []
        self.ensure_setup()
        points = []
        for ch in c.choices if c.seed_uniform else []:
            if self.uniform(ch) not in points:
                points.append(self.uniform(ch))
        if c.seed_sensitivity:
            if getattr(self, "path", None) is None:     # once per process: studies sharing the space reuse it
                self.path = self.sensitivity_path()
            points += [p for p in spaced(self.path, c.seed_sensitivity) if p not in points]
        return points

    def group_params(self) -> dict[str, int]:
        modules = dict(self.model.named_modules())
        return {g: sum(modules[n].weight.numel() for n in names) for g, names in self.groups.items()}

    def sensitivity(self) -> dict[str, dict]:
        """Per group and narrower choice: the added output distortion when that group alone takes
        it, every other group at the widest choice (see the module docstring)."""
        import sys
        import time

        c = self.config
        bits = {ch: c.choice_bits(ch) for ch in c.choices}
        widest = max(c.choices, key=bits.__getitem__)
        reference = outputs(self.model, self.batches)
        top = self.uniform(widest)
        base = self.distortion(top, reference)
        todo = [(g, ch) for g in self.groups for ch in self.group_choices[g] if bits[ch] < bits[top[g]]]
        out: dict[str, dict] = {g: {top[g]: 0.0} for g in self.groups}
        t0 = time.perf_counter()
        for i, (g, ch) in enumerate(todo, 1):
            out[g][ch] = self.distortion({**top, g: ch}, reference) - base
            if i % 25 == 0 or i == len(todo):
                print(f"sensitivity: {i}/{len(todo)} layer choices measured, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        return out

    def distortion(self, choice: dict, reference: list) -> float:

        qmodel = quantize(copy.deepcopy(self.model), parse_config(self.quant_table(self.bits_of(choice)), "sensitivity"))
        with frozen_weights(qmodel):
            calibrate(qmodel, self.batches, model_forward)
            return output_distortion(reference, outputs(qmodel, self.batches), not scored_by_own_loss(self.model))

    def sensitivity_path(self) -> list[tuple[float, dict]]:
        """(average bits over the searched layers, choice) from all at the widest choice to all at
        the narrowest, each step lowering the group with the least added distortion per bit saved."""
        c = self.config
        sens = self.sensitivity()
        params = self.group_params()
        total = sum(params.values())
        bits = {ch: c.choice_bits(ch) for ch in c.choices}
        current = self.uniform(max(c.choices, key=bits.__getitem__))

        def avg(choice):
            return sum(params[g] * bits[ch] for g, ch in choice.items()) / total

        path = [(avg(current), dict(current))]
        while True:
            steps = [((sens[g][ch] - sens[g][current[g]]) / (params[g] * (bits[current[g]] - bits[ch])),
                      -params[g] * (bits[current[g]] - bits[ch]), g, ch)
                     for g in self.groups for ch in self.group_choices[g] if bits[ch] < bits[current[g]]]
            if not steps:
                return path
            _, _, g, ch = min(steps, key=lambda s: s[:2])
            current[g] = ch
            path.append((avg(current), dict(current)))

    def score(self, choice: dict[str, int], report: Report) -> dict[str, float]:
        self.ensure_setup()
        return self.measure(self.model, self.quant_table(self.bits_of(choice)))

    def grid(self) -> dict[str, list]:
        self.ensure_setup()
        return {g: list(self.group_choices[g]) for g in self.groups}

    def export(self, params: dict, out: Path) -> list[Path]:
        self.ensure_setup()
        header = (f"# trial of a mixed-precision search over {self.config.source}: "
                  f"kiln quantize {self.config.source} --config quant.toml\n")
        return [atomic_write_text(out / "quant.toml", header + to_toml(self.quant_table(self.bits_of(params))))]
