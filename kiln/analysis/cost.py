"""The cost pass: FLOPs and bytes read/written on every op node of a Graph."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.analysis.flops import FORMULAS, decomposes, dispatch_flops
from kiln.graph.graph import Graph, target_name, tensor_metas
from kiln.graph.node import Cost, Node, NodeKind
from kiln.graph.passes import PassResult


@dataclass(frozen=True)
class CostRecord:
    flops: int
    bytes: int
    uncounted_ops: tuple[str, ...]   # decomposable ops whose FLOPs could not be found


class AnnotateCost:
    """Sets `node.cost` on every op node. FLOPs follow torch.utils.flop_counter's convention."""

    name = "annotate_cost"

    def __call__(self, graph: Graph) -> PassResult[CostRecord]:
        uncounted: set[str] = set()
        for fx_node, node in graph.fx_nodes():
            if node.kind is not NodeKind.OP:
                continue
            node.cost = node_cost(fx_node, node, graph)
            if not node.cost.counted:
                uncounted.add(node.target)
        ops = graph.ops
        record = CostRecord(
            sum(n.cost.flops for n in ops), sum(n.cost.bytes for n in ops), tuple(sorted(uncounted))
        )
        return PassResult(graph, False, record)


# Composite ops that only move or reinterpret data: no FLOPs, and `to` fails on meta tensors.
NO_FLOPS = frozenset({
    "to", "type_as", "contiguous", "reshape", "flatten", "unflatten", "view_as", "expand_as",
    "reshape_as", "dropout", "feature_dropout", "alpha_dropout", "size", "numel", "chunk", "split",
})


# Lookups whose first argument is a table read only where indexed.
GATHERS = frozenset({"embedding", "index_select", "index", "gather", "embedding_bag"})


def _shape(a: Any):
    val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def node_cost(fx_node: torch.fx.Node, node: Node, graph: Graph) -> Cost:
    flops, counted = _flops(fx_node, node.op, graph.program.graph_module)
    if node.is_view:
        return Cost(flops, 0, 0, counted)
    if node.op in GATHERS:
        # a lookup reads only the rows it gathers (as many bytes as it writes) and its indices
        table = fx_node.args[0].name if isinstance(fx_node.args[0], torch.fx.Node) else None
        read = node.out_bytes + sum(graph[a].out_bytes for a in dict.fromkeys(node.inputs) if a != table)
        return Cost(flops, read, node.out_bytes, counted)
    read = sum(graph[a].out_bytes for a in dict.fromkeys(node.inputs))
    return Cost(flops, read, node.out_bytes, counted)


def _flops(fx_node: torch.fx.Node, op: str, root: torch.nn.Module) -> tuple[int, bool]:
    if op in FORMULAS:
        ins = [_shape(a) for a in fx_node.args]
        outs = [t.shape for t in tensor_metas(fx_node.meta.get("val"))]
        return FORMULAS.get(op)(op, ins, outs, fx_node.args), True
    if op.startswith("wrap_with_"):   # an autocast or grad-mode region: cost its subgraph's ops
        sub = next(getattr(root, a.target) for a in fx_node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        total, counted = 0, True
        for inner in sub.graph.nodes:
            if inner.op == "call_function":
                flops, ok = _flops(inner, target_name(inner.target)[1], sub)
                total, counted = total + flops, counted and ok
        return total, counted
    if op in NO_FLOPS or not decomposes(fx_node.target):
        return 0, True
    try:
        args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), _meta_tensor)
        return dispatch_flops(fx_node.target, args, kwargs), True
    except Exception:  # an op without meta support: report it rather than guess
        return 0, False


def _meta_tensor(a: torch.fx.Node) -> Any:
    val = a.meta.get("val")
    if isinstance(val, torch.Tensor):
        return torch.empty(tuple(int(d) for d in val.shape), dtype=val.dtype, device="meta")
    return val
