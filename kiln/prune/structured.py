"""Structured pruning: remove whole channels, FFN neurons and attention heads, so the model is
an ordinary, physically smaller nn.Module that trains, saves, reloads and exports.

Policy apart from mechanism: kiln.prune.deps finds the groups of coupled dimensions on the
captured graph, a criterion (kiln.prune.importance) scores each group's units, this module
decides how many units each group keeps and slices every member tensor; one small function per
layer type then brings that layer's attributes (in/out channels, features, heads) in line.

    res = prune_structured(model, (x,), ratio=0.5)                        # CNN channels
    res = prune_transformer(model, (), heads=1/3, ffn=0.5, example_kwargs=batch)   # BERT-like
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kiln.errors import KilnError, first_line
from kiln.models.linear import as_torch_linears
from kiln.runs.transforms import register_transform
from kiln.prune.deps import Group, find_groups
from kiln.prune.criteria import Reduction, ScoreContext, needs_gradients
from kiln.prune.importance import default_loss, gradients, group_scores

KIND = "prune-structured"
Keeps = dict[str, dict[int, torch.Tensor]]   # parameter FQN -> dim -> indices kept


@dataclass
class StructuredResult:
    model: nn.Module
    record: dict     # the artifact transform record: kept indices per parameter and dim
    report: dict     # per-layer shapes before/after, parameter counts, groups, pinned groups


# -- the groups of a model ---------------------------------------------------------------------

def dependency_groups(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None) -> list[Group]:
    """Export `model` (eval mode) on the example inputs and return its channel groups."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False)
    except Exception as exc:   # torch.export raises many types; all mean the model's construct
        raise KilnError(f"cannot capture the model to find its channel groups: {type(exc).__name__}: "
                        f"{first_line(exc)}") from None
    finally:
        model.train(was_training)
    return [g for g in find_groups(program) if g.slots]


# -- how much each group loses -----------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    ratio: float
    targets: dict[str, float]
    ignore: tuple[str, ...]
    heads: float | None
    ffn: float | None
    round_to: int

    def __post_init__(self):
        for name, r in [("ratio", self.ratio), ("heads", self.heads), ("ffn", self.ffn), *self.targets.items()]:
            if r is not None and not (isinstance(r, (int, float)) and 0 <= r < 1):
                raise KilnError(f"structured pruning: {name} must be in [0, 1), got {r!r}")
        for pattern in (*self.targets, *self.ignore):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise KilnError(f"structured pruning: {pattern!r} is not a valid regex: {exc}") from None
        if self.round_to < 1:
            raise KilnError(f"structured pruning: round_to must be >= 1, got {self.round_to}")

    def _target(self, modules: list[str]) -> float | None:
        for fqn in modules:
            if fqn in self.targets:
                return self.targets[fqn]
        for pattern, r in self.targets.items():
            if any(re.search(pattern, fqn) for fqn in modules):
                return r
        return None

    def check_targets(self, groups: list[Group]) -> None:
        producers = [fqn for g in groups for fqn in g.producers]
        for key in self.targets:
            if key not in producers and not any(re.search(key, fqn) for fqn in producers):
                raise KilnError(f"structured pruning target {key!r} matches no layer that produces channels")

    def targeted(self, group: Group) -> bool:
        return bool(self._target(group.producers))

    def ratio_of(self, group: Group) -> float:
        producers = group.producers
        target = self._target(producers)
        if group.pinned:
            if target:
                raise KilnError(f"cannot prune {producers[0]}: {group.pinned[0]}")
            return 0.0
        if any(fqn == ig or re.fullmatch(ig, fqn) for fqn in producers for ig in self.ignore):
            return 0.0
        if target is not None:
            return target
        if self.heads is not None and "heads" in group.flags:
            return self.heads
        if self.ffn is not None and is_ffn(group):
            return self.ffn
        return self.ratio

    def keep_count(self, units: int, ratio: float) -> int:
        keep = units - math.floor(units * ratio + 1e-9)
        keep = math.ceil(keep / self.round_to) * self.round_to
        return max(1, min(units, keep))


def is_ffn(group: Group) -> bool:
    """A hidden layer between two weight layers (a transformer's FFN): no norm, residual add or heads."""
    return not (group.flags & {"heads", "residual", "norm"}) and all(s.role in ("out", "in") for s in group.slots)


# -- the engine --------------------------------------------------------------------------------

def prune_structured(model: nn.Module, example_inputs: tuple, ratio: float, criterion: str = "magnitude",
                     reduction: Reduction = Reduction.SUM, *, targets: dict[str, float] | None = None,
                     ignore: tuple[str, ...] = (), batches: list | None = None, round_to: int = 1,
                     example_kwargs: dict | None = None, heads: float | None = None, ffn: float | None = None,
                     seed: int = 0) -> StructuredResult:
    """Remove `ratio` of the units of every prunable group (a copy of `model`; the original is untouched).

    targets: per-module ratios (exact FQN first, then regex searched in the FQN) of a group's
    producers; ignore: producers (FQN or regex) whose groups stay whole; heads / ffn: ratios for
    attention-head groups and feed-forward hidden groups; criterion and reduction: how a unit is
    scored (kiln.prune.criteria); batches: (x, y) for criteria that need gradients (snip, movement);
    round_to: keep a multiple of this many units per group; seed: the random criterion's.
    """
    plan = Plan(ratio, dict(targets or {}), tuple(ignore), heads, ffn, round_to)
    if needs_gradients(criterion) and not batches:
        raise KilnError(f"criterion {criterion} needs batches of (x, y) to take gradients on")
    model = copy.deepcopy(model)
    as_torch_linears(model)   # PyG's Linear shrinks, and is reported, as the nn.Linear it is
    groups = dependency_groups(model, example_inputs, example_kwargs)
    plan.check_targets(groups)
    params = dict(model.named_parameters())
    ctx = ScoreContext(grads=gradients(model, batches, default_loss) if needs_gradients(criterion) else {}, seed=seed)
    decisions: list[Decision] = []
    for group in groups:
        r = plan.ratio_of(group)
        keep_n = plan.keep_count(group.units, r)
        if keep_n < group.units:
            order = torch.argsort(group_scores(group, criterion, params, ctx, reduction), descending=True, stable=True)
            decisions.append(Decision(group, torch.sort(order[keep_n:]).values, r, plan.targeted(group)))
    before, n_before = _shapes(model), _count(model)
    run = (example_inputs, example_kwargs or {})
    decisions, broken = _runnable(model, decisions, run)
    keeps = _keeps(model, decisions)
    apply_keeps(model, keeps)
    error = _run_error(model, run)
    if error:
        raise KilnError(f"the pruned model no longer runs ({error})")
    report = _report(model, before, n_before, [d.row() for d in decisions], groups, broken)
    record = {"kind": KIND, "keep": {p: {str(d): idx.tolist() for d, idx in dims.items()} for p, dims in keeps.items()}}
    return StructuredResult(model, record, report)


@dataclass
class Decision:
    group: Group
    dropped: torch.Tensor   # units removed
    ratio: float
    targeted: bool          # the user named this group: failing to prune it is an error

    def row(self) -> dict:
        g = self.group
        return {"producers": g.producers, "units": g.units, "unit": g.unit, "kept": g.units - len(self.dropped),
                "ratio": self.ratio, "flags": sorted(g.flags)}


def _keeps(model: nn.Module, decisions: list[Decision]) -> Keeps:
    masks: dict[str, dict[int, torch.Tensor]] = {}
    for d in decisions:
        for slot in d.group.slots:
            size = _tensor(model, slot.param).shape[slot.dim]
            mask = masks.setdefault(slot.param, {}).setdefault(slot.dim, torch.ones(size, dtype=torch.bool))
            mask[d.group.positions(slot, d.dropped)] = False
    return {p: {d: m.nonzero().flatten() for d, m in dims.items()} for p, dims in masks.items()}


def _run_error(model: nn.Module, run: tuple[tuple, dict]) -> str:
    """'' when the model runs on the example inputs, else what went wrong."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*run[0], **run[1])
        return ""
    except Exception as exc:   # any failure here is a size fixed in the model's code
        return f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        model.train(was_training)


def _runnable(model: nn.Module, decisions: list[Decision], run) -> tuple[list[Decision], list[dict]]:
    """The decisions whose pruning leaves a model that still runs. A size written into the model's
    code (a view to a width taken from another tensor) is invisible to the graph, so when the whole
    plan fails, each group is tried alone and the ones that break the code are left whole."""
    trial = copy.deepcopy(model)
    apply_keeps(trial, _keeps(trial, decisions))
    if not _run_error(trial, run):
        return decisions, []
    ok, broken = [], []
    for d in decisions:
        trial = copy.deepcopy(model)
        apply_keeps(trial, _keeps(trial, [d]))
        error = _run_error(trial, run)
        if not error:
            ok.append(d)
        elif d.targeted:
            raise KilnError(f"cannot prune {d.group.producers[0]}: the pruned model no longer runs ({error})")
        else:
            broken.append({"modules": d.group.modules[:4], "reason": f"pruning it breaks the model's code: {error}"})
    return ok, broken


def prune_transformer(model: nn.Module, example_inputs: tuple = (), *, heads: float = 0.0, ffn: float = 0.0,
                      criterion: str = "magnitude", example_kwargs: dict | None = None, **kw: Any) -> StructuredResult:
    """Remove `heads` of every attention layer's heads and `ffn` of every feed-forward layer's neurons."""
    return prune_structured(model, example_inputs, 0.0, criterion, heads=heads, ffn=ffn,
                            example_kwargs=example_kwargs, **kw)


def _tensor(model: nn.Module, fqn: str) -> torch.Tensor:
    owner, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(owner), name)


# -- slicing, and one attribute fix per layer type ---------------------------------------------

LayerFix = Callable[[nn.Module, dict], None]
LAYERS: dict[type, LayerFix] = {}


def _layer(*types: type):
    def deco(fn: LayerFix) -> LayerFix:
        for t in types:
            LAYERS[t] = fn
        return fn
    return deco


def apply_keeps(model: nn.Module, keeps: Keeps) -> nn.Module:
    """Slice every listed tensor to its kept indices, then let each touched layer fix its attributes."""
    as_torch_linears(model)   # a restore, as prune_structured saw the model
    by_module: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for fqn, dims in keeps.items():
        owner, _, name = fqn.rpartition(".")
        by_module.setdefault(owner, {})[name] = dims
    tied = _owners(model)
    for owner, tensors in by_module.items():
        module = model.get_submodule(owner)
        before = {a: getattr(module, a, 1) for a in ("groups", "in_channels", "out_channels")}
        for name, dims in tensors.items():
            _slice(module, name, dims, tied)
        fix = next((f for t, f in LAYERS.items() if type(module) is t), None) \
            or next((f for t, f in LAYERS.items() if isinstance(module, t)), None) \
            or LAYERS_BY_NAME.get(type(module).__name__)
        if fix is not None:
            fix(module, before)
    for module in model.modules():
        if all(hasattr(module, a) for a in ("num_attention_heads", "attention_head_size", "all_head_size")) \
                and isinstance(getattr(module, "query", None), nn.Linear):
            module.all_head_size = module.query.out_features
            module.num_attention_heads = module.all_head_size // module.attention_head_size
    return model


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter: tied weights shrink together."""
    out: dict[int, list] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append((module, name))
    return out


def _slice(module: nn.Module, name: str, dims: dict[int, torch.Tensor], tied: dict) -> None:
    old = getattr(module, name)
    new = old.detach()
    for dim, idx in dims.items():
        new = new.index_select(int(dim), torch.as_tensor(idx, dtype=torch.long))
    if isinstance(old, nn.Parameter):
        param = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
        for owner, attr in tied.get(id(old), [(module, name)]):
            setattr(owner, attr, param)
    else:
        module._buffers[name] = new.clone()


@_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _fix_conv(m: nn.Module, before: dict) -> None:
    depthwise = before["groups"] > 1 and before["groups"] == before["in_channels"]
    m.out_channels = m.weight.shape[0]
    if depthwise:
        m.groups = m.in_channels = m.out_channels // (before["out_channels"] // before["groups"])
    else:
        m.in_channels = m.weight.shape[1] * m.groups


@_layer(nn.Linear)
def _fix_linear(m: nn.Linear, before: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


@_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _fix_batch_norm(m: nn.Module, before: dict) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    m.num_features = ref.shape[0]


@_layer(nn.LayerNorm)
def _fix_layer_norm(m: nn.LayerNorm, before: dict) -> None:
    m.normalized_shape = (m.weight.shape[0],)


def _fix_hf_conv1d(m: nn.Module, before: dict) -> None:
    """transformers' Conv1D (GPT-2) keeps its output width in `nf` and uses it in forward."""
    m.nx, m.nf = m.weight.shape


LAYERS_BY_NAME: dict[str, LayerFix] = {"Conv1D": _fix_hf_conv1d}   # foreign layers kiln does not import


@_layer(nn.Embedding)
def _fix_embedding(m: nn.Embedding, before: dict) -> None:
    m.embedding_dim = m.weight.shape[1]


# -- report and restore ------------------------------------------------------------------------

def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict[str, dict]:
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight
            out[fqn] = {"type": type(m).__name__, "in": w.shape[1] * getattr(m, "groups", 1), "out": w.shape[0],
                        "params": sum(p.numel() for p in m.parameters(recurse=False))}
    return out


def _report(model: nn.Module, before: dict, n_before: int, rows: list, groups: list[Group], broken: list) -> dict:
    after = _shapes(model)
    layers = {fqn: {"type": b["type"], "in": [b["in"], after[fqn]["in"]], "out": [b["out"], after[fqn]["out"]],
                    "params": [b["params"], after[fqn]["params"]]}
              for fqn, b in before.items() if b != after[fqn]}
    pinned = [{"modules": g.modules[:4], "reason": g.pinned[0]} for g in groups if g.pinned and g.producers] + broken
    return {"params_before": n_before, "params_after": _count(model), "layers": layers, "groups": rows,
            "pinned": pinned}


@register_transform(KIND)
def restore(model: nn.Module, record: dict) -> nn.Module:
    """Re-apply a structured pruning record to a freshly built model (weights are loaded after)."""
    keep = record.get("keep")
    if not isinstance(keep, dict):
        raise KilnError(f"{KIND} record has no 'keep' table")
    # every name of a tied weight (GPT's lm_head.weight is its token embedding): the export that
    # found the groups may have named either
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    missing = sorted(set(keep) - names)
    if missing:
        raise KilnError(f"{KIND} record names {missing[0]}, which the model does not have")
    keeps = {p: {int(d): torch.tensor(idx, dtype=torch.long) for d, idx in dims.items()} for p, dims in keep.items()}
    return apply_keeps(model, keeps)
