"""The combined space `kiln optimize` searches: per layer (each Linear and Conv1d/2d/3d, searched
alone or in groups) a sparsity, a low-rank budget (Linear: SVD, Conv2d: Tucker-2) and, when the
candidate runs in int8, the weight format (a convolution's excludes MX and BFP, whose blocks a
3-wide kernel cannot hold) or FLOAT: the layer left in float in an int8 candidate (kiln's int8
kernels run Linears; a quantized convolution runs as fake quantization on them, slower than a
float one, which only the search can weigh against its smaller size); per candidate its
precision (fp32 or int8) and the backend it runs on.

A candidate is built as kiln's compression space builds one (prune, factorise, quantize last,
calibrate; kiln.search.spaces.compress) and scored on the validation subset. Its cost is
- `latency_ms` (target `local`): the candidate on its backend, timed by kiln.timing
  interleaved with the baseline (the fastest fp32 backend of phase 1) in the same rounds, and
  reported as the ratio of their medians times the baseline's latency: on a shared machine a
  slow spell lands on both, so trials measured minutes apart stay comparable;
- `roofline_ms` (any other profile): the roofline latency of the candidate as it runs (number
  formats and factor shapes; kiln.runs.execution, kiln.analysis), the cost model;
- `model_bytes`: stored bytes (quantized weights at their bits, the rest at fp32);
- `systolic_energy_uj`: the candidate's GEMMs on kiln's systolic-array model.
Every trial also records the candidate's FLOPs and stored bytes for the report.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from kiln.analysis.report import analyze
from kiln.compile.auto import at_batch, call
from kiln.compile.backends import build, parse_backend
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.hardware.profiles import load_profile
from kiln.hw.gemms import graph_gemms
from kiln.models.loaded import LoadedModel
from kiln.quant.apply import calibrate, quant_record, quantize, report
from kiln.quant.config import parse_config
from kiln.runs.execution import as_it_runs
from kiln.search.objectives import HwConfig, count_flops, fp32_bytes, systolic_scores
from kiln.search.spaces import Context, Report
from kiln.search.spaces.compress import CompressionConfig, CompressionSpace
from kiln.search.spaces.quant import frozen_weights
from kiln.timing import TimingConfig, measure
from kiln.train.evaluation import evaluate_model
from kiln.train.tasks import forward as model_forward

FP32, INT8 = "fp32", "int8"
FLOAT = 0           # a layer's weight "bits" in an int8 candidate that leaves it in float


@dataclass(frozen=True)
class OptimizeSpaceConfig(CompressionConfig):
    target: str = "local"
    batch: int = 1
    rounds: int = 7
    precisions: tuple[str, ...] = (FP32, INT8)
    fp32_backends: tuple[str, ...] = ("eager",)
    int8_backends: tuple[str, ...] = ("onnxruntime:dtype=int8",)
    baseline_backend: str = "eager"      # what each trial is timed beside (target local)
    baseline_ms: float = 0.0             # its latency in phase 1

    def __post_init__(self):
        super().__post_init__()
        if not self.precisions or set(self.precisions) - {FP32, INT8}:
            raise KilnError(f"optimize space: precisions needs values among fp32, int8, got {list(self.precisions)}")
        for name in (*self.fp32_backends, *self.int8_backends, self.baseline_backend):
            parse_backend(name)

    def backends(self, precision: str) -> list[str]:
        return list(self.fp32_backends if precision == FP32 else self.int8_backends)


@dataclass
class Built:
    """A candidate as built: the model it runs (fake-quantized for int8) and what it chose."""
    model: nn.Module
    precision: str
    backend: str
    table: dict | None = None            # the quant config table (int8)
    bits: dict = field(default_factory=dict)


class OptimizeSpace(CompressionSpace):
    """Not registered as a `kiln search` kind: `kiln optimize` builds it with its phase-1
    figures in its config and its sensitivity path in `seed_points`."""

    Config = OptimizeSpaceConfig
    kind = "optimize"
    deterministic = False        # a trial's latency is measured: a repeated point is measured again

    def __init__(self, config: OptimizeSpaceConfig, ctx: Context, seed_points: list[dict] | None = None):
        super().__init__(config, ctx)
        self.seed_points = list(seed_points or [])

    def setup(self) -> None:
        super().setup()
        self.group_choices = {g: [*choices, FLOAT] for g, choices in self.group_choices.items()}
        self.loaded = at_batch(LoadedModel(self.config.source, self.model, self.example,
                                           dict(self.source.example_kwargs)), self.config.batch, self.ctx.seed)
        self._reference: Callable | None = None

    def initial_points(self) -> list[dict]:
        return list(self.seed_points)

    def suggest(self, trial) -> dict:
        self.ensure_setup()
        c = self.config
        precision = trial.suggest_categorical("precision", list(c.precisions))
        # one parameter name per precision: a parameter's choices may not change between trials
        out = {"precision": precision,
               f"backend:{precision}": trial.suggest_categorical(f"backend:{precision}", c.backends(precision))}
        for g in self.groups:
            out[f"{g}:sparsity"] = trial.suggest_categorical(f"{g}:sparsity", list(c.sparsity))
            if g in self.rankable:
                out[f"{g}:budget"] = trial.suggest_categorical(f"{g}:budget", list(c.budgets))
            if precision == INT8:
                out[f"{g}:bits"] = trial.suggest_categorical(f"{g}:bits", self.group_choices[g])
        return out

    def filled(self, choice: dict) -> dict:
        """The choice with a placeholder width for fp32 candidates (the compression space's
        planning reads one per group; an fp32 candidate is never quantized)."""
        return {f"{g}:bits": self.group_choices[g][0] for g in self.groups} | choice

    def quant_table(self, bits_of: dict[str, int | str]) -> dict[str, Any]:
        """The compression space's table for the layers not at FLOAT, less the skip rules of
        layers a choice factorised (`fc` is `fc.first` and `fc.second` then, a conv `.first`,
        `.core`, `.last`, and a rule matching no module is an error), plus skip rules for the
        factorised parts left in float."""
        table = super().quant_table({n: b for n, b in bits_of.items() if b != FLOAT})
        table["rules"] = [r for r in table["rules"] if not (r.get("skip") and f"{r['match'][4:]}.first" in bits_of)]
        table["rules"] += [{"match": f"fqn:{n}", "skip": True} for n, b in bits_of.items()
                           if b == FLOAT and n not in self.layers]
        return table

    def build(self, choice: dict) -> Built:
        precision = choice["precision"]
        model, bits = self.compress(self.filled(choice))
        built = Built(model.eval(), precision, choice[f"backend:{precision}"])
        if precision == INT8:
            table = self.quant_table(bits)
            qmodel = quantize(model, parse_config(table, "optimize trial"))
            with frozen_weights(qmodel):
                calibrate(qmodel, self.batches, model_forward)
            built.model, built.table = qmodel.eval(), table
            built.bits = {n: b for n, b in bits.items() if b != FLOAT}
        return built

    def configs(self, choice: dict) -> dict[str, dict]:
        out = super().configs(self.filled(choice))
        if choice["precision"] != INT8:
            out.pop("quant.toml")
        return out

    def score(self, choice: dict, report_: Report) -> dict[str, float]:
        self.ensure_setup()
        built = self.build(choice)
        scores = self.quality(built)
        scores |= self.cost(built, set(self.ctx.wanted) | {"model_bytes", "flops"})
        return scores

    def quality(self, built: Built, splits=None, split: str = "") -> dict[str, float]:
        """The task metric on the scoring subset (or `splits`' `split`), under the objective
        name of its direction (accuracy: max, loss: min)."""
        with frozen_weights(built.model):
            key, value = evaluate_model(built.model, splits or self.splits, split or self.config.split,
                                        self.config.eval_batch_size)
        return {"accuracy" if key == "accuracy" else "loss": value, "metric_" + key: value}

    def cost(self, built: Built, wanted: set[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        model = built.model
        if "model_bytes" in wanted:
            out["model_bytes"] = float(report(model, model, lambda m: None)["model_bytes"] if built.table
                                       else fp32_bytes(model))
        if "flops" in wanted:
            out["flops"] = float(count_flops(model, self.example))
        if "latency_ms" in wanted:
            out |= self.latency(built)
        if "roofline_ms" in wanted:
            out["roofline_ms"] = 1e3 * roofline_as_it_runs(built, self.loaded, self.ctx.hardware)["latency_s"]
        if "systolic_energy_uj" in wanted:
            out["systolic_energy_uj"] = energy_uj(built, self.loaded)
        return out

    def latency(self, built: Built) -> dict[str, float]:
        """The candidate on its backend timed beside the baseline (see the module docstring)."""
        c = self.config
        if self._reference is None:
            self._reference = build(parse_backend(c.baseline_backend), self.model, self.loaded)
        fn = build(parse_backend(built.backend), built.model, self.loaded)
        m = measure({"baseline": lambda: call(self._reference, self.loaded), "candidate": lambda: call(fn, self.loaded)},
                    TimingConfig(rounds=c.rounds, warmup=2))
        ratio = m.timings["candidate"].median / m.timings["baseline"].median
        return {"latency_ms": ratio * c.baseline_ms, "latency_ratio": ratio,
                "measured_ms": 1e3 * m.timings["candidate"].median,
                "contended": float(m.timings["candidate"].contended)}


def energy_uj(built: Built, loaded: LoadedModel) -> float | None:
    """The candidate's GEMMs on kiln's systolic-array model (kiln.hw.systolic): a quantized
    layer's (Linear or convolution) at 8-bit operands (its inputs are int8; narrower weights are
    stored, not multiplied, narrower), every other GEMM (attention, float layers) at 32; None
    without a GEMM."""
    gemms = graph_gemms(capture(replace(loaded, model=built.model.eval())))
    if not gemms:
        return None
    bits = {g.name: 8 if g.name in built.bits else 32 for g in gemms}
    return systolic_scores(gemms, bits, {"systolic_energy_uj"}, HwConfig())["systolic_energy_uj"]


def roofline_as_it_runs(built: Built, loaded: LoadedModel, hardware: str) -> dict[str, Any]:
    """FLOPs, bytes and roofline latency of a built candidate as it runs on `hardware`: an
    int8 candidate's quant record unwraps its fake quantization into the formats it runs in."""
    model, execution = built.model, None
    if built.table is not None:
        record = quant_record(built.model, parse_config(built.table, "optimize trial"))
        model, execution = as_it_runs(copy.deepcopy(built.model), [record])
    return roofline_point(replace(loaded, model=model.eval()), hardware, execution)


def roofline_point(loaded: LoadedModel, hardware: str, execution=None) -> dict[str, Any]:
    """One model call's FLOPs, bytes and roofline latency (as it runs where `execution` says)."""
    profile = load_profile(hardware)
    with torch.no_grad():
        a = analyze(loaded, profile, measure_time=False, execution=execution)
    if a.runs_as is not None:
        r = a.runs_as
        return {"flops": r.flops, "bytes": r.bytes, "latency_s": r.roofline.latency_s, "bound": r.roofline.bound.value}
    return {"flops": a.flops, "bytes": a.cost.bytes, "latency_s": a.roofline.latency_s, "bound": a.roofline.bound.value}
