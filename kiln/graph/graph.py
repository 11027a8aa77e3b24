"""kiln's graph: a torch.export program plus one typed record per node."""
from __future__ import annotations

import operator
from typing import Any, Iterator

import torch

from kiln.graph.node import Node, NodeKind, TensorMeta


def _dim(d: Any) -> int:
    """A concrete size: symbolic dims (dynamic export) report their example value."""
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    # an unbacked size (a count read off the data): draft export records the example's value
    known = getattr(getattr(node, "shape_env", None), "unbacked_var_to_val", None)
    if known:
        value = node.expr.xreplace(known)
        if value.is_number:
            return int(value)
    return int(d)


def tensor_metas(val: Any) -> tuple[TensorMeta, ...]:
    """TensorMeta for every tensor in a node's example value (a tensor, or a nest of them)."""
    if isinstance(val, torch.Tensor):
        return (TensorMeta(tuple(_dim(d) for d in val.shape), str(val.dtype).removeprefix("torch.")),)
    if isinstance(val, (list, tuple)):
        return tuple(m for v in val for m in tensor_metas(v))
    return ()


def target_name(target: Any) -> tuple[str, str]:
    """('aten.linear.default', 'linear') for an OpOverload; the function name otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target), target.overloadpacket.__name__
    if target is operator.getitem:
        return "getitem", "getitem"
    name = getattr(target, "__name__", str(target))
    return name, name


def _innermost_module(fx_node: torch.fx.Node) -> tuple[str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    fqn, mtype = list(stack.values())[-1]
    mtype = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
    return fqn, mtype.rsplit(".", 1)[-1]


# Ops that check or describe tensors and move no data (export inserts metadata asserts).
NO_DATA = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size",
                     "sym_size", "sym_numel", "sym_stride"})


def _is_view(fx_node: torch.fx.Node) -> bool:
    target = fx_node.target
    if target is operator.getitem:
        return True
    if isinstance(target, torch._ops.OpOverload):
        if target.is_view or target.overloadpacket.__name__ in NO_DATA:
            return True
        # dropout in eval mode hands back its input; it moves nothing
        if target.overloadpacket.__name__ in ("dropout", "alias", "detach") and not _arg(fx_node, 2, "train", True):
            return True
    return False


def _arg(fx_node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(fx_node.args) > index:
        return fx_node.args[index]
    return fx_node.kwargs.get(name, default)


class Graph:
    """A captured model: the ExportedProgram and a `Node` record per FX node, in order.

    Records are rebuilt from the program by `refresh()` after a pass edits the FX graph;
    analysis passes attach their results to the records (`node.cost`, ...).
    """

    def __init__(self, program: torch.export.ExportedProgram, name: str = "model"):
        self.program = program
        self.name = name
        self.nodes: list[Node] = []
        self.refresh()

    def refresh(self) -> None:
        sig = self.program.graph_signature
        kinds = {name: NodeKind.PARAM for name in sig.inputs_to_parameters}
        kinds |= {name: NodeKind.BUFFER for name in sig.inputs_to_buffers}
        kinds |= {name: NodeKind.CONSTANT for name in sig.inputs_to_lifted_tensor_constants}
        fqn_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        records: list[Node] = []
        for n in self.program.graph.nodes:
            records.append(self._record(n, kinds, fqn_of))
        self.nodes = records
        self._by_name = {r.name: r for r in records}

    def _record(self, n: torch.fx.Node, kinds: dict, fqn_of: dict) -> Node:
        inputs = tuple(a.name for a in n.all_input_nodes)
        outputs = tensor_metas(n.meta.get("val"))
        if n.op == "placeholder":
            kind = kinds.get(n.name, NodeKind.INPUT)
            return Node(n.name, kind, fqn_of.get(n.name, n.name), kind.value, outputs=outputs)
        if n.op == "output":
            return Node(n.name, NodeKind.OUTPUT, "output", "output", inputs=inputs)
        if n.op == "get_attr":   # a submodule (the body of an autocast region) or a constant
            return Node(n.name, NodeKind.CONSTANT, str(n.target), "get_attr", outputs=outputs)
        target, op = target_name(n.target)
        module, mtype = _innermost_module(n)
        params = tuple(fqn_of[a] for a in inputs if a in fqn_of)
        return Node(n.name, NodeKind.OP, target, op, module, mtype, outputs, inputs, params, _is_view(n))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    @property
    def ops(self) -> list[Node]:
        return [n for n in self.nodes if n.kind is NodeKind.OP]

    def fx_nodes(self) -> Iterator[tuple[torch.fx.Node, Node]]:
        for fx_node in self.program.graph.nodes:
            yield fx_node, self._by_name[fx_node.name]

    def module(self) -> torch.nn.Module:
        """The graph as a runnable nn.Module (same signature as the original model)."""
        return self.program.module()
