"""The channel rules of kiln.prune.deps: how each op family moves, couples or pins the tracked
channel dimension. A rule gets the context, the FX node and the op name and returns the output's
Track (a list for multi-output ops, None when no channels come out); raising ValueError pins the
channels it saw, with the reason."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from kiln.prune.deps import Ctx, Seg, Track, arg, rule, shape_of, unify, where

# a fresh tensor of a size the code gives (message passing: `src.new_zeros(size)` for a scatter to fill)
ALLOCATIONS = ("new_zeros", "new_empty", "new_full")


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@rule("conv1d", "conv2d", "conv3d", "convolution")
def _conv(ctx: Ctx, node, op: str) -> Track:
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    groups = arg(node, 8 if op == "convolution" else 6, "groups", 1)
    if op == "convolution" and arg(node, 6, "transposed", False):
        raise ValueError("transposed convolutions are not handled")
    tx, (cout, cin_g) = ctx.track(x), shape_of(w)[:2]
    if tx is not None and tx.dim != 1:
        raise ValueError("channels tracked on a spatial dimension")
    if groups == 1:
        for seg in tx.segs if tx else ():
            ctx.slot(seg, ctx.param(w), 1, "in")
        return ctx.produce(cout, 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])
    if cin_g == 1 and tx is not None:        # depthwise: output channel c reads input channel c // mult
        mult = Fraction(cout, shape_of(x)[1])
        for seg in tx.segs:
            ctx.slot(seg, ctx.param(w), 0, "in", mult)
            ctx.slot(seg, ctx.param(bias), 0, "in", mult)
        return Track(1, tuple(Seg(s.space, int(s.offset * mult), s.n, s.ppc * mult) for s in tx.segs))
    ctx.spaces.pin(tx, f"grouped conv ({groups} groups) {where(node, op)}")
    out = ctx.produce(cout, 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])
    ctx.spaces.pin(out, f"grouped conv ({groups} groups) {where(node, op)}")
    return out


@rule("linear")
def _linear(ctx: Ctx, node, op: str) -> Track:
    x, w, bias = node.args[0], node.args[1], arg(node, 2, "bias")
    tx, ndim = ctx.track(x), len(shape_of(node))
    if tx is not None and tx.dim != len(shape_of(x)) - 1:
        ctx.spaces.pin(tx, f"channels on a batch dimension of {where(node, op)}")
    for seg in tx.segs if tx is not None and tx.dim == len(shape_of(x)) - 1 else ():
        ctx.slot(seg, ctx.param(w), 1, "in")
    return ctx.produce(shape_of(w)[0], ndim - 1, [(ctx.param(w), 0), (ctx.param(bias), 0)])


@rule("embedding")
def _embedding(ctx: Ctx, node, op: str) -> Track:
    w = node.args[0]
    return ctx.produce(shape_of(w)[1], len(shape_of(node)) - 1, [(ctx.param(w), 1)])


def _norm_slots(ctx: Ctx, tx: Track, params: list, dim: int) -> None:
    for seg in tx.segs:
        ctx.spaces.group(seg.space).flags.add("norm")
        for p in params:
            ctx.slot(seg, ctx.param(p), dim, "norm")


@rule("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
       "instance_norm")
def _batch_norm(ctx: Ctx, node, op: str) -> Any:
    tx = ctx.track(node.args[0])
    if tx is not None:
        if tx.dim != 1:
            raise ValueError("channels not on dimension 1")
        _norm_slots(ctx, tx, [a for a in node.args[1:5] if isinstance(a, torch.fx.Node)], 0)
    return tx if op in ("batch_norm", "instance_norm") else [tx, None, None]


@rule("layer_norm", "native_layer_norm")
def _layer_norm(ctx: Ctx, node, op: str) -> Any:
    x, shape = node.args[0], node.args[1]
    tx, ndim = ctx.track(x), len(shape_of(node.args[0]))
    if tx is not None and tx.dim >= ndim - len(shape):
        if len(shape) != 1:
            raise ValueError("normalised over several dimensions")
        if not isinstance(arg(node, 2, "weight"), torch.fx.Node):
            raise ValueError("a layer norm without affine parameters keeps its size in the code")
        _norm_slots(ctx, tx, [a for a in node.args[2:4] if isinstance(a, torch.fx.Node)], 0)
    return tx if op == "layer_norm" else [tx, None, None]


@rule("<pointwise>", "dropout", "clone", "contiguous", "to", "_to_copy", "alias", "detach", "type_as",
       "lift_fresh_copy", "native_dropout", "feature_dropout")
def _pointwise(ctx: Ctx, node, op: str) -> Any:
    """Elementwise: tracked operands aligned from the right are one space; a parameter that
    broadcasts along the channels (a layer scale) shrinks with them."""
    out_nd = len(shape_of(node))
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    tracked = [(a, ctx.track(a)) for a in tensors if ctx.track(a) is not None]
    if not tracked:
        return [None, None] if op == "native_dropout" else None
    pos = {t.dim - len(shape_of(a)) for a, t in tracked}
    first = tracked[0][1]
    spaces = {ctx.spaces.find(s.space) for _, t in tracked for s in t.segs}
    ok = len(pos) == 1 and all(unify(ctx, first, t, where(node, op)) for _, t in tracked[1:])
    if ok and len(spaces) > len(first.segs) and op in ("add", "add_", "sub", "sub_"):   # two producers summed
        for seg in first.segs:
            ctx.spaces.group(seg.space).flags.add("residual")
    (rel,) = pos if len(pos) == 1 else (0,)
    for a in tensors:
        shape = shape_of(a)
        if ctx.track(a) is not None or len(shape) < -rel or shape[rel] == 1:
            continue
        if ctx.param(a) is None or len(first.segs) != 1 or first.segs[0].ppc != 1:
            ok = False
        else:
            ctx.slot(first.segs[0], ctx.param(a), len(shape) + rel, "norm")
    if not ok:
        ctx.spaces.pin([t for _, t in tracked], f"operands do not line up in {where(node, op)}")
        return None
    out = Track(out_nd + rel, first.segs)
    return [out, None] if op == "native_dropout" else out


@rule("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "hardswish",
       "hardsigmoid", "mish", "softplus")
def _activation(ctx: Ctx, node, op: str) -> Any:
    return ctx.track(node.args[0])


@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
       "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices")
def _pool(ctx: Ctx, node, op: str) -> Any:
    tx = ctx.track(node.args[0])
    if tx is not None and tx.dim != 1:
        raise ValueError("pooling over the channels")
    return [tx, None] if op in ("max_pool2d_with_indices", "adaptive_max_pool2d") else tx


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "view_copy")
def _reshape(ctx: Ctx, node, op: str) -> Track | None:
    """Follow the tracked dimension through a reshape: it may merge with the dimensions after it
    (one channel covers more positions) or split, its outer part carrying the channels
    (one position covers several channels: heads)."""
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    src, dst = shape_of(node.args[0]), shape_of(node)
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


@rule("permute", "transpose", "t", "movedim", "swapaxes")
def _permute(ctx: Ctx, node, op: str) -> Track | None:
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    nd = len(shape_of(node))
    if op == "permute":
        order = [_norm_dim(d, nd) for d in node.args[1]]
        return Track(order.index(tx.dim), tx.segs)
    a, b = (0, 1) if op == "t" else (_norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd))
    if op == "movedim":
        order = list(range(nd))
        order.insert(b, order.pop(a))
        return Track(order.index(tx.dim), tx.segs)
    return Track({a: b, b: a}.get(tx.dim, tx.dim), tx.segs)


@rule("expand", "select", "slice", "index", "sum", "mean", "amax", "amin", "max", "min")
def _index_or_reduce(ctx: Ctx, node, op: str) -> Track | None:
    """Ops over other dimensions keep the channels; over the channel dimension they pin them."""
    tx = ctx.track(node.args[0])
    if tx is None:
        return None
    src, dst = shape_of(node.args[0]), shape_of(node)
    if op == "expand":
        return Track(tx.dim + len(dst) - len(src), tx.segs)
    if op in ("select", "slice"):
        dim = _norm_dim(arg(node, 1, "dim", 0), len(src))
        if dim == tx.dim:
            raise ValueError("indexes the channels")
        return Track(tx.dim - (op == "select" and dim < tx.dim), tx.segs)
    if op == "index":
        raise ValueError("advanced indexing")
    dims = arg(node, 1, "dim")
    dims = range(len(src)) if dims is None or dims == [] else ([dims] if isinstance(dims, int) else dims)
    dims = {_norm_dim(d, len(src)) for d in dims}
    if tx.dim in dims:
        raise ValueError("reduces over the channels")
    keep = arg(node, 2, "keepdim", False)
    out = Track(tx.dim if keep else tx.dim - sum(d < tx.dim for d in dims), tx.segs)
    return [out, None] if op in ("max", "min") and len(node.args) > 1 and isinstance(node.args[1], int) else out


@rule("cat", "concat")
def _cat(ctx: Ctx, node, op: str) -> Track | None:
    xs = node.args[0]
    dim = _norm_dim(arg(node, 1, "dim", 0), len(shape_of(node)))
    tracks = [ctx.track(x) for x in xs]
    if all(t is None for t in tracks):
        return None
    if any(t is not None and t.dim != dim for t in tracks):   # stacked along another dimension
        first = next(t for t in tracks if t is not None)
        if any(t is None or not unify(ctx, first, t, where(node, op)) for t in tracks):
            raise ValueError("inputs tracked differently")
        return first
    segs, offset = [], 0
    for x, t in zip(xs, tracks):
        segs += [Seg(s.space, s.offset + offset, s.n, s.ppc) for s in (t.segs if t else ())]
        offset += shape_of(x)[dim]
    return Track(dim, tuple(segs))


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
def _sdpa(ctx: Ctx, node, op: str) -> Any:
    """q, k and v share their heads; a head of q needs the same head of k and v."""
    q, k, v = (ctx.track(a) for a in node.args[:3])
    nd = len(shape_of(node.args[0]))
    if ctx.track(arg(node, 3, "attn_mask")) is not None:
        raise ValueError("channels in the attention mask")
    if q is None or k is None or v is None or {q.dim, k.dim, v.dim} != {nd - 3}:
        raise ValueError("q, k and v do not carry the heads on one dimension")
    if not (unify(ctx, q, k, where(node, op)) and unify(ctx, q, v, where(node, op))):
        raise ValueError("q, k and v heads do not line up")
    for seg in q.segs:
        ctx.spaces.group(seg.space).flags.add("heads")
    return q if op == "scaled_dot_product_attention" else [q, None]


@rule("_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "arange", "new_ones", "zeros_like",
       "ones_like", "full_like", "empty_like", *ALLOCATIONS)
def _no_channels(ctx: Ctx, node, op: str) -> None:
    return None


@rule("matmul", "bmm", "mm")
def _matmul(ctx: Ctx, node, op: str) -> Track | None:
    """Batch dimensions pass through (heads of eager attention: scores = q @ k^T, probs @ v); the
    contracted dimension couples its two sides; rows of a and columns of b pass to the output."""
    a, b = node.args[:2]
    ta, tb, na, nb, nd = ctx.track(a), ctx.track(b), len(shape_of(a)), len(shape_of(b)), len(shape_of(node))
    if ta is None and tb is None:
        return None
    if min(na, nb) < 2:
        raise ValueError("a vector operand")
    ra = ta.dim - na if ta else None   # positions from the right: -1 columns, -2 rows, < -2 batch
    rb = tb.dim - nb if tb else None
    if ra == -1 and rb == -2:
        if not unify(ctx, ta, tb, where(node, op)):
            raise ValueError("the contracted channels do not line up")
        return None
    if ra is not None and ra < -2 and rb == ra:
        if not unify(ctx, ta, tb, where(node, op)):
            raise ValueError("batched channels do not line up")
        for seg in ta.segs:
            ctx.spaces.group(seg.space).flags.add("heads")
        return Track(nd + ra, ta.segs)
    other = shape_of(b if ta else a)
    if ta is not None and tb is None and (ra == -2 or (ra < -2 and (len(other) < -ra or other[ra] == 1))):
        return Track(nd + ra, ta.segs)
    if tb is not None and ta is None and (rb == -1 or (rb < -2 and (len(shape_of(a)) < -rb or shape_of(a)[rb] == 1))):
        return Track(nd + rb, tb.segs)
    raise ValueError("channels on both sides of a product that does not keep them apart")


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(ctx: Ctx, node, op: str) -> Track | None:
    tx = ctx.track(node.args[0])
    if tx is not None and _norm_dim(node.args[1], len(shape_of(node))) == tx.dim:
        raise ValueError("normalises over the channels")
    return tx


@rule("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d", "reflection_pad1d", "replication_pad1d")
def _pad(ctx: Ctx, node, op: str) -> Track | None:
    """Padding of the trailing (spatial) dimensions keeps the channels."""
    tx = ctx.track(node.args[0])
    if tx is not None and tx.dim >= len(shape_of(node)) - len(node.args[1]) // 2:
        raise ValueError("pads the channels")
    return tx


@rule("addmm")
def _addmm(ctx: Ctx, node, op: str) -> Track:
    """bias + x @ W with W stored (in, out): Hugging Face's Conv1D (GPT-2)."""
    bias, x, w = node.args[:3]
    tx = ctx.track(x)
    if tx is not None and tx.dim != 1:
        raise ValueError("channels on the rows of a matrix product")
    for seg in tx.segs if tx is not None else ():
        ctx.slot(seg, ctx.param(w), 0, "in")
    return ctx.produce(shape_of(w)[1], 1, [(ctx.param(w), 1), (ctx.param(bias), 0)])


# -- message passing (PyG): gather rows by the edges' source, scatter them back by their target ---

@rule("index_select")
def _index_select(ctx: Ctx, node, op: str) -> Track | None:
    """Rows (nodes, edges) picked along another dimension keep the channels."""
    tx = ctx.track(node.args[0])
    if tx is not None and _norm_dim(node.args[1], len(shape_of(node))) == tx.dim:
        raise ValueError("indexes the channels")
    return tx


@rule("expand_as")
def _expand_as(ctx: Ctx, node, op: str) -> Track | None:
    """`x` broadcast to `other`'s shape: along other's channels where x has size 1 there (a
    scatter's index, expanded to its source), as `expand` where x carries the channels."""
    x, other = node.args[:2]
    tx, to = ctx.track(x), ctx.track(other)
    if tx is not None:
        return Track(tx.dim + len(shape_of(node)) - len(shape_of(x)), tx.segs)
    if to is None:
        return None
    sx = (1,) * (len(shape_of(node)) - len(shape_of(x))) + shape_of(x)
    if sx[to.dim] != 1:
        raise ValueError("a fixed tensor broadcast over the channels")
    return to


@rule("scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add", "index_add_")
def _scatter(ctx: Ctx, node, op: str) -> Track | None:
    """out[index[i]] += src[i] along another dimension: channels go from src (and an index
    expanded to it) into the output. The destination must carry the same channels or be a
    fresh allocation whose size the code takes from src (PyG's `src.new_zeros(size)`): a fixed
    tensor there would keep its width when src shrank."""
    dest, dim, index, src = node.args[:4]
    ts, nd = ctx.track(src), len(shape_of(node))
    if ts is None:
        if ctx.track(dest) is not None or ctx.track(index) is not None:
            raise ValueError("channels in the destination or index only")
        return None
    if _norm_dim(dim, nd) == ts.dim:
        raise ValueError("scatters along the channels")
    for other in (dest, index):
        t = ctx.track(other)
        if t is not None and not unify(ctx, ts, t, where(node, op)):
            raise ValueError("operands do not line up")
    produced = dest.target.overloadpacket.__name__ if isinstance(dest, torch.fx.Node) and \
        isinstance(dest.target, torch._ops.OpOverload) else ""
    if ctx.track(dest) is None and produced not in ALLOCATIONS:
        raise ValueError("a destination of fixed width")
    return ts

