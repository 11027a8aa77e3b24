"""What a study optimises: named objectives with a direction, and the measurements behind them.

A search space scores a candidate into a `Scores` dict (objective name -> value); the study
keeps the values of the objectives its config names, in that order. The cost measurements
(FLOPs, measured or roofline latency, bytes) are plain functions any space can call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.oracle import flop_counter_flops
from kiln.analysis.roofline import roofline
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.passes import PassManager
from kiln.hardware.profiles import load_profile
from kiln.hw.estimate import estimate_model, parse_target
from kiln.hw.systolic import ArrayConfig, Gemm, layer_cost, parse_array, parse_dataflow
from kiln.models.loaded import LoadedModel
from kiln.registry import Registry
from kiln.timing import TimingConfig, measure

Scores = dict[str, float]


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str          # "max" or "min"
    unit: str
    description: str


OBJECTIVES: Registry[Objective] = Registry("objective")


def _objective(name: str, direction: str, unit: str, description: str) -> None:
    OBJECTIVES.register(name)(Objective(name, direction, unit, description))


_objective("accuracy", "max", "", "task metric on the scoring split (accuracy for classifiers)")
_objective("loss", "min", "", "task loss on the scoring split")
_objective("avg_bits", "min", "bits", "average weight bits over the quantized layers")
_objective("model_bytes", "min", "B", "stored model size: quantized weights at their bits, the rest at dtype width")
_objective("params", "min", "", "parameter count")
_objective("flops", "min", "FLOP", "FLOPs of one forward on the example input (torch.utils.flop_counter)")
_objective("latency_ms", "min", "ms", "measured eager forward time on the example input, median")
_objective("roofline_ms", "min", "ms", "roofline latency of the captured graph on a hardware profile")
_objective("luts", "min", "", "FPGA LUTs of kiln hw emit's design, estimated (kiln.hw.estimate, calibrated on yosys)")
_objective("dsps", "min", "", "FPGA DSP blocks of kiln hw emit's design (yosys's mapping rules)")
_objective("fpga_cycles", "min", "cycles", "latency in cycles of kiln hw emit's design, input to output")
_objective("systolic_cycles", "min", "cycles", "cycles on a systolic array (kiln.hw.systolic, SCALE-Sim's compute model)")
_objective("systolic_energy_uj", "min", "uJ", "energy on a systolic array from per-access energies (Horowitz ISSCC 2014)")
FPGA_OBJECTIVES = frozenset({"luts", "dsps", "fpga_cycles"})
SYSTOLIC_OBJECTIVES = frozenset({"systolic_cycles", "systolic_energy_uj"})


@dataclass(frozen=True)
class HwConfig:
    """Where the hardware objectives price a candidate: the FPGA `target` of kiln hw emit's
    design at reuse factor `reuse` per dense layer (0: K, one multiplier per output), and a
    systolic `array` (ROWSxCOLS) with its `dataflow`; the SRAMs and bandwidth are
    kiln.hw.systolic.ArrayConfig's defaults."""

    target: str = "ice40"
    reuse: int = 0
    array: str = "16x16"
    dataflow: str = "ws"

    def __post_init__(self):
        parse_target(self.target)
        parse_array(self.array)
        parse_dataflow(self.dataflow)
        if self.reuse < 0:
            raise KilnError(f"hw: reuse must be >= 0 (0: K per layer), got {self.reuse}")


def fpga_scores(qmodel: nn.Module, example, wanted: set[str], hw: HwConfig) -> Scores:
    """LUTs, DSPs and cycles of the design kiln hw emit would make of a quantized model, from
    the estimator (no synthesis)."""
    if not wanted & FPGA_OBJECTIVES:
        return {}
    est = estimate_model(qmodel, example, parse_target(hw.target), hw.reuse)
    return {"luts": float(est.luts), "dsps": float(est.dsps), "fpga_cycles": float(est.latency)}


def systolic_scores(gemms: list[Gemm], bits_of: dict[str, int], wanted: set[str], hw: HwConfig) -> Scores:
    """Cycles and energy of a model's GEMMs on a systolic array, each at its layer's operand
    width (`bits_of` by module FQN; 8 where absent); cycles do not depend on width."""
    if not wanted & SYSTOLIC_OBJECTIVES:
        return {}
    rows, cols = parse_array(hw.array)
    cfg = ArrayConfig(rows, cols, parse_dataflow(hw.dataflow))
    costs = [layer_cost(g, replace(cfg, word_bits=int(bits_of.get(g.name, 8)))) for g in gemms]
    return {"systolic_cycles": float(sum(c.cycles for c in costs)),
            "systolic_energy_uj": sum(c.energy_pj for c in costs) * 1e-6}


def resolve(names: tuple[str, ...]) -> list[Objective]:
    """The objectives named in a config, checked: at least one, each known, none twice."""
    if not names:
        raise KilnError("search config: objectives needs at least one name; known: "
                        + ", ".join(OBJECTIVES.names()))
    if len(set(names)) != len(names):
        raise KilnError(f"search config: objectives {list(names)} name one objective twice")
    return [OBJECTIVES.get(n) for n in names]


def pick(scores: Scores, objectives: list[Objective], space: str) -> list[float]:
    """The values a trial reports, in the config's order; a missing one is a KilnError naming it."""
    missing = [o.name for o in objectives if o.name not in scores]
    if missing:
        raise KilnError(f"search space {space!r} does not measure {missing[0]!r}; "
                        f"it measures: {', '.join(sorted(scores))}")
    return [float(scores[o.name]) for o in objectives]


def param_count(model: nn.Module) -> int:
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def fp32_bytes(model: nn.Module) -> int:
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def count_flops(model: nn.Module, inputs: tuple) -> int:

    return flop_counter_flops(LoadedModel("search-candidate", model, tuple(inputs)))


def measured_latency_ms(model: nn.Module, inputs: tuple, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `repeats` eager forwards (after `warmup`), in milliseconds (kiln.timing:
    measured again when contended)."""
    was_training = model.training
    model.eval()
    try:
        m = measure({"model": lambda: model(*inputs)}, TimingConfig(rounds=repeats, warmup=warmup))
    finally:
        model.train(was_training)
    return 1e3 * m["model"].median


def roofline_ms(model: nn.Module, inputs: tuple, hardware: str) -> float:
    """Roofline latency (max of compute and memory time per op, summed) of the captured graph."""

    graph = capture(LoadedModel("search-candidate", model.eval(), tuple(inputs)))
    PassManager([AnnotateCost()]).run(graph)
    return 1e3 * roofline(graph, load_profile(hardware))[1].latency_s


def cost_scores(model: nn.Module, inputs: tuple, wanted: set[str], hardware: str = "h100") -> Scores:
    """The cost objectives among `wanted` that depend only on the model and its input."""
    out: Scores = {}
    if "params" in wanted:
        out["params"] = float(param_count(model))
    if "model_bytes" in wanted:
        out["model_bytes"] = float(fp32_bytes(model))
    if "flops" in wanted:
        out["flops"] = float(count_flops(model, inputs))
    if "latency_ms" in wanted:
        out["latency_ms"] = measured_latency_ms(model, inputs)
    if "roofline_ms" in wanted:
        out["roofline_ms"] = roofline_ms(model, inputs, hardware)
    return out
