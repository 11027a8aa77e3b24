"""kiln's standard rewrite rules: algebraic identities and view/copy simplification.

Each rule is data (pattern -> replacement). Whether a replacement may stand for the node it
replaces (same shape, dtype, strides) is checked by the engine, not by the rules.
"""
from __future__ import annotations

import torch

from kiln.compile.passes import PASSES, NoConfig
from kiln.compile.rewrite import Fn, Match, P, Rewrite, Rule, RuleSet, Var, op, scalar, tensor

aten = torch.ops.aten
X = Var("x", tensor)


def _shape(v) -> bool:
    return isinstance(v, (list, tuple))


def _dims(m: Match, name: str) -> list[int]:
    n = m.val("x").dim()
    return [d % n for d in m[name]] if n else list(m[name])


def _composed(m: Match) -> list[int]:
    # permute(permute(x, p), q): output dim i is inner dim q[i], which is x's dim p[q[i]]
    p, q = _dims(m, "p"), _dims(m, "q")
    return [p[i] for i in q]


def _same_swap(m: Match) -> bool:
    n = m.val("x").dim()
    return n > 0 and {m["a"] % n, m["b"] % n} == {m["c"] % n, m["d"] % n}


# Ops whose value is their input's values laid out by their view metadata (views) or copied
# unchanged (copies): where the engine finds the result's metadata equal to the input's, the
# op does nothing. `detach` is left alone: dropping it would change gradients.
NOOP_OPS = (aten.view, aten.reshape, aten.expand, aten.slice, aten.alias, aten.permute, aten.transpose,
            aten.flatten, aten.contiguous, aten.clone, aten.to, aten._to_copy, aten.type_as)
DROPOUT_OPS = (aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)

ALGEBRA = RuleSet((
    Rule("add_zero", P.add(X, 0), X),
    Rule("sub_zero", P.sub(X, 0), X),
    Rule("mul_one", P.mul(X, 1), X),
    Rule("div_one", P.div(X, 1), X),
    Rule("pow_one", P.pow(X, 1), X),
    Rule("dropout_eval", op(*DROPOUT_OPS)(X, Var("p", scalar), False), X),
))

LAYOUT = RuleSet((
    Rule("noop", op(*NOOP_OPS)(X), X),
    Rule("cat_single", P.cat([X]), X),
    Rule("t_t", P.t(P.t(X)), X),
    Rule("transpose_transpose", P.transpose(P.transpose(X, Var("a"), Var("b")), Var("c"), Var("d")), X,
         when=_same_swap),
    Rule("permute_permute_identity", P.permute(P.permute(X, Var("p")), Var("q")), X,
         when=lambda m: _composed(m) == list(range(m.val("x").dim()))),
    Rule("permute_permute", P.permute(P.permute(X, Var("p")), Var("q")), P.permute(X, Fn(_composed))),
    Rule("view_view", P.view(op(aten.view, aten.reshape)(X, Var("s0", _shape)), Var("s", _shape)),
         P.view(X, Var("s"))),
    Rule("reshape_reshape", P.reshape(op(aten.view, aten.reshape)(X, Var("s0", _shape)), Var("s", _shape)),
         P.reshape(X, Var("s"))),
))

SIMPLIFY = ALGEBRA + LAYOUT


@PASSES.register("simplify")
class Simplify(Rewrite):
    """The SIMPLIFY rules as a pass."""

    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        super().__init__(SIMPLIFY, name="simplify")
        self.config = config
