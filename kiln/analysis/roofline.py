"""Roofline latency per node and in total on a hardware profile.

Each op takes max(FLOPs / peak, bytes / bandwidth) on its own (no overlap between ops, no
fusion: the unfused bound a compiler starts from); the model's latency is the sum. A node is
compute-bound when its arithmetic intensity is above the ridge point of its dtype.

Each op is judged against its own dtype's peak. A float model run at lower precision (a bf16
or int8 backend) is judged against that precision's peak with `as_dtype`, never against
fp32's: a bf16 matmul on a CPU with AMX runs many times faster than the fp32 peak allows.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from kiln.graph.graph import Graph
from kiln.graph.node import Cost
from kiln.hardware.profiles import DTYPE_KEYS, HardwareProfile

# bytes per element of the float and integer dtypes a model computes in
WIDTH = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
# the torch dtype each profile key stands for
KEY_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


class Bound(enum.Enum):
    COMPUTE = "compute"
    MEMORY = "memory"
    NONE = "none"      # moves and computes nothing (views)


@dataclass(frozen=True)
class NodeRoofline:
    latency_s: float
    bound: Bound
    dtype_key: str      # the profile figure used (e.g. fp32; the fallback when missing)


@dataclass(frozen=True)
class RooflineRecord:
    hardware: str
    latency_s: float
    compute_s: float    # summed compute time of compute-bound nodes
    memory_s: float     # summed memory time of memory-bound nodes
    bound: Bound        # which side dominates the total
    fallback_dtypes: tuple[str, ...]


def node_roofline(cost: Cost, dtype: str, hw: HardwareProfile, key: str | None = None) -> NodeRoofline:
    """`key` (a profile key such as int8) overrides the peak the dtype would choose."""
    peak, key = (hw.peak_flops[key], key) if key in hw.peak_flops else hw.peak_for(dtype)
    t_compute = cost.flops / peak
    t_memory = cost.bytes / hw.memory_bandwidth
    if t_compute == 0 and t_memory == 0:
        return NodeRoofline(0.0, Bound.NONE, key)
    bound = Bound.COMPUTE if t_compute >= t_memory else Bound.MEMORY
    return NodeRoofline(max(t_compute, t_memory), bound, key)


def roofline(graph: Graph, hw: HardwareProfile, as_dtype: str | None = None,
             effective: dict[str, tuple[Cost, str]] | None = None) -> tuple[dict[str, NodeRoofline], RooflineRecord]:
    """Per-node rooflines (by node name) and the model's total; needs the cost pass first.

    `as_dtype` (a torch dtype name, e.g. 'bfloat16'): cost every floating op as computing in it,
    its bytes scaled by the narrower element (an int8 path's wider outputs make the bound a
    little optimistic, as a bound may be). `effective` (kiln.analysis.execution): node name ->
    (cost, profile key) of the ops a compressed model runs differently."""
    per_node: dict[str, NodeRoofline] = {}
    compute = memory = 0.0
    fallback: set[str] = set()
    for n in graph.ops:
        dtype, cost = _compute_dtype(n, graph), n.cost
        if as_dtype and dtype.startswith(("float", "bfloat")) and dtype in WIDTH:
            scale = WIDTH[as_dtype] / WIDTH[dtype]
            cost = replace(cost, bytes_read=int(cost.bytes_read * scale), bytes_written=int(cost.bytes_written * scale))
            dtype = as_dtype
        key = None
        if effective and n.name in effective:
            cost, key = effective[n.name]
        r = node_roofline(cost, dtype, hw, key)
        per_node[n.name] = r
        compute += r.latency_s if r.bound is Bound.COMPUTE else 0.0
        memory += r.latency_s if r.bound is Bound.MEMORY else 0.0
        if cost.flops and (key or DTYPE_KEYS.get(dtype)) not in hw.peak_flops:
            fallback.add(dtype)
    total = compute + memory
    bound = Bound.COMPUTE if compute >= memory else Bound.MEMORY
    return per_node, RooflineRecord(hw.name, total, compute, memory, bound, tuple(sorted(fallback)))


def by_precision(graph: Graph, hw: HardwareProfile, keys: tuple[str, ...] = ("fp32", "bf16", "int8")) -> dict:
    """The model's roofline latency at each precision key, each against its own peak, and the
    keys the profile has no peak for (costed at its fallback instead)."""
    out: dict = {"latency_s": {}, "fallback": []}
    for key in keys:
        record = roofline(graph, hw, as_dtype=KEY_DTYPES[key])[1]
        out["latency_s"][key] = record.latency_s
        if key not in hw.peak_flops:
            out["fallback"].append(key)
    return out


def _compute_dtype(node, graph: Graph) -> str:
    """The dtype the op computes in: its first floating input's, else its output's."""
    for name in node.inputs:
        d = graph[name].dtype
        if d.startswith(("float", "bfloat", "int8", "uint8")):
            return d
    return node.dtype
