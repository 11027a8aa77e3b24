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
class _Ctx:
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


def _shape(a: Any) -> tuple[int, ...]:
    val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


Rule = Callable[[_Ctx, torch.fx.Node, str], Any]
RULES: dict[str, Rule] = {}


def _rule(*ops: str):
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "<root>"


def _where(node: torch.fx.Node, op: str) -> str:
    return f"{op} in {_module(node)}"


def unify(ctx: _Ctx, a: Track, b: Track, why: str) -> bool:
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
    ctx = _Ctx(_Spaces(), {}, {**sig.inputs_to_parameters, **sig.inputs_to_buffers})
    for node in program.graph.nodes:
        if node.op == "output":
            ctx.spaces.pin([ctx.track(a) for a in node.all_input_nodes], "it reaches the model's output")
        elif node.op == "call_function":
            ctx.tracks[node.name] = _apply(ctx, node)
    return _roots(ctx.spaces)


def _apply(ctx: _Ctx, node: torch.fx.Node) -> Any:
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
            ctx.spaces.pin(ins, f"no rule for {_where(node, op)}")
        return None
    try:
        return rule(ctx, node, op)
    except (TypeError, IndexError, ValueError) as exc:   # an op signature the rule did not expect
        ctx.spaces.pin(ins, f"{_where(node, op)}: {first_line(exc)}")
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

# -- rules: one per op family ------------------------------------------------------------------

def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@_rule("conv1d", "conv2d", "conv3d", "convolution")
def _conv(ctx: _Ctx, node, op: str) -> Track:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    groups = _arg(node, 8 if op == "convolution" else 6, "groups", 1)
    if op == "convolution" and _arg(node, 6, "transposed", False):
        raise ValueError("transposed convolutions are not handled")
    tx, (cout, cin_g) = ctx.track(x), _shape(w)[:2]
    if tx is not None and tx.dim != 1:
        raise ValueError("channels tracked on a spatial dimension")
    if groups == 1:
        for seg in tx.segs if tx else ():
            ctx.slot(seg, ctx.param(w), 1, "in")
        return ctx.produce(cout, 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])
    if cin_g == 1 and tx is not None:        # depthwise: output channel c reads input channel c // mult
        mult = Fraction(cout, _shape(x)[1])
        for seg in tx.segs:
            ctx.slot(seg, ctx.param(w), 0, "in", mult)
            ctx.slot(seg, ctx.param(bias), 0, "in", mult)
        return Track(1, tuple(Seg(s.space, int(s.offset * mult), s.n, s.ppc * mult) for s in tx.segs))
    ctx.spaces.pin(tx, f"grouped conv ({groups} groups) {_where(node, op)}")
    out = ctx.produce(cout, 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])
    ctx.spaces.pin(out, f"grouped conv ({groups} groups) {_where(node, op)}")
    return out


@_rule("linear")
def _linear(ctx: _Ctx, node, op: str) -> Track:
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    tx, ndim = ctx.track(x), len(_shape(node))
    if tx is not None and tx.dim != len(_shape(x)) - 1:
        ctx.spaces.pin(tx, f"channels on a batch dimension of {_where(node, op)}")
    for seg in tx.segs if tx is not None and tx.dim == len(_shape(x)) - 1 else ():
        ctx.slot(seg, ctx.param(w), 1, "in")
    return ctx.produce(_shape(w)[0], ndim - 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])


@_rule("embedding")
def _embedding(ctx: _Ctx, node, op: str) -> Track:
    w = node.args[0]
    return ctx.produce(_shape(w)[1], len(_shape(node)) - 1, [(ctx.param(w), 1)])


def _norm_slots(ctx: _Ctx, tx: Track, params: list, dim: int) -> None:
    for seg in tx.segs:
        ctx.spaces.group(seg.space).flags.add("norm")
        for p in params:
            ctx.slot(seg, ctx.param(p), dim, "norm")


@_rule("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
       "instance_norm")
def _batch_norm(ctx: _Ctx, node, op: str) -> Any:
    tx = ctx.track(node.args[0])
    if tx is not None:
        if tx.dim != 1:
            raise ValueError("channels not on dimension 1")
        _norm_slots(ctx, tx, [a for a in node.args[1:5] if isinstance(a, torch.fx.Node)], 0)
    return tx if op in ("batch_norm", "instance_norm") else [tx, None, None]


@_rule("layer_norm", "native_layer_norm")
def _layer_norm(ctx: _Ctx, node, op: str) -> Any:
    x, shape = node.args[0], node.args[1]
    tx, ndim = ctx.track(x), len(_shape(node.args[0]))
    if tx is not None and tx.dim >= ndim - len(shape):
        if len(shape) != 1:
            raise ValueError("normalised over several dimensions")
        if not isinstance(_arg(node, 2, "weight"), torch.fx.Node):
            raise ValueError("a layer norm without affine parameters keeps its size in the code")
        _norm_slots(ctx, tx, [a for a in node.args[2:4] if isinstance(a, torch.fx.Node)], 0)
    return tx if op == "layer_norm" else [tx, None, None]


@_rule("<pointwise>", "dropout", "clone", "contiguous", "to", "_to_copy", "alias", "detach", "type_as",
       "lift_fresh_copy", "native_dropout", "feature_dropout")
def _pointwise(ctx: _Ctx, node, op: str) -> Any:
    """Elementwise: tracked operands aligned from the right are one space; a parameter that
    broadcasts along the channels (a layer scale) shrinks with them."""
    out_nd = len(_shape(node))
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    tracked = [(a, ctx.track(a)) for a in tensors if ctx.track(a) is not None]
    if not tracked:
        return [None, None] if op == "native_dropout" else None
    pos = {t.dim - len(_shape(a)) for a, t in tracked}
    first = tracked[0][1]
    ok = len(pos) == 1 and all(unify(ctx, first, t, _where(node, op)) for _, t in tracked[1:])
    if ok and len(tracked) > 1:
        for seg in first.segs:
            ctx.spaces.group(seg.space).flags.add("residual")
    (rel,) = pos if len(pos) == 1 else (0,)
    for a in tensors:
        shape = _shape(a)
        if ctx.track(a) is not None or len(shape) < -rel or shape[rel] == 1:
            continue
        if ctx.param(a) is None or len(first.segs) != 1 or first.segs[0].ppc != 1:
            ok = False
        else:
            ctx.slot(first.segs[0], ctx.param(a), len(shape) + rel, "norm")
    if not ok:
        ctx.spaces.pin([t for _, t in tracked], f"operands do not line up in {_where(node, op)}")
        return None
    out = Track(out_nd + rel, first.segs)
    return [out, None] if op == "native_dropout" else out


@_rule("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "hardswish",
       "hardsigmoid", "mish", "softplus")
def _activation(ctx: _Ctx, node, op: str) -> Any:
    return ctx.track(node.args[0])


@_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
       "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices")
def _pool(ctx: _Ctx, node, op: str) -> Any:
    tx = ctx.track(node.args[0])
    if tx is not None and tx.dim != 1:
        raise ValueError("pooling over the channels")
    return [tx, None] if op in ("max_pool2d_with_indices", "adaptive_max_pool2d") else tx


@_rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "view_copy")
def _reshape(ctx: _Ctx, node, op: str) -> Track | None:
    """Follow the tracked dimension through a reshape: it may merge with the dimensions after it
    (one channel covers more positions) or split, its outer part carrying the channels
    (one position covers several channels: heads)."""
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    src, dst = _shape(node.args[0]), _shape(node)
    lead = math.prod(src[:tx.dim])
    ks = [k for k in range(len(dst) + 1) if math.prod(dst[:k]) == lead]
    ks = [k for k in ks if k < len(dst) and (dst[k] > 1 or src[tx.dim] == 1)]
    if not ks:
        raise ValueError("the channels straddle a reshape")
    k = ks[0]
    r = Fraction(dst[k], src[tx.dim])
    if r.numerator != 1 and r.denominator != 1:
        raise ValueError(f"channels regrouped by {r}")
    segs = []
    for s in tx.segs:
        off, ppc = s.offset * r, s.ppc * r
        if off.denominator != 1 or (s.n * ppc).denominator != 1:
            raise ValueError("a split cuts through a channel segment")
        segs.append(Seg(s.space, int(off), s.n, ppc))
        ctx.spaces.need(segs[-1])
    return Track(k, tuple(segs))


@_rule("permute", "transpose", "t", "movedim", "swapaxes")
def _permute(ctx: _Ctx, node, op: str) -> Track | None:
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    nd = len(_shape(node))
    if op == "permute":
        order = [_norm_dim(d, nd) for d in node.args[1]]
        return Track(order.index(tx.dim), tx.segs)
    a, b = (0, 1) if op == "t" else (_norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd))
    if op == "movedim":
        order = list(range(nd))
        order.insert(b, order.pop(a))
        return Track(order.index(tx.dim), tx.segs)
    return Track({a: b, b: a}.get(tx.dim, tx.dim), tx.segs)


@_rule("expand", "select", "slice", "index", "sum", "mean", "amax", "amin", "max", "min")
def _index_or_reduce(ctx: _Ctx, node, op: str) -> Track | None:
    """Ops over other dimensions keep the channels; over the channel dimension they pin them."""
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    src, dst = _shape(node.args[0]), _shape(node)
    if op == "expand":
        return Track(tx.dim + len(dst) - len(src), tx.segs)
    if op in ("select", "slice"):
        dim = _norm_dim(_arg(node, 1, "dim", 0), len(src))
        if dim == tx.dim:
            raise ValueError("indexes the channels")
        return Track(tx.dim - (op == "select" and dim < tx.dim), tx.segs)
    if op == "index":
        raise ValueError("advanced indexing")
    dims = _arg(node, 1, "dim")
    dims = range(len(src)) if dims is None or dims == [] else ([dims] if isinstance(dims, int) else dims)
    dims = {_norm_dim(d, len(src)) for d in dims}
    if tx.dim in dims:
        raise ValueError("reduces over the channels")
    keep = _arg(node, 2, "keepdim", False)
    out = Track(tx.dim if keep else tx.dim - sum(d < tx.dim for d in dims), tx.segs)
    return [out, None] if op in ("max", "min") and len(node.args) > 1 and isinstance(node.args[1], int) else out


@_rule("cat", "concat")
def _cat(ctx: _Ctx, node, op: str) -> Track | None:
    xs = node.args[0]
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    tracks = [ctx.track(x) for x in xs]
    if all(t is None for t in tracks):
        return None
    if any(t is not None and t.dim != dim for t in tracks):   # stacked along another dimension
        first = next(t for t in tracks if t is not None)
        if any(t is None or not unify(ctx, first, t, _where(node, op)) for t in tracks):
            raise ValueError("inputs tracked differently")
        return first
    segs, offset = [], 0
    for x, t in zip(xs, tracks):
        segs += [Seg(s.space, s.offset + offset, s.n, s.ppc) for s in (t.segs if t else ())]
        offset += _shape(x)[dim]
    return Track(dim, tuple(segs))


@_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
def _sdpa(ctx: _Ctx, node, op: str) -> Any:
    """q, k and v share their heads; a head of q needs the same head of k and v."""
    q, k, v = (ctx.track(a) for a in node.args[:3])
    nd = len(_shape(node.args[0]))
    if ctx.track(_arg(node, 3, "attn_mask")) is not None:
        raise ValueError("channels in the attention mask")
    if q is None or k is None or v is None or {q.dim, k.dim, v.dim} != {nd - 3}:
        raise ValueError("q, k and v do not carry the heads on one dimension")
    if not (unify(ctx, q, k, _where(node, op)) and unify(ctx, q, v, _where(node, op))):
        raise ValueError("q, k and v heads do not line up")
    for seg in q.segs:
        ctx.spaces.group(seg.space).flags.add("heads")
    return q if op == "scaled_dot_product_attention" else [q, None]


@_rule("_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "arange", "new_ones", "zeros_like",
       "ones_like", "full_like", "empty_like")
def _no_channels(ctx: _Ctx, node, op: str) -> None:
    return None


@_rule("matmul", "bmm", "mm")
def _matmul(ctx: _Ctx, node, op: str) -> Track | None:
    """Batch dimensions pass through (heads of eager attention: scores = q @ k^T, probs @ v); the
    contracted dimension couples its two sides; rows of a and columns of b pass to the output."""
    a, b = node.args[:2]
    ta, tb, na, nb, nd = ctx.track(a), ctx.track(b), len(_shape(a)), len(_shape(b)), len(_shape(node))
    if ta is None and tb is None:
        return None
    if min(na, nb) < 2:
        raise ValueError("a vector operand")
    ra = ta.dim - na if ta else None   # positions from the right: -1 columns, -2 rows, < -2 batch
    rb = tb.dim - nb if tb else None
    if ra == -1 and rb == -2:
        if not unify(ctx, ta, tb, _where(node, op)):
            raise ValueError("the contracted channels do not line up")
        return None
    if ra is not None and ra < -2 and rb == ra:
        if not unify(ctx, ta, tb, _where(node, op)):
            raise ValueError("batched channels do not line up")
        for seg in ta.segs:
            ctx.spaces.group(seg.space).flags.add("heads")
        return Track(nd + ra, ta.segs)
    other = _shape(b if ta else a)
    if ta is not None and tb is None and (ra == -2 or (ra < -2 and (len(other) < -ra or other[ra] == 1))):
        return Track(nd + ra, ta.segs)
    if tb is not None and ta is None and (rb == -1 or (rb < -2 and (len(_shape(a)) < -rb or _shape(a)[rb] == 1))):
        return Track(nd + rb, tb.segs)
    raise ValueError("channels on both sides of a product that does not keep them apart")


@_rule("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(ctx: _Ctx, node, op: str) -> Track | None:
    tx = ctx.track(node.args[0])
    if tx is not None and _norm_dim(node.args[1], len(_shape(node))) == tx.dim:
        raise ValueError("normalises over the channels")
    return tx


@_rule("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d", "reflection_pad1d", "replication_pad1d")
def _pad(ctx: _Ctx, node, op: str) -> Track | None:
    """Padding of the trailing (spatial) dimensions keeps the channels."""
    tx = ctx.track(node.args[0])
    if tx is not None and tx.dim >= len(_shape(node)) - len(node.args[1]) // 2:
        raise ValueError("pads the channels")
    return tx
