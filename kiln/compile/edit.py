"""The mechanism every compile pass shares: edit a copy of a Graph's program, then re-wrap it.

`ProgramEdit(graph)` deep-copies the FX graph of the Graph's ExportedProgram (node metadata is
shared, tensors are not copied), lets a pass add, replace and remove nodes and lifted state
(parameters, buffers, constants), and `finish()` builds a new ExportedProgram from it. That
constructor runs torch.export's own verifier, so every pass result is checked as valid IR.
The caller's Graph is never changed.

Also here: the op facts passes agree on (purity, randomness, aliasing, normalised arguments).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from typing import Any, Callable, Iterable

import torch
from torch.export.exported_program import ExportedProgram, ModuleCallEntry
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.graph.graph import NO_DATA, Graph

fx = torch.fx
OpOverload = torch._ops.OpOverload
STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
# node metadata a replacement inherits from the node it replaces, so kiln's records keep the
# module FQN of every op (nn_module_stack) and errors still point at the user's line
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")

# Ops that only check or describe tensors: kept by DCE, never merged or folded.
SIDE_EFFECTS = NO_DATA - {"sym_size", "sym_numel", "sym_stride"}
# Uninitialised memory: equal calls need not give equal values.
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
NORMS_WITH_STATS = frozenset({"batch_norm", "instance_norm"})   # argument 5 is `training`/`use_input_stats`
DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout"})


def packet_name(node: fx.Node) -> str:
    """'conv2d' for aten.conv2d.default, 'getitem' for operator.getitem, '' otherwise."""
    if isinstance(node.target, OpOverload):
        return node.target.overloadpacket.__name__
    return "getitem" if node.target is operator.getitem else ""


def arguments(node: fx.Node) -> list[Any]:
    """Every schema argument of an ATen call in schema order, defaults filled in; for
    getitem its two arguments. Patterns and CSE read arguments through this one view."""
    if not isinstance(node.target, OpOverload):
        return list(node.args)
    values = []
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            values.append(node.args[i])
        elif a.name in node.kwargs:
            values.append(node.kwargs[a.name])
        else:
            values.append(a.default_value if a.has_default_value() else None)
    return values


def argument_index(target: OpOverload, name: str) -> int:
    return [a.name for a in target._schema.arguments].index(name)


def is_random(node: fx.Node) -> bool:
    """Draws from the RNG: never merged, folded or removed (removal would shift the RNG stream).
    Dropout in eval mode (train=False) draws nothing."""
    if not isinstance(node.target, OpOverload) or torch.Tag.nondeterministic_seeded not in node.target.tags:
        return False
    return not (packet_name(node) in DROPOUTS and arguments(node)[2] is False)


def is_mutating(node: fx.Node) -> bool:
    return isinstance(node.target, OpOverload) and (
        node.target._schema.is_mutable or torch.Tag.inplace in node.target.tags)


def is_pure(node: fx.Node) -> bool:
    """A call whose value depends only on its arguments and that changes nothing else."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, OpOverload) or packet_name(node) in SIDE_EFFECTS:
        return False
    # a norm using batch statistics updates its running ones in place, which its schema hides
    if packet_name(node) in NORMS_WITH_STATS and arguments(node)[5] is not False and arguments(node)[3] is not None:
        return False
    return not (is_mutating(node) or is_random(node))


def is_deterministic(node: fx.Node) -> bool:
    """Pure and repeatable: two equal calls give equal values (CSE, constant folding)."""
    return is_pure(node) and packet_name(node) not in UNINITIALISED


def _may_alias(node: fx.Node) -> bool:
    t = node.target
    if t is operator.getitem:
        return True
    return isinstance(t, OpOverload) and (t.is_view or torch.Tag.maybe_aliasing_or_mutating in t.tags)


def mutated_aliases(graph: fx.Graph) -> Callable[[fx.Node], bool]:
    """A predicate: may this node's storage be written by an in-place op somewhere in the graph?

    Views (and ops that may return an alias) join their input's alias class; a class is
    mutated when any member is written. Rewrites that drop a copy or merge values skip these.
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written: list[fx.Node] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if _may_alias(n) and n.all_input_nodes:
            parent[find(n)] = find(n.all_input_nodes[0])
        if is_mutating(n):
            written += _written(n) or n.all_input_nodes
    roots = {find(n) for n in written}
    return lambda n: find(n) in roots


def _written(node: fx.Node) -> list[fx.Node]:
    """The arguments an in-place op's schema marks as written (`Tensor(a!)`)."""
    schema = node.target._schema.arguments
    return [v for v, a in zip(arguments(node), schema)
            if isinstance(v, fx.Node) and a.alias_info is not None and a.alias_info.is_write]


def same_meta(a: Any, b: Any, strides: bool = True) -> bool:
    """Same shape, dtype, device (and strides and offset): one value can stand for the other
    without any later view or kernel seeing a difference. Tuples compare item by item."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_meta(x, y, strides) for x, y in zip(a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    pairs = list(zip(a.shape, b.shape))
    if strides:
        pairs += list(zip(a.stride(), b.stride())) + [(a.storage_offset(), b.storage_offset())]
    return all(statically_known_true(x == y) for x, y in pairs)


def val(node: Any) -> Any:
    """A node's example (fake) value; a literal argument as it is."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def module_of(node: fx.Node) -> str:
    """FQN of the innermost module the node ran in ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """The nodes and everything they are computed from."""
    found: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack += n.all_input_nodes
    return found


class ProgramEdit:
    """A working copy of a Graph's program for one pass. Edit `self.graph`, then `finish()`."""

    def __init__(self, graph: Graph):
        self.source = graph
        ep = graph.program
        self.program = ep
        self.graph: fx.Graph = copy.deepcopy(ep.graph)
        # the copy may rename a placeholder (fx avoids builtins: nn.Sequential's `input` becomes
        # `input_1`), so the signature is re-keyed by position onto the copy's names
        by_name = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
        self.specs: dict[str, InputSpec] = {}
        for old, new in zip(ep.graph.nodes, self.graph.nodes):
            if old.op == "placeholder" and old.name in by_name:
                spec = by_name[old.name]
                arg = TensorArgument(new.name) if isinstance(spec.arg, TensorArgument) else spec.arg
                self.specs[new.name] = InputSpec(spec.kind, arg, spec.target, spec.persistent)
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self._dropped: set[str] = set()
        vals = [n.meta.get("val") for n in self.graph.nodes]
        self.fake_mode = torch._guards.detect_fake_mode(vals) or torch._subclasses.FakeTensorMode()

    # --- lifted state: parameters, buffers, constants ---------------------------------------
    def kind(self, node: Any) -> InputKind | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder" or node.name not in self.specs:
            return None
        return self.specs[node.name].kind

    def is_state(self, node: Any) -> bool:
        return self.kind(node) in STATE_KINDS

    def fqn(self, node: fx.Node) -> str:
        return self.specs[node.name].target

    def value(self, node: fx.Node) -> torch.Tensor:
        """The real tensor behind a state placeholder."""
        target = self.fqn(node)
        return self.state_dict[target] if target in self.state_dict else self.constants[target]

    def _store(self, kind: InputKind, target: str, tensor: torch.Tensor, persistent: bool | None,
               requires_grad: bool = False) -> None:
        if kind is InputKind.PARAMETER:
            self.state_dict[target] = torch.nn.Parameter(tensor.detach(), requires_grad=requires_grad)
        elif kind is InputKind.BUFFER and persistent:
            self.state_dict[target] = tensor.detach()
        else:
            self.constants[target] = tensor.detach()

    def add_state(self, fqn: str, tensor: torch.Tensor, kind: InputKind = InputKind.BUFFER,
                  requires_grad: bool = False) -> fx.Node:
        """A new lifted tensor under a fresh FQN like `fqn` (suffixed when taken)."""
        leaves = set(self.state_dict) | set(self.constants) | {s.target for s in self.specs.values() if s.target}
        modules = {p for t in leaves for p in _prefixes(t)}

        def free(t: str) -> bool:   # neither a tensor, nor a module path, nor under a tensor
            return t not in leaves and t not in modules and not any(p in leaves for p in _prefixes(t))

        target, i = fqn, 0
        while not free(target):
            i += 1
            target = f"{fqn}_{i}"
        users = [n for n in self.graph.nodes if n.op == "placeholder" and self.kind(n) is InputKind.USER_INPUT]
        anchor = users[0] if users else next(iter(self.graph.nodes))
        with self.graph.inserting_before(anchor):
            node = self.graph.placeholder(_PREFIX[kind] + target.replace(".", "_"))
        persistent = True if kind is InputKind.BUFFER else None
        self._store(kind, target, tensor, persistent, requires_grad)
        self.specs[node.name] = InputSpec(kind, TensorArgument(node.name), target, persistent)
        node.meta["val"] = self.fake_mode.from_tensor(tensor.detach(), static_shapes=True)
        return node

    def set_state(self, node: fx.Node, tensor: torch.Tensor) -> None:
        """Give an existing state placeholder a new value (same FQN, kind and persistence)."""
        spec = self.specs[node.name]
        self._store(spec.kind, spec.target, tensor, spec.persistent, self.value(node).requires_grad)
        node.meta["val"] = self.fake_mode.from_tensor(tensor.detach(), static_shapes=True)

    def remove_state(self, node: fx.Node) -> torch.Tensor:
        """Drop an unused state placeholder; returns the tensor it held."""
        if node.users:
            raise ValueError(f"state {node.name} still has users")
        tensor = self.value(node)
        self._dropped.add(self.specs.pop(node.name).target)
        self.graph.erase_node(node)
        return tensor

    def state_values(self) -> list[torch.Tensor]:
        """The tensors behind every state placeholder still in the graph."""
        return [self.value(n) for n in self.graph.nodes if n.op == "placeholder" and self.is_state(n)]

    # --- ops ----------------------------------------------------------------------------------
    def call(self, target: Any, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
        """Insert a call at the graph's insertion point with its fake value computed."""
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        try:
            self.infer(node)
        except Exception:
            self.graph.erase_node(node)
            raise
        for key in _INHERITED_META:
            if like is not None and key in like.meta:
                node.meta[key] = like.meta[key]
        return node

    def _faking(self) -> contextlib.ExitStack:
        """Fake mode for computing values. Guards are suppressed: a meta kernel may branch on a
        symbolic size (conv on batch < 16) and the ShapeEnv is the program's own, shared with
        the caller's Graph; a recorded guard would narrow the program's dynamic shapes."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.fake_mode)
        if self.fake_mode.shape_env is not None:
            stack.enter_context(self.fake_mode.shape_env.suppress_guards())
        return stack

    def infer(self, node: fx.Node) -> Any:
        """(Re)compute a call's fake value from its arguments' values."""
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), val)
        with self._faking():
            node.meta["val"] = node.target(*args, **kwargs)
        return node.meta["val"]

    def restride(self, old: fx.Node, new_val: torch.Tensor) -> dict[fx.Node, Any] | None:
        """The fake values of `old`'s users (transitively, until values stop changing) were it
        to produce `new_val`; None when one of them cannot take it (a view needing strides)."""
        changed: dict[fx.Node, Any] = {old: new_val}
        seen_old = False
        for node in self.graph.nodes:
            seen_old = seen_old or node is old
            if not seen_old or node is old or node.op != "call_function" or \
                    not any(a in changed for a in node.all_input_nodes):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: changed.get(a, val(a)))
            try:
                with self._faking():
                    value = node.target(*args, **kwargs)
            except Exception:   # whatever the op raises: it refuses these strides
                return None
            if not same_meta(value, val(node)):
                changed[node] = value
        del changed[old]
        return changed

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)

    def erase_dead(self, nodes: Iterable[fx.Node]) -> list[str]:
        """Erase those of `nodes` (and then their inputs) left pure and unused; names erased."""
        erased, stack = [], list(nodes)
        while stack:
            n = stack.pop()
            if n.graph is not self.graph or n.users or not is_pure(n) or n.name in erased:
                continue
            inputs = n.all_input_nodes
            self.graph.erase_node(n)
            erased.append(n.name)
            stack += inputs
        return erased

    # --- re-wrap -------------------------------------------------------------------------------
    def finish(self) -> Graph:
        """The edited program as a new, verified, ExportedProgram-backed Graph."""
        ep, g = self.program, self.graph
        g.lint()
        input_specs = [self.specs[n.name] for n in g.nodes if n.op == "placeholder"]
        live = {s.target for s in input_specs}
        state_dict = {k: v for k, v in self.state_dict.items() if k in live or k not in self._dropped}
        constants = {k: v for k, v in self.constants.items() if k in live or k not in self._dropped}
        outs = g.output_node().args[0]
        output_specs, renames = [], {}
        for spec, out in zip(ep.graph_signature.output_specs, outs):
            if isinstance(spec.arg, TensorArgument) and isinstance(out, fx.Node) and out.name != spec.arg.name:
                renames[spec.arg.name] = out.name
                spec = dataclasses.replace(spec, arg=TensorArgument(out.name))
            output_specs.append(spec)
        gm = fx.GraphModule(ep.graph_module, g)
        program = ExportedProgram(
            gm, gm.graph, ExportGraphSignature(input_specs, output_specs), state_dict, ep.range_constraints,
            _renamed_call_graph(ep.module_call_graph, renames), ep.example_inputs, constants,
            verifiers=ep.verifiers,
        )
        return Graph(program, name=self.source.name)


def _renamed_call_graph(entries: list[ModuleCallEntry], renames: dict[str, str]) -> list[ModuleCallEntry]:
    """The module call graph with outputs renamed (a pass replaced an output node)."""
    result = []
    for e in entries:
        sig = e.signature
        if sig is not None and renames:
            outputs = [dataclasses.replace(a, name=renames.get(a.name, a.name)) if hasattr(a, "name") else a
                       for a in sig.outputs]
            sig = dataclasses.replace(sig, outputs=outputs)
        result.append(dataclasses.replace(e, signature=sig))
    return result


def _prefixes(fqn: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']: the module paths above a tensor."""
    parts = fqn.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
