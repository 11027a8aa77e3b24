"""The full analysis of a model: totals, roll-ups, roofline and measured time, as one record.

`analyze(loaded, hardware)` is the verb; `Analysis.to_json()` is the documented schema
(README, "analysis JSON").
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from kiln.analysis.cost import AnnotateCost, CostRecord
from kiln.analysis.execution import AsItRuns, Execution, as_it_runs
from kiln.analysis.measure import MeasuredRecord, measure
from kiln.analysis.memory import MemoryRecord, peak_activation
from kiln.analysis.roofline import NodeRoofline, RooflineRecord, roofline
from kiln.graph.capture import capture
from kiln.graph.graph import Graph
from kiln.graph.passes import PassManager
from kiln.hardware.profiles import HardwareProfile
from kiln.models.loaded import LoadedModel, is_meta

SCHEMA_VERSION = 1


@dataclass
class Analysis:
    loaded: LoadedModel
    graph: Graph
    hardware: HardwareProfile
    cost: CostRecord
    memory: MemoryRecord
    node_roofline: dict[str, NodeRoofline]
    roofline: RooflineRecord
    measured: MeasuredRecord | None
    params: int
    param_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    weights: bool = True      # False: built on the meta device, no weight materialised (kiln.models.meta)
    runs_as: AsItRuns | None = None   # a compressed artifact's cost as it runs (kiln.analysis.execution)

    @property
    def flops(self) -> int:
        return self.cost.flops

    def rows(self) -> list[dict]:
        """One row per op node, in graph order."""
        measured = self.measured.per_node_s if self.measured else {}
        rows = []
        for n in self.graph.ops:
            r = self.node_roofline[n.name]
            rows.append({
                "name": n.name, "op": n.op, "target": n.target, "module": n.module,
                "module_type": n.module_type, "shape": list(n.shape), "dtype": n.dtype,
                "flops": n.cost.flops, "bytes": n.cost.bytes, "bytes_read": n.cost.bytes_read,
                "bytes_written": n.cost.bytes_written, "params": list(n.params),
                "intensity": n.cost.intensity, "roofline_s": r.latency_s, "bound": r.bound.value,
                "measured_s": measured.get(n.name),
            })
        return rows

    def by_module(self, depth: int) -> list[dict]:
        """Roll-up per module prefix of `depth` dotted components ('(root)' for ops at the top).

        A group's params are those whose owning module truncates to the same prefix, so the
        groups' params add up to the model's."""
        def key(module: str) -> str:
            return ".".join(module.split(".")[:depth]) if depth else "(root)"

        params: dict[str, int] = defaultdict(int)
        for name, p in _unique_params(self.loaded.model):
            params[key(name.rpartition(".")[0]) or "(root)"] += p.numel()
        rows = _rollup(self.rows(), lambda r: key(r["module"]) or "(root)", "module", lambda k: params.pop(k, 0))
        rows += [{"module": k, "count": 0, "flops": 0, "bytes": 0, "roofline_s": 0.0, "measured_s": 0.0,
                  "params": v} for k, v in params.items()]   # modules whose params no op reads directly
        return rows

    def by_op(self) -> list[dict]:
        return _rollup(self.rows(), lambda r: r["op"], "op", None)

    def to_json(self, depth: int = 2) -> dict:
        m = self.measured
        hw = self.hardware
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.loaded.spec,
            "description": self.loaded.description,
            "family": self.loaded.family,
            "inputs": [{"name": n.name, "shape": list(n.shape), "dtype": n.dtype}
                       for n in self.graph.nodes if n.kind.value == "input"],
            "params": self.params, "param_bytes": self.param_bytes,
            "weights_materialised": self.weights,
            "flops": self.flops, "macs": self.flops // 2, "bytes": self.cost.bytes,
            "peak_activation_bytes": self.memory.peak_activation_bytes,
            "peak_activation_at": self.memory.peak_at,
            "uncounted_ops": list(self.cost.uncounted_ops),
            "cond_branches": list(self.cost.branches),    # FLOPs of a torch.cond are its taken branch's
            "nodes": self.rows(),
            "modules": self.by_module(depth), "module_depth": depth,
            "ops": self.by_op(),
            "roofline": {
                "hardware": hw.name, "peak_flops": hw.peak_flops, "memory_bandwidth": hw.memory_bandwidth,
                "latency_s": self.roofline.latency_s, "bound": self.roofline.bound.value,
                "compute_bound_s": self.roofline.compute_s, "memory_bound_s": self.roofline.memory_s,
                "fallback_dtypes": list(self.roofline.fallback_dtypes),
            },
            "measured": None if m is None else {
                "ops_s": m.ops_s, "eager_s": m.eager_s, "graph_s": m.graph_s, "threads": m.threads,
                "repeats": m.repeats, "eager": m.eager, "graph": m.graph, "contended_ops": m.contended_ops,
                "note": m.note,
            },
            "timings_s": self.timings,
            "as_it_runs": self.runs_as.to_json() if self.runs_as else None,
        }


def _unique_params(model: torch.nn.Module):
    return model.named_parameters(remove_duplicate=True)


def _rollup(rows: list[dict], key, label: str, params_of) -> list[dict]:
    groups: dict[str, dict] = defaultdict(lambda: {"count": 0, "flops": 0, "bytes": 0,
                                                   "roofline_s": 0.0, "measured_s": 0.0})
    for r in rows:
        g = groups[key(r)]
        g["count"] += 1
        g["flops"] += r["flops"]
        g["bytes"] += r["bytes"]
        g["roofline_s"] += r["roofline_s"]
        g["measured_s"] += r["measured_s"] or 0.0
    out = []
    for k, g in groups.items():
        row = {label: k, **g}
        if params_of is not None:
            row["params"] = params_of(k)
        out.append(row)
    return out


def analyze(loaded: LoadedModel, hardware: HardwareProfile, measure_time: bool = True,
            repeats: int = 5, progress=lambda stage: None, execution: Execution | None = None) -> Analysis:
    """Capture, cost, memory, roofline and (optionally) measured per-op time of a model.

    A model without weights (meta device) is analysed from shapes alone: nothing is measured.
    `execution` (a compressed artifact's number formats and sparsity) adds its cost as it runs."""
    timings = {}
    weights = not is_meta(loaded.model)
    measure_time = measure_time and weights
    t0 = time.perf_counter()
    progress("capture")
    graph = capture(loaded)
    timings["capture"] = time.perf_counter() - t0
    progress("cost")
    t0 = time.perf_counter()
    result = PassManager([AnnotateCost()]).run(graph)
    cost = result.record[0][1]
    memory = peak_activation(graph)
    per_node, total = roofline(graph, hardware)
    runs_as = as_it_runs(graph, execution, hardware) if execution is not None else None
    timings["analysis"] = time.perf_counter() - t0
    measured = None
    if measure_time:
        progress("measure")
        t0 = time.perf_counter()
        measured = measure(graph, loaded, repeats=repeats)
        timings["measure"] = time.perf_counter() - t0
    params = list(_unique_params(loaded.model))
    return Analysis(
        loaded, graph, hardware, cost, memory, per_node, total, measured,
        params=sum(p.numel() for _, p in params),
        param_bytes=sum(p.numel() * p.element_size() for _, p in params), timings=timings, weights=weights,
        runs_as=runs_as,
    )
