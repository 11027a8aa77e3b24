"""Clean-up passes: dead-code elimination, common-subexpression elimination, constant folding.

Every pass here takes a Graph and returns PassResult(graph, modified, record) with a new,
ExportedProgram-backed Graph (the caller's is left as it was) and a frozen record of what it
changed. Passes are registered by name in PASSES, each with its config class.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.export.graph_signature import InputKind

from kiln.compile.edit import (
    ProgramEdit,
    ancestors,
    arguments,
    is_deterministic,
    is_pure,
    module_of,
    mutated_aliases,
    packet_name,
    tensor_bytes,
    val,
)
from kiln.config import from_dict
from kiln.graph.graph import Graph
from kiln.graph.passes import PassResult
from kiln.registry import Registry

fx = torch.fx

# name -> pass class; each class has `Config` (a frozen dataclass) and takes one in __init__
PASSES: Registry[type] = Registry("graph pass")


@dataclass(frozen=True)
class NoConfig:
    """For passes with nothing to choose."""


@dataclass(frozen=True)
class DCEConfig:
    prune_state: bool = True   # also drop parameters, buffers and constants nothing reads


@dataclass(frozen=True)
class DCERecord:
    removed: tuple[str, ...]        # op nodes removed
    removed_state: tuple[str, ...]  # FQNs of state no longer lifted
    state_bytes: int                # bytes freed (storage no remaining state shares)


@PASSES.register("dce")
class EliminateDeadCode:
    """Removes pure ops nothing uses (random and mutating ops and asserts stay), then state
    that nothing reads. User inputs are kept: they are the module's signature."""

    name = "dce"
    Config = DCEConfig

    def __init__(self, config: DCEConfig = DCEConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[DCERecord]:
        edit = ProgramEdit(graph)
        removed = []
        for node in reversed(list(edit.graph.nodes)):
            if node.op == "call_function" and not node.users and is_pure(node):
                removed.append(node.name)
                edit.graph.erase_node(node)
        states, tensors = [], []
        if self.config.prune_state:
            for node in [n for n in edit.graph.nodes if n.op == "placeholder" and not n.users and edit.is_state(n)]:
                states.append(edit.fqn(node))
                tensors.append(edit.remove_state(node))
        # tied weights share storage: count only the memory no remaining state still holds
        kept = {t.untyped_storage().data_ptr() for t in edit.state_values()}
        freed = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        nbytes = sum(n for ptr, n in freed.items() if ptr not in kept)
        record = DCERecord(tuple(reversed(removed)), tuple(states), nbytes)
        if not removed and not states:
            return PassResult(graph, False, record)
        return PassResult(edit.finish(), True, record)


@dataclass(frozen=True)
class CSERecord:
    merged: tuple[tuple[str, str], ...]   # (removed node, the equal node kept)


def _key(x: Any) -> Any:
    """A hashable key equal only for equal arguments: nodes by identity, numbers by type and
    repr (0.0 and -0.0 differ, True is not 1), lists as tuples."""
    if isinstance(x, fx.Node):
        return ("node", x)
    if isinstance(x, (list, tuple)):
        return ("seq", tuple(_key(i) for i in x))
    if isinstance(x, dict):
        return ("map", tuple(sorted((k, _key(v)) for k, v in x.items())))
    if x is None or isinstance(x, (bool, int, float, str, complex)):
        return (type(x).__name__, repr(x))
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(x).__name__, str(x))
    raise TypeError(f"no CSE key for {type(x).__name__}")


@PASSES.register("cse")
class EliminateCommonSubexpressions:
    """Merges calls of the same deterministic op on the same arguments. Random ops, in-place
    ops and anything an in-place op may write are never merged."""

    name = "cse"
    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[CSERecord]:
        edit = ProgramEdit(graph)
        mutated = mutated_aliases(edit.graph)
        seen: dict[Any, fx.Node] = {}
        merged = []
        for node in list(edit.graph.nodes):
            if node.op != "call_function" or not is_deterministic(node) or mutated(node):
                continue
            try:
                key = (node.target, _key(arguments(node)))
            except TypeError:
                continue
            kept = seen.setdefault(key, node)
            if kept is not node:
                merged.append((node.name, kept.name))
                edit.replace(node, kept)
        if not merged:
            return PassResult(graph, False, CSERecord(()))
        return PassResult(edit.finish(), True, CSERecord(tuple(merged)))


@dataclass(frozen=True)
class FoldConfig:
    fold_parameters: bool = True        # parameters are frozen (inference); False folds buffers/constants only
    max_bytes: int = 1 << 30            # never create one constant larger than this

    def __post_init__(self):
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")


@dataclass(frozen=True)
class FoldRecord:
    folded: tuple[str, ...]      # nodes replaced by a constant (the frontier of constant subgraphs)
    computed: int                # op nodes evaluated to get them
    bytes: int                   # bytes of the constants created


# Ops that create no information: folding a subgraph of only these (and views) saves no work
# and only duplicates memory (an expand of a parameter, a tensor of zeros).
NO_GAIN = frozenset({"full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "scalar_tensor", "expand",
                     "lift_fresh_copy", "clone", "contiguous", "alias", "detach", "to", "_to_copy"})


@PASSES.register("fold_constants")
class FoldConstants:
    """Evaluates once every subgraph that depends only on parameters, buffers and constants
    (for inference graphs) and replaces it by one new lifted constant: a parameter when it was
    computed from parameters, a buffer otherwise. Subgraphs of views and fills are left alone."""

    name = "fold_constants"
    Config = FoldConfig

    def __init__(self, config: FoldConfig = FoldConfig()):
        self.config = config

    def _source(self, edit: ProgramEdit, node: fx.Node) -> bool:
        kind = edit.kind(node)
        return kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR) or \
            kind is InputKind.PARAMETER and self.config.fold_parameters

    def __call__(self, graph: Graph) -> PassResult[FoldRecord]:
        edit = ProgramEdit(graph)
        mutated = mutated_aliases(edit.graph)
        const: dict[fx.Node, bool] = {}     # node -> whether its subgraph does real work
        for node in edit.graph.nodes:
            if node.op == "placeholder" and self._source(edit, node) and not mutated(node):
                const[node] = False
            elif node.op == "call_function" and is_deterministic(node) and not mutated(node) \
                    and _static(val(node)) and all(a in const for a in node.all_input_nodes):
                work = packet_name(node) not in NO_GAIN and not _is_view(node)
                const[node] = work or any(const[a] for a in node.all_input_nodes)
        frontier = [n for n in const if n.op == "call_function" and const[n] and isinstance(val(n), torch.Tensor)
                    and any(u not in const for u in n.users)
                    and tensor_bytes(val(n)) <= self.config.max_bytes]
        if not frontier:
            return PassResult(graph, False, FoldRecord((), 0, 0))
        values, computed = _evaluate(edit, frontier)
        nbytes = 0
        for node in frontier:
            value = values[node]
            from_params = any(edit.kind(a) is InputKind.PARAMETER for a in ancestors([node]))
            kind = InputKind.PARAMETER if from_params else InputKind.BUFFER
            module = module_of(node)
            if value.untyped_storage().nbytes() > tensor_bytes(value):   # a view: don't keep its whole base
                value = value.clone()
            new = edit.add_state(f"{module}.folded_{node.name}" if module else f"folded_{node.name}", value, kind)
            node.replace_all_uses_with(new)
            nbytes += tensor_bytes(value)
        edit.erase_dead(frontier)
        record = FoldRecord(tuple(n.name for n in frontier), computed, nbytes)
        return PassResult(edit.finish(), True, record)


def _static(v: Any) -> bool:
    """A value with concrete sizes (a dynamic batch makes a subgraph input-dependent)."""
    if isinstance(v, torch.Tensor):
        return all(isinstance(d, int) for d in v.shape)
    if isinstance(v, (list, tuple)):
        return all(_static(i) for i in v)
    return v is None or isinstance(v, (int, float, bool))


def _is_view(node: fx.Node) -> bool:
    return node.target is operator.getitem or isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _evaluate(edit: ProgramEdit, frontier: list[fx.Node]) -> tuple[dict, int]:
    """Run the constant subgraphs behind `frontier` on the real tensors."""
    needed = ancestors(frontier)
    env: dict[fx.Node, Any] = {}
    computed = 0
    with torch.no_grad():
        for node in edit.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = edit.value(node)
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            env[node] = node.target(*args, **kwargs)
            computed += 1
    return {n: env[n].detach() for n in frontier}, computed


def build_pass(name: str, config: dict[str, Any] | None = None) -> Callable:
    """A registered pass by name, its config built from a dict (unknown keys are errors)."""

    cls = PASSES.get(name)
    return cls(from_dict(cls.Config, config or {}, where=f"pass {name}"))
