"""Eager attention rewritten to one aten.scaled_dot_product_attention call, as rules.

The eager form softmax((q @ k^T) * scale [+ mask]) @ v, as torch.export records it
(matmul or bmm, transpose/permute of k, mul or div by a number, an additive float mask or a
masked_fill(-inf), softmax or _softmax over the last dim, matmul or bmm), becomes
sdpa(q, k, v, attn_mask, scale=scale): the same scale, and the mask with SDPA's meaning
(a float mask is added to the scores, a boolean one marks the positions that attend, so a
masked_fill(cond, -inf) becomes attn_mask = ~cond).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.compile.edit import ProgramEdit, arguments, packet_name
from kiln.compile.passes import PASSES, NoConfig
from kiln.compile.rewrite import Lit, Match, Op, P, Rewrite, Rule, RuleSet, Var, op, scalar, tensor

aten = torch.ops.aten
fx = torch.fx
MM = op(aten.matmul, aten.bmm)
SOFTMAX = op(aten.softmax, aten._softmax)


def _scores() -> Iterator[tuple[str, Op]]:
    s = MM(Var("q", tensor), Var("kt", tensor)).named("scores")
    yield "", s
    yield "_mul", P.mul(s, Var("scale", scalar))
    yield "_div", P.div(s, Var("scale", scalar))


def _masked(x: Op) -> Iterator[tuple[str, Op]]:
    yield "", x
    yield "_addmask", P.add(x, Var("mask", tensor)).named("masked")
    yield "_fill", P.masked_fill(x, Var("cond", tensor), Lit(float("-inf"))).named("masked")


def _rules() -> RuleSet:
    found = []
    for s_name, scores in _scores():
        for m_name, masked in _masked(scores):
            probs = SOFTMAX(masked, Var("dim")).named("probs")
            # SDPA may lay its output out differently from matmul (same values): later ops are
            # re-checked with its strides instead
            found.append(Rule(f"attention{s_name}{m_name}", MM(probs, Var("v", tensor)), _to_sdpa, keep_strides=False))
    return RuleSet(tuple(found))


def _same_dims(*shapes) -> bool:
    return all(len(s) == len(shapes[0]) and all(statically_known_true(a == b) for a, b in zip(s, shapes[0]))
               for s in shapes)


def _key(kt: fx.Node, edit: ProgramEdit) -> fx.Node:
    """k from k^T: the input of a transpose/permute that swapped the last two dims, else a
    new transpose."""
    n = kt.meta["val"].dim()
    if packet_name(kt) == "transpose":
        _, a, b = arguments(kt)
        if {a % n, b % n} == {n - 2, n - 1}:
            return kt.args[0]
    if packet_name(kt) == "permute":
        dims = [d % n for d in arguments(kt)[1]]
        if dims == list(range(n - 2)) + [n - 1, n - 2]:
            return kt.args[0]
    return edit.call(aten.transpose.int, (kt, -2, -1), like=kt)


def _legal(m: Match) -> bool:
    q, kt, v, probs = m.val("q"), m.val("kt"), m.val("v"), m.val("probs")
    if not (q.dim() == kt.dim() == v.dim() >= 3 and q.dtype == kt.dtype == v.dtype and q.is_floating_point()):
        return False
    if not _same_dims(q.shape[:-2], kt.shape[:-2], v.shape[:-2]):
        return False
    dim, extra = arguments(m["probs"])[1:3]
    if dim % probs.dim() != probs.dim() - 1 or extra not in (None, False):   # softmax dtype / half_to_float
        return False
    # every intermediate must feed only the next step: otherwise it is still needed
    if any(len(n.users) != 1 for n in m.nodes if n is not m.root):
        return False
    if "mask" in m:
        mask = m.val("mask")
        return mask.dtype == q.dtype and _same_dims(m.val("masked").shape, m.val("scores").shape)
    if "cond" in m:
        return m.val("cond").dtype == torch.bool and _same_dims(m.val("masked").shape, m.val("scores").shape)
    return True


def _to_sdpa(m: Match, edit: ProgramEdit) -> fx.Node | None:
    if not _legal(m):
        return None
    scale = 1.0
    if "scale" in m:
        if m["scale"] == 0:
            return None
        scale = float(m["scale"]) if any(packet_name(n) == "mul" for n in m.nodes) else 1.0 / m["scale"]
    k = _key(m["kt"], edit)
    mask = m["mask"] if "mask" in m else None
    if "cond" in m:
        mask = edit.call(aten.logical_not.default, (m["cond"],), like=m["masked"])
    return edit.call(aten.scaled_dot_product_attention.default, (m["q"], k, m["v"], mask, 0.0, False),
                     {"scale": scale}, like=m.root)


ATTENTION = _rules()


@PASSES.register("attention")
class RewriteAttention(Rewrite):
    """The ATTENTION rules as a pass."""

    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        super().__init__(ATTENTION, name="attention")
        self.config = config
