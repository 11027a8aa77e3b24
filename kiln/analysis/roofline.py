"""Roofline latency per node and in total on a hardware profile.

Each op takes max(FLOPs / peak, bytes / bandwidth) on its own (no overlap between ops, no
fusion: the unfused bound a compiler starts from); the model's latency is the sum. A node is
compute-bound when its arithmetic intensity is above the ridge point of its dtype.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kiln.graph.graph import Graph
from kiln.graph.node import Cost
from kiln.hardware.profiles import DTYPE_KEYS, HardwareProfile


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


def node_roofline(cost: Cost, dtype: str, hw: HardwareProfile) -> NodeRoofline:
    peak, key = hw.peak_for(dtype)
    t_compute = cost.flops / peak
    t_memory = cost.bytes / hw.memory_bandwidth
    if t_compute == 0 and t_memory == 0:
        return NodeRoofline(0.0, Bound.NONE, key)
    bound = Bound.COMPUTE if t_compute >= t_memory else Bound.MEMORY
    return NodeRoofline(max(t_compute, t_memory), bound, key)


def roofline(graph: Graph, hw: HardwareProfile) -> tuple[dict[str, NodeRoofline], RooflineRecord]:
    """Per-node rooflines (by node name) and the model's total; needs the cost pass first."""
    per_node: dict[str, NodeRoofline] = {}
    compute = memory = 0.0
    fallback: set[str] = set()
    for n in graph.ops:
        dtype = _compute_dtype(n, graph)
        r = node_roofline(n.cost, dtype, hw)
        per_node[n.name] = r
        compute += r.latency_s if r.bound is Bound.COMPUTE else 0.0
        memory += r.latency_s if r.bound is Bound.MEMORY else 0.0
        if n.cost.flops and DTYPE_KEYS.get(dtype) not in hw.peak_flops:
            fallback.add(dtype)
    total = compute + memory
    bound = Bound.COMPUTE if compute >= memory else Bound.MEMORY
    return per_node, RooflineRecord(hw.name, total, compute, memory, bound, tuple(sorted(fallback)))


def _compute_dtype(node, graph: Graph) -> str:
    """The dtype the op computes in: its first floating input's, else its output's."""
    for name in node.inputs:
        d = graph[name].dtype
        if d.startswith(("float", "bfloat", "int8", "uint8")):
            return d
    return node.dtype
