"""Peak activation memory from tensor liveness over the captured graph's schedule.

Model: ops run in graph order; an op's outputs are allocated when it runs while its inputs
are still alive; a tensor is freed after the last op that reads it or any view of it. Graph
outputs live to the end. Parameters, buffers and constants are not activations (they are
reported as param_bytes). A multi-output op keeps all its outputs until the last of them dies.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.graph.graph import Graph
from kiln.graph.node import NodeKind


@dataclass(frozen=True)
class MemoryRecord:
    peak_activation_bytes: int
    peak_at: str              # the node during which the peak is reached
    input_bytes: int
    output_bytes: int


def peak_activation(graph: Graph) -> MemoryRecord:
    storage: dict[str, str | None] = {}   # node -> the node that owns its storage (None: weights)
    size: dict[str, int] = {}
    last_use: dict[str, int] = {}
    nodes = graph.nodes
    for i, n in enumerate(nodes):
        if n.kind in (NodeKind.PARAM, NodeKind.BUFFER, NodeKind.CONSTANT):
            storage[n.name] = None
        elif n.kind is NodeKind.OP and n.is_view:
            storage[n.name] = next((storage[a] for a in n.inputs if a in storage), None)
        elif n.kind in (NodeKind.INPUT, NodeKind.OP):
            storage[n.name] = n.name
            size[n.name] = n.out_bytes
        end = len(nodes) if n.kind is NodeKind.OUTPUT else i
        for a in (*n.inputs, n.name):
            owner = storage.get(a)
            if owner is not None:
                last_use[owner] = max(last_use.get(owner, i), end)

    live = peak = 0
    peak_at = ""
    dying: dict[int, list[str]] = {}
    for owner, t in last_use.items():
        dying.setdefault(t, []).append(owner)
    for i, n in enumerate(nodes):
        if storage.get(n.name) == n.name:
            live += size[n.name]
        if live > peak:
            peak, peak_at = live, n.name
        for owner in dying.get(i, ()):
            live -= size[owner]
    inputs = sum(n.out_bytes for n in nodes if n.kind is NodeKind.INPUT)
    out_node = next((n for n in nodes if n.kind is NodeKind.OUTPUT), None)
    outputs = sum(graph[a].out_bytes for a in out_node.inputs) if out_node else 0
    return MemoryRecord(peak, peak_at, inputs, outputs)
