"""Folding per-channel affine maps into the weights of the convolution or linear before them.

One mechanism, `fold_affine`, rewrites a convolution's or linear's weight and bias so that
producer(x) == old_producer(x) * scale + shift per output channel. Two policies use it:
batch norm in eval mode (scale = gamma / sqrt(var + eps), shift = beta - mean * scale;
Ioffe & Szegedy 2015, eq. in sec. 3.1) and chains of mul/div/add/sub by constants.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind

from kiln.compile.edit import ProgramEdit, arguments, is_pure, module_of, mutated_aliases, packet_name, same_meta, \
    val
from kiln.compile.passes import PASSES, NoConfig
from kiln.graph.graph import Graph
from kiln.graph.passes import PassResult

fx = torch.fx
CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution"})


def _producer(edit: ProgramEdit, node: fx.Node) -> bool:
    """A non-transposed, batched convolution or a linear whose weight and bias are state."""
    name = packet_name(node)
    if name not in CONVS and name != "linear":
        return False
    args = arguments(node)
    if name == "convolution" and args[6]:   # transposed: out channels are on weight dim 1
        return False
    weight, bias = args[1], args[2]
    if not edit.is_state(weight) or not (bias is None or edit.is_state(bias)):
        return False
    out = val(node)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return False
    # a conv on an unbatched input puts channels on dim 0; only batched outputs are handled
    return name == "linear" or out.dim() == val(weight).dim()


def channel_dim(node: fx.Node) -> int:
    return val(node).dim() - 1 if packet_name(node) == "linear" else 1


def fold_affine(edit: ProgramEdit, producer: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> tuple[str, ...]:
    """Make `producer` compute old_producer(x) * scale + shift (per output channel, float64
    vectors); returns the FQNs written. Exclusive state is overwritten under its own FQN; state
    shared with other nodes is left alone and new state is added."""
    args = arguments(producer)
    w_node, b_node = args[1], args[2]
    weight = edit.value(w_node)
    shape = (-1,) + (1,) * (weight.dim() - 1)      # output channels lead the weight (conv and linear)
    new_w = (weight.double() * scale.view(shape)).to(weight.dtype)
    bias = edit.value(b_node).double() if b_node is not None else torch.zeros_like(scale)
    new_b = (bias * scale + shift).to(weight.dtype)
    fqn = edit.fqn(w_node)
    prefix = fqn.rsplit(".", 1)[0] + "." if "." in fqn else fqn + "_"   # "conv.weight" -> "conv.bias"
    kind = InputKind.PARAMETER if edit.kind(w_node) is InputKind.PARAMETER else InputKind.BUFFER
    written = []
    for i, node, tensor, suffix in ((1, w_node, new_w, "weight"), (2, b_node, new_b, "bias")):
        if node is not None and len(node.users) == 1 and edit.kind(node) is kind:
            edit.set_state(node, tensor)
        else:
            node = edit.add_state(prefix + suffix, tensor, kind, requires_grad=weight.requires_grad)
        args[i] = node
        written.append(edit.fqn(node))
    schema = producer.target._schema.arguments
    producer.args = tuple(a for a, s in zip(args, schema) if not s.kwarg_only)
    producer.kwargs = {s.name: a for a, s in zip(args, schema) if s.kwarg_only}
    edit.infer(producer)
    return tuple(written)


@dataclass(frozen=True)
class FoldedBatchNorm:
    batch_norm: str   # the node removed
    producer: str     # the conv/linear node that absorbed it
    module: str       # FQN of the BatchNorm module


@dataclass(frozen=True)
class BatchNormFoldRecord:
    folded: tuple[FoldedBatchNorm, ...]
    skipped: tuple[tuple[str, str], ...]   # (batch norm node, why)


def _batch_norm(edit: ProgramEdit, node: fx.Node):
    """(input, gamma, beta, mean, var, eps, output nodes) of an eval batch norm, else None."""
    name = packet_name(node)
    if name == "batch_norm":
        x, w, b, mean, var, training, _, eps, _ = arguments(node)
        if training:
            return None
        outputs = [node]
    elif name == "_native_batch_norm_legit_no_training":
        x, w, b, mean, var, _, eps = arguments(node)
        outputs = list(node.users)
        if not all(packet_name(u) == "getitem" and u.args[1] == 0 for u in outputs):
            return None   # the saved statistics are used
    else:
        return None
    if not all(edit.is_state(t) for t in (mean, var)) or not all(t is None or edit.is_state(t) for t in (w, b)):
        return None
    return x, w, b, mean, var, eps, outputs


@PASSES.register("fold_batch_norm")
class FoldBatchNorm:
    """Folds eval-mode batch norm into the convolution (any groups, with or without bias) or
    the 2-D linear before it. Skipped when the producer's output has other users (they need
    the unnormalised value) or the producer is not a conv/linear over lifted weights."""

    name = "fold_batch_norm"
    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[BatchNormFoldRecord]:
        edit = ProgramEdit(graph)
        mutated = mutated_aliases(edit.graph)
        folded, skipped = [], []
        for node in list(edit.graph.nodes):
            found = _batch_norm(edit, node) if node.op == "call_function" and not mutated(node) else None
            if found is None:
                continue
            x, w, b, mean, var, eps, outputs = found
            why = self._why_not(edit, x, mean)
            if why:
                skipped.append((node.name, why))
                continue
            inv = torch.rsqrt(edit.value(var).double() + eps)
            gamma = edit.value(w).double() if w is not None else torch.ones_like(inv)
            beta = edit.value(b).double() if b is not None else torch.zeros_like(inv)
            scale = gamma * inv
            fold_affine(edit, x, scale, beta - edit.value(mean).double() * scale)
            for out in outputs:
                out.replace_all_uses_with(x)
            module = module_of(node)
            edit.erase_dead([*outputs, node])
            folded.append(FoldedBatchNorm(node.name, x.name, module))
        record = BatchNormFoldRecord(tuple(folded), tuple(skipped))
        return PassResult(edit.finish(), True, record) if folded else PassResult(graph, False, record)

    @staticmethod
    def _why_not(edit: ProgramEdit, x, mean) -> str:
        if not isinstance(x, fx.Node) or not _producer(edit, x):
            return "input is not a conv/linear over lifted weights"
        if len(x.users) != 1:
            return f"{x.name} has other users"
        if packet_name(x) == "linear" and val(x).dim() != 2:
            return "linear output is not 2-D (channels would not be dim 1)"
        if edit.value(mean).numel() != val(arguments(x)[1]).shape[0]:
            return "channel count differs"
        return ""


@dataclass(frozen=True)
class FoldedAffine:
    producer: str
    ops: tuple[str, ...]   # the mul/div/add/sub nodes absorbed, in order


@dataclass(frozen=True)
class AffineFoldRecord:
    folded: tuple[FoldedAffine, ...]


def _per_channel(t: torch.Tensor, ndim: int, ch: int, channels: int) -> torch.Tensor | None:
    """`t` as a (channels,) vector when it broadcasts along the channel dim only, else None."""
    if t.dim() > ndim:
        return None
    full = (1,) * (ndim - t.dim()) + tuple(t.shape)
    if any(s != 1 for i, s in enumerate(full) if i != ch) or full[ch] not in (1, channels):
        return None
    return t.detach().double().reshape(-1).expand(channels).clone()


def _affine_step(edit: ProgramEdit, u: fx.Node, x: fx.Node, channels: int, ch: int):
    """(mul, add) vectors if `u` is x*c, c*x, x/c, x+c, c+x or x-c with c a number or lifted
    per-channel constant and the result keeps x's shape and dtype; else None."""
    name = packet_name(u)
    if name not in ("mul", "div", "add", "sub") or not is_pure(u):
        return None
    args = arguments(u)
    if args[0] is x and args[1] is not x:
        c = args[1]
    elif args[1] is x and name in ("mul", "add"):
        c = args[0]
    else:
        return None
    ref = val(x)
    if not same_meta(val(u), ref, strides=False):   # no broadcast to a bigger shape, no type promotion
        return None
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        vec = torch.full((channels,), float(c), dtype=torch.float64)
    elif edit.is_state(c):
        vec = _per_channel(edit.value(c), ref.dim(), ch, channels)
        if vec is None:
            return None
    else:
        return None
    alpha = args[2] if name in ("add", "sub") else 1
    ones, zeros = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    if name == "mul":
        return vec, zeros
    if name == "div":
        return (None if bool((vec == 0).any()) else (1 / vec, zeros))
    return ones, vec * alpha * (1 if name == "add" else -1)


@PASSES.register("fold_scale_shift")
class FoldScaleShift:
    """Folds chains like conv -> mul(number) -> add(per-channel constant) into the conv's
    weight and bias (or a linear's): the eager model then runs one kernel instead of three.
    Each step must be the producer's only user."""

    name = "fold_scale_shift"
    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[AffineFoldRecord]:
        edit = ProgramEdit(graph)
        mutated = mutated_aliases(edit.graph)
        folded = []
        for producer in list(edit.graph.nodes):
            if producer.graph is not edit.graph or not _producer(edit, producer):
                continue
            if mutated(producer) or mutated(arguments(producer)[1]):
                continue
            channels, ch = val(arguments(producer)[1]).shape[0], channel_dim(producer)
            scale = torch.ones(channels, dtype=torch.float64)
            shift = torch.zeros(channels, dtype=torch.float64)
            chain, cur = [], producer
            while len(cur.users) == 1:
                step = _affine_step(edit, next(iter(cur.users)), cur, channels, ch)
                if step is None:
                    break
                scale, shift = scale * step[0], shift * step[0] + step[1]
                cur = next(iter(cur.users))
                chain.append(cur)
            if not chain:
                continue
            fold_affine(edit, producer, scale, shift)
            chain[-1].replace_all_uses_with(producer)
            edit.erase_dead(reversed(chain))
            folded.append(FoldedAffine(producer.name, tuple(n.name for n in chain)))
        record = AffineFoldRecord(tuple(folded))
        return PassResult(edit.finish(), True, record) if folded else PassResult(graph, False, record)
