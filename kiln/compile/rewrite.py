"""Rewrites as data: (pattern, replacement) rules over ATen ops, composed with `+`.

A pattern is a small tree: `P.permute(P.permute(X, Var("p")), Var("q"))` matches an
aten.permute whose input is another aten.permute and binds x, p and q. Arguments are matched
in schema order with defaults filled in, so `P.add(X, 0)` matches `aten.add.Tensor(x, 0)`
whatever its alpha; unlisted trailing arguments match anything. A replacement is a capture
variable, a template tree of ops over the captures (with `Fn` for computed arguments), or a
function `(match, edit) -> fx.Node | None`.

The engine checks what a rule cannot: a replacement must have the same shape, dtype, strides
and offset as the node it replaces (so `x.int() + 0.0 -> x` or `expand(x) + 0 -> x` never
fire), and no rule touches values an in-place op may write.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch

from kiln.compile.edit import ProgramEdit, argument_index, arguments, mutated_aliases, same_meta, val
from kiln.graph.graph import Graph
from kiln.graph.passes import PassResult

fx = torch.fx
aten = torch.ops.aten
OpOverload = torch._ops.OpOverload
OpPacket = torch._ops.OpOverloadPacket


class Match:
    """The values a pattern bound (`m["x"]`), the op nodes it covered, and its root."""

    def __init__(self, root: fx.Node):
        self.root = root
        self.bound: dict[str, Any] = {}
        self.nodes: list[fx.Node] = []

    def __getitem__(self, name: str) -> Any:
        return self.bound[name]

    def __contains__(self, name: str) -> bool:
        return name in self.bound

    def val(self, name: str) -> Any:
        """The example (fake) value of a bound node: shapes, dtypes, strides."""
        return val(self.bound[name])


class Pattern:
    def match(self, value: Any, m: Match) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pattern):
    """A capture variable; the same name twice must bind the same value."""

    name: str
    check: Callable[[Any], bool] | None = None

    def match(self, value: Any, m: Match) -> bool:
        if self.name in m.bound:
            return _same_value(m.bound[self.name], value)
        if self.check is not None and not self.check(value):
            return False
        m.bound[self.name] = value
        return True


@dataclass(frozen=True)
class Wild(Pattern):
    """Matches anything, binds nothing."""

    def match(self, value: Any, m: Match) -> bool:
        return True


ANY = Wild()


@dataclass(frozen=True)
class Lit(Pattern):
    """A literal argument: equal and of the same kind (1 matches 1 and 1.0, never True)."""

    value: Any

    def match(self, value: Any, m: Match) -> bool:
        if isinstance(value, (fx.Node, list, tuple)):
            return False
        numbers = (int, float)
        if isinstance(value, numbers) and isinstance(self.value, numbers) and \
                not isinstance(value, bool) and not isinstance(self.value, bool):
            return value == self.value
        return type(value) is type(self.value) and value == self.value


@dataclass(frozen=True)
class Seq(Pattern):
    """A list argument of exactly these items (`P.cat([X])`)."""

    items: tuple[Pattern, ...]

    def match(self, value: Any, m: Match) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == len(self.items) and \
            all(p.match(v, m) for p, v in zip(self.items, value))


@dataclass(frozen=True)
class Fn(Pattern):
    """In a replacement template: an argument computed from the match."""

    fn: Callable[[Match], Any]


@dataclass(frozen=True)
class Op(Pattern):
    """A call of one of `targets` (op packets or overloads) whose arguments match `args`."""

    targets: tuple[Any, ...]
    args: tuple[Pattern, ...] = ()
    kwargs: tuple[tuple[str, Pattern], ...] = ()
    bind: str | None = None

    def named(self, name: str) -> "Op":
        """The same pattern, binding the matched node to `name`."""
        return Op(self.targets, self.args, self.kwargs, name)

    def match(self, value: Any, m: Match) -> bool:
        if not (isinstance(value, fx.Node) and value.op == "call_function"):
            return False
        t = value.target
        if not any(t == x or isinstance(t, OpOverload) and t.overloadpacket == x for x in self.targets):
            return False
        values = arguments(value)
        if len(self.args) > len(values):
            return False
        for p, v in zip(self.args, values):
            if not p.match(v, m):
                return False
        for name, p in self.kwargs:
            try:
                v = values[argument_index(t, name)]
            except ValueError:
                return False
            if not p.match(v, m):
                return False
        m.nodes.append(value)
        if self.bind is not None:
            m.bound[self.bind] = value
        return True


def pattern(x: Any) -> Pattern:
    """Wrap a literal or list as a pattern."""
    if isinstance(x, Pattern):
        return x
    if isinstance(x, (list, tuple)):
        return Seq(tuple(pattern(i) for i in x))
    return Lit(x)


def op(*targets: Any) -> Callable[..., Op]:
    """`op(aten.matmul, aten.bmm)(A, B)`: a pattern matching any of the targets."""
    def build(*args: Any, **kwargs: Any) -> Op:
        return Op(tuple(targets), tuple(pattern(a) for a in args),
                  tuple((k, pattern(v)) for k, v in kwargs.items()))
    return build


class _Ops:
    """`P.add(X, 0)` is `op(torch.ops.aten.add)(X, 0)`."""

    def __getattr__(self, name: str) -> Callable[..., Op]:
        return op(getattr(aten, name))


P = _Ops()
Replacement = Union[Pattern, Callable[[Match, ProgramEdit], "fx.Node | None"]]


@dataclass(frozen=True)
class Rule:
    """Where `pattern` matches (and `when` holds), the root becomes `replacement`.

    The replacement must have the root's strides, unless `keep_strides` is False: then every
    later op is re-checked with the new strides (a `view` that needs the old ones refuses).
    """

    name: str
    pattern: Op
    replacement: Replacement
    when: Callable[[Match], bool] | None = None
    keep_strides: bool = True

    def __add__(self, other: "Rule | RuleSet") -> "RuleSet":
        return RuleSet((self,)) + other

    def try_match(self, node: fx.Node) -> Match | None:
        m = Match(node)
        if not self.pattern.match(node, m) or (self.when is not None and not self.when(m)):
            return None
        return m


@dataclass(frozen=True)
class RuleSet:
    """Rules tried in order; the first that matches a node and builds a replacement wins."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self):
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names repeat: {sorted(n for n, c in Counter(names).items() if c > 1)}")

    def __add__(self, other: "Rule | RuleSet | Sequence[Rule]") -> "RuleSet":
        more = (other,) if isinstance(other, Rule) else tuple(other.rules if isinstance(other, RuleSet) else other)
        return RuleSet(self.rules + more)

    def __iter__(self):
        return iter(self.rules)


def rules(x: Rule | RuleSet | Sequence[Rule]) -> RuleSet:
    return x if isinstance(x, RuleSet) else RuleSet((x,)) if isinstance(x, Rule) else RuleSet(tuple(x))


@dataclass(frozen=True)
class Firing:
    rule: str
    node: str          # the node replaced
    replacement: str   # the node that stands for it now


@dataclass(frozen=True)
class RewriteRecord:
    """Which rule fired where, in order; `erased` are all nodes the rewrites removed."""

    fired: tuple[Firing, ...] = ()
    erased: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(f.rule for f in self.fired))


class Rewrite:
    """A pass that applies a rule set everywhere, sweeping until no rule fires."""

    def __init__(self, rule_set: Rule | RuleSet | Sequence[Rule], name: str = "rewrite", max_sweeps: int = 8):
        if max_sweeps < 1:
            raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")
        self.rules, self.name, self.max_sweeps = rules(rule_set), name, max_sweeps

    def __call__(self, graph: Graph) -> PassResult[RewriteRecord]:
        edit = ProgramEdit(graph)
        fired: list[Firing] = []
        erased: list[str] = []
        mutated = mutated_aliases(edit.graph)
        for _ in range(self.max_sweeps):
            before = len(fired)
            for node in list(edit.graph.nodes):
                if node.graph is edit.graph and node.op == "call_function" and not mutated(node):
                    self._rewrite_node(edit, node, mutated, fired, erased)
            if len(fired) == before:
                break
        if not fired:
            return PassResult(graph, False, RewriteRecord())
        return PassResult(edit.finish(), True, RewriteRecord(tuple(fired), tuple(erased)))

    def _rewrite_node(self, edit: ProgramEdit, node: fx.Node, mutated, fired: list, erased: list) -> None:
        for rule in self.rules:
            m = rule.try_match(node)
            if m is None:
                continue
            new = _build(rule.replacement, m, edit)
            if new is None or new is node:
                continue
            updates = None if mutated(new) else _fits(rule, new, node, edit)
            if updates is None:
                edit.erase_dead([new])
                continue
            node.replace_all_uses_with(new)
            for n, v in updates.items():
                n.meta["val"] = v
            fired.append(Firing(rule.name, node.name, new.name))
            erased += edit.erase_dead([node, *m.nodes])
            return


def _fits(rule: Rule, new: fx.Node, old: fx.Node, edit: ProgramEdit) -> dict | None:
    """{} when `new` can stand for `old` as it is; the users' new fake values when only the
    strides differ, the rule allows that and every user accepts them; None otherwise."""
    a, b = val(new), val(old)
    if same_meta(a, b):
        return {}
    if rule.keep_strides or not same_meta(a, b, strides=False):
        return None
    return edit.restride(old, a)


def _build(replacement: Replacement, m: Match, edit: ProgramEdit) -> fx.Node | None:
    """The replacement's node, inserted before the root; None when it cannot be built
    (a callable declined, or a template op rejected its arguments, e.g. an illegal view)."""
    with edit.graph.inserting_before(m.root):
        if isinstance(replacement, Pattern):
            created: list[fx.Node] = []
            try:
                out = _instantiate(replacement, m, edit, created)
            except (RuntimeError, ValueError, TypeError, IndexError):
                edit.erase_dead(reversed(created))
                return None
            return out if isinstance(out, fx.Node) else None
        return replacement(m, edit)


def _instantiate(p: Pattern, m: Match, edit: ProgramEdit, created: list) -> Any:
    if isinstance(p, Var):
        return m[p.name]
    if isinstance(p, Lit):
        return p.value
    if isinstance(p, Fn):
        return p.fn(m)
    if isinstance(p, Seq):
        return [_instantiate(i, m, edit, created) for i in p.items]
    if isinstance(p, Op):
        args = tuple(_instantiate(a, m, edit, created) for a in p.args)
        kwargs = {k: _instantiate(v, m, edit, created) for k, v in p.kwargs}
        node = _call(edit, p.targets[0], args, kwargs, m.root)
        created.append(node)
        return node
    raise TypeError(f"cannot build a replacement from {p!r}")


_PREFERRED = ("default", "Tensor", "int", "Scalar")


def _call(edit: ProgramEdit, target: Any, args: tuple, kwargs: dict, like: fx.Node) -> fx.Node:
    """A call of `target`; for an op packet, of its first functional overload that accepts
    these arguments (aten.mul.default is Scalar x Scalar: `P.mul(X, 2)` needs mul.Tensor)."""
    if not isinstance(target, OpPacket):
        return edit.call(target, args, kwargs, like=like)
    names = target.overloads()
    names = [n for n in _PREFERRED if n in names] + [n for n in names if n not in _PREFERRED]
    error: Exception = ValueError(f"no overload of {target} takes these arguments")
    for name in names:
        overload = getattr(target, name)
        if overload._schema.is_mutable:   # out= and in-place variants
            continue
        try:
            return edit.call(overload, args, kwargs, like=like)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            error = exc
    raise error


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return type(a) is type(b) and a == b


def tensor(v: Any) -> bool:
    """A Var check: the argument is a graph value holding a tensor."""
    return isinstance(val(v), torch.Tensor)


def scalar(v: Any) -> bool:
    """A Var check: a Python number (not a tensor, not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


