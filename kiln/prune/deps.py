"""Dependency groups: which parameter dimensions must shrink together, found from the captured graph.

Every tensor is followed through the torch.export program with at most one *tracked* dimension:
the one that carries channels some layer produced. A producer (conv / linear out-features,
embedding dim) opens a channel space; consumers (a conv's or linear's in-features, a norm's
affine parameters) join it as slots; residual adds, depthwise convs and attention (q, k, v heads)
unite spaces; `cat` places several spaces side by side on one dimension; flatten and
view/reshape rescale how many positions one channel covers (C x H x W flattened: one channel,
H*W features; a view into heads: one head, head_dim channels). A space that reaches an
input, the output, or an op no rule understands is pinned: it is never pruned, and the
reason names the op and its module.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import torch

from kiln.errors import KilnError, first_line


@dataclass(frozen=True)
class Seg:
    """Positions [offset, offset + n * ppc) of a tracked dimension belong to `space`; base channel
    c of the space covers positions offset + [c * ppc, (c + 1) * ppc) (ppc may be < 1: heads)."""
    space: int
    offset: int
    n: int
    ppc: Fraction


@dataclass(frozen=True)
class Track:
    dim: int
    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class Slot:
    """A parameter dimension that shrinks with a group: channel c -> offset + [c*ppc, (c+1)*ppc)."""
    param: str        # fully qualified parameter or buffer name
    dim: int
    offset: int
    ppc: Fraction
    role: str         # "out" (a producer), "in" (a consumer), "norm" (affine / running stats)

    @property
    def module(self) -> str:
        return self.param.rpartition(".")[0]


@dataclass
class Group:
    """One channel space after union: `n` base channels pruned in units of `unit`."""
    n: int
    unit: int = 1
    slots: list[Slot] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)   # why it cannot be pruned
    flags: set[str] = field(default_factory=set)      # heads / residual / norm

    @property
    def units(self) -> int:
        return self.n // self.unit

    @property
    def producers(self) -> list[str]:
        return sorted({s.module for s in self.slots if s.role == "out"})

    @property
    def modules(self) -> list[str]:
        return sorted({s.module for s in self.slots})

    def positions(self, slot: Slot, units: torch.Tensor) -> torch.Tensor:
        """The indices along `slot.dim` that the given units cover."""
        width = self.unit * slot.ppc
        if width.denominator != 1:
            raise KilnError(f"{slot.param}: a pruning unit covers {width} positions")
        width = int(width)
        return (slot.offset + units[:, None] * width + torch.arange(width)[None, :]).flatten()


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self):
        self.parent: list[int] = []
        self.groups: list[Group] = []

    def new(self, n: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(Group(n))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def group(self, s: int) -> Group:
        return self.groups[self.find(s)]

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        if ga.n != gb.n:
            ga.pinned.append(f"{why} couples {ga.n} with {gb.n} channels")
        ga.unit = math.lcm(ga.unit, gb.unit)
        ga.slots += gb.slots
        ga.pinned += gb.pinned
        ga.flags |= gb.flags

    def need(self, seg: Seg) -> None:
        """The group's unit must make every seg's positions whole."""
        g = self.group(seg.space)
        g.unit = math.lcm(g.unit, seg.ppc.denominator)

    def pin(self, track: Any, why: str) -> None:
        for t in _tracks(track):
            for seg in t.segs:
                self.group(seg.space).pinned.append(why)


def _tracks(value: Any) -> list[Track]:
    if isinstance(value, Track):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tracks(v)]
    return []


@dataclass
class Ctx:
    spaces: _Spaces
    tracks: dict[str, Any]          # fx node name -> Track | list | None
    params: dict[str, str]          # placeholder name -> parameter / buffer FQN

    def track(self, a: Any) -> Track | None:
        return self.tracks.get(a.name) if isinstance(a, torch.fx.Node) else None

    def param(self, a: Any) -> str | None:
        return self.params.get(a.name) if isinstance(a, torch.fx.Node) else None

    def slot(self, seg: Seg, param: str | None, dim: int, role: str, scale: Fraction = Fraction(1)) -> None:
        if param is None:
            return
        self.spaces.need(Seg(seg.space, seg.offset, seg.n, seg.ppc * scale))
        self.spaces.group(seg.space).slots.append(Slot(param, dim, int(seg.offset * scale), seg.ppc * scale, role))

    def produce(self, n: int, dim: int, slots: list[tuple[str | None, int]], flags: tuple[str, ...] = ()) -> Track:
        space = self.spaces.new(n)
        self.spaces.group(space).flags.update(flags)
        seg = Seg(space, 0, n, Fraction(1))
        for param, pdim in slots:
            self.slot(seg, param, pdim, "out")
        return Track(dim, (seg,))


def shape_of(a: Any) -> tuple[int, ...]:
    val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


Rule = Callable[[Ctx, torch.fx.Node, str], Any]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "<root>"


def where(node: torch.fx.Node, op: str) -> str:
    return f"{op} in {_module(node)}"


def unify(ctx: Ctx, a: Track, b: Track, why: str) -> bool:
    """Make two tracks of the same layout one; False when their segments do not line up."""
    if len(a.segs) != len(b.segs):
        return False
    for sa, sb in zip(a.segs, b.segs):
        if (sa.offset, sa.n, sa.ppc) != (sb.offset, sb.n, sb.ppc):
            return False
    for sa, sb in zip(a.segs, b.segs):
        ctx.spaces.union(sa.space, sb.space, why)
    return True


def find_groups(program: torch.export.ExportedProgram) -> list[Group]:
    """The channel groups of an exported program, each with its slots, flags and pin reasons."""
    sig = program.graph_signature
    ctx = Ctx(_Spaces(), {}, {**sig.inputs_to_parameters, **sig.inputs_to_buffers})
    for node in program.graph.nodes:
        if node.op == "output":
            ctx.spaces.pin([ctx.track(a) for a in node.all_input_nodes], "it reaches the model's output")
        elif node.op == "call_function":
            ctx.tracks[node.name] = _apply(ctx, node)
    return _roots(ctx.spaces)


def _apply(ctx: Ctx, node: torch.fx.Node) -> Any:
    target = node.target
    if target is operator.getitem:
        value = ctx.tracks.get(node.args[0].name)
        return value[node.args[1]] if isinstance(value, (list, tuple)) else None
    op = target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    ins = [ctx.track(a) for a in node.all_input_nodes]
    rule = RULES.get(op)
    if rule is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        rule = RULES["<pointwise>"]
    if rule is None:
        if any(t is not None for t in ins):
            ctx.spaces.pin(ins, f"no rule for {where(node, op)}")
        return None
    try:
        return rule(ctx, node, op)
    except (TypeError, IndexError, ValueError) as exc:   # an op signature the rule did not expect
        ctx.spaces.pin(ins, f"{where(node, op)}: {first_line(exc)}")
        return None


def _roots(spaces: _Spaces) -> list[Group]:
    seen, out = set(), []
    for s in range(len(spaces.parent)):
        r = spaces.find(s)
        if r not in seen:
            seen.add(r)
            g = spaces.groups[r]
            if g.n % g.unit:
                g.pinned.append(f"{g.n} channels do not split into units of {g.unit}")
            out.append(g)
    return out


# The rules register themselves into RULES when their module is imported.
from kiln.prune import channel_rules  # noqa: E402,F401
