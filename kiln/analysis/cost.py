"""The cost pass: FLOPs and bytes read/written on every op node of a Graph."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln.analysis.flops import FORMULAS, decomposes, dispatch_flops
from kiln.graph.graph import Graph, target_name, tensor_metas
from kiln.graph.node import Cost, Node, NodeKind
from kiln.graph.passes import PassResult


@dataclass(frozen=True)
class CostRecord:
    flops: int
    bytes: int
    uncounted_ops: tuple[str, ...]   # ops whose FLOPs could not be found (counted as 0)
    branches: tuple[str, ...] = ()   # for each torch.cond, which branch the FLOPs are of


class AnnotateCost:
    """Sets `node.cost` on every op node. FLOPs follow torch.utils.flop_counter's convention."""

    name = "annotate_cost"

    def __call__(self, graph: Graph) -> PassResult[CostRecord]:
        uncounted: set[str] = set()
        taken = taken_branches(graph.program)
        for fx_node, node in graph.fx_nodes():
            if node.kind is not NodeKind.OP:
                continue
            node.cost = node_cost(fx_node, node, graph, taken)
            if not node.cost.counted:
                uncounted.add(node.target)
        ops = graph.ops
        branches = tuple(f"{name}: the {'true' if t else 'false'} branch, taken by the example input"
                         for name, t in taken.items())
        record = CostRecord(sum(n.cost.flops for n in ops), sum(n.cost.bytes for n in ops),
                            tuple(sorted(uncounted)), branches)
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


def node_cost(fx_node: torch.fx.Node, node: Node, graph: Graph, taken: dict[str, bool] | None = None) -> Cost:
    flops, counted = _flops(fx_node, node.op, graph.program.graph_module, taken or {})
    if node.is_view:
        return Cost(flops, 0, 0, counted)
    if node.op in GATHERS:
        # a lookup reads only the rows it gathers (as many bytes as it writes) and its indices
        table = fx_node.args[0].name if isinstance(fx_node.args[0], torch.fx.Node) else None
        read = node.out_bytes + sum(graph[a].out_bytes for a in dict.fromkeys(node.inputs) if a != table)
        return Cost(flops, read, node.out_bytes, counted)
    read = sum(graph[a].out_bytes for a in dict.fromkeys(node.inputs))
    return Cost(flops, read, node.out_bytes, counted)


def _flops(fx_node: torch.fx.Node, op: str, root: torch.nn.Module, taken: dict[str, bool]) -> tuple[int, bool]:
    if op in FORMULAS:
        ins = [_shape(a) for a in fx_node.args]
        outs = [t.shape for t in tensor_metas(fx_node.meta.get("val"))]
        return FORMULAS.get(op)(op, ins, outs, fx_node.args), True
    if op.startswith("wrap_with_"):   # an autocast or grad-mode region: cost its subgraph's ops
        sub = next(getattr(root, a.target) for a in fx_node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        return _subgraph_flops(sub)
    if fx_node.target is torch.ops.higher_order.cond and fx_node.name in taken:
        # the branch the example input takes: what eager (and flop_counter) runs for it
        return _subgraph_flops(getattr(root, fx_node.args[1 if taken[fx_node.name] else 2].target))
    if isinstance(fx_node.target, torch._ops.HigherOrderOperator):
        return 0, False   # a loop, map, scan or a cond inside a region: listed as uncounted, never free
    if op in NO_FLOPS or not decomposes(fx_node.target):
        return 0, True
    try:
        args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), _meta_tensor)
        return dispatch_flops(fx_node.target, args, kwargs), True
    except Exception:  # an op without meta support: report it rather than guess
        return 0, False


def _subgraph_flops(sub: torch.fx.GraphModule) -> tuple[int, bool]:
    total, counted = 0, True
    for inner in sub.graph.nodes:
        if inner.op == "call_function":
            flops, ok = _flops(inner, target_name(inner.target)[1], sub, {})
            total, counted = total + flops, counted and ok
    return total, counted


def taken_branches(program: torch.export.ExportedProgram) -> dict[str, bool]:
    """Which branch each top-level torch.cond takes for the inputs the program was exported
    with (the graph alone cannot say: the predicate is data): found by running the program
    once. Empty when there is no cond, or when it cannot run (its conds then stay uncounted)."""
    if not any(n.target is torch.ops.higher_order.cond for n in program.graph.nodes):
        return {}
    taken: dict[str, bool] = {}

    class Watch(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.op == "call_function" and n.target is torch.ops.higher_order.cond:
                pred = n.args[0]
                taken[n.name] = bool(self.env[pred] if isinstance(pred, torch.fx.Node) else pred)
            return super().run_node(n)

    try:
        with torch.no_grad():
            Watch(program.module()).run(*pytree.tree_leaves(program.example_inputs), enable_io_processing=False)
    except Exception:   # inputs not kept with the program, or not runnable here: say uncounted
        return {}
    return taken


def _meta_tensor(a: torch.fx.Node) -> Any:
    val = a.meta.get("val")
    if isinstance(val, torch.Tensor):
        return torch.empty(tuple(int(d) for d in val.shape), dtype=val.dtype, device="meta")
    return val
