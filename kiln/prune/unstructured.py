"""Unstructured pruning: individual weights zeroed by a mask that survives training.

A mask is a `torch.nn.utils.parametrize` parametrization (`weight = original * mask`), so the
pruned weights stay exactly zero while the survivors train, the mask saves and reloads with the
weights (`parametrizations.weight.original`, `...0.mask`), and `make_permanent` folds it into a
plain weight (do that before torch.export or torch.compile).

A criterion (kiln.prune.criteria: magnitude, random, snip, movement) scores each weight; the
lowest-scoring `round(ratio * n)` weights are pruned, counted per layer (local scope) or over
every target together (global scope).
Weights already pruned score -inf, so repeated pruning (AGP, lottery rounds) only adds zeros.
Activation sparsity zeroes the smallest-magnitude outputs of a module per sample (a forward hook).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from kiln.analysis.execution import Execution, ModuleExecution, Sparsity
from kiln.errors import KilnError
from kiln.models.linear import as_torch_linears
from kiln.prune.criteria import CRITERIA, ScoreContext
from kiln.runs.transforms import register_transform

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
KIND = "prune-unstructured"


class Mask(nn.Module):
    """The parametrization `weight = original * mask`; the mask is a float buffer of 0s and 1s."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def mask_of(module: nn.Module) -> Mask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, Mask)), None)


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor: the parametrization's original, or the plain weight."""
    return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight


def set_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Install (or overwrite in place) the module's weight mask."""
    existing = mask_of(module)
    if existing is not None:
        existing.mask.copy_(keep.to(existing.mask.dtype))
    else:
        parametrize.register_parametrization(module, "weight", Mask(keep.detach().clone()))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into a plain weight (zeros stay zeros); the model exports and compiles."""
    for module in model.modules():
        if mask_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def default_targets(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def check_target(model: nn.Module, fqn: str) -> nn.Module:
    module = _module(model, fqn)
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise KilnError(f"module {fqn!r} ({type(module).__name__}): no weight tensor to prune")
    return module


# -- scores -----------------------------------------------------------------------------------

def gradients(model: nn.Module, targets: Iterable[str], batches, loss: Callable) -> dict[str, torch.Tensor]:
    """Sum of dL/dw of each target's (effective) weight over `batches` of (x, y); weights unchanged."""
    targets = list(targets)
    grads = {fqn: torch.zeros_like(model.get_submodule(fqn).weight) for fqn in targets}
    was_training = model.training
    model.eval()   # no dropout noise in the saliency
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        weights = {fqn: model.get_submodule(fqn).weight for fqn in targets}
        for w in weights.values():
            w.retain_grad()
        loss(model, x, y).backward()
        for fqn, w in weights.items():
            if w.grad is not None:
                grads[fqn] += w.grad.detach()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def scores(model: nn.Module, targets: Iterable[str], criterion: str, ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Each target's scores; weights already masked out score -inf so they stay pruned."""
    fn = CRITERIA.get(criterion)
    out = {}
    for fqn in targets:
        module = model.get_submodule(fqn)
        with torch.no_grad():
            s = fn(module.weight.detach(), fqn, ctx).float()
            existing = mask_of(module)
            if existing is not None:
                s = torch.where(existing.mask.bool(), s, torch.full_like(s, -torch.inf))
        out[fqn] = s
    return out


# -- masks ------------------------------------------------------------------------------------

def prune_count(ratio: float, n: int) -> int:
    """How many of n weights a ratio prunes: round(ratio * n), the number the report checks."""
    return int(round(ratio * n))


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask zeroing exactly the k lowest scores (stable order breaks ties)."""
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(score.reshape(-1), stable=True)[:k]] = False
    return keep.reshape(score.shape)


def masks_for(all_scores: dict[str, torch.Tensor], ratio: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks that prune `ratio` of each layer (local) or of all layers together (global)."""
    if scope == "local":
        return {fqn: lowest_k_mask(s, prune_count(ratio, s.numel())) for fqn, s in all_scores.items()}
    if scope != "global":
        raise KilnError(f"unknown pruning scope {scope!r}; known: global, local")
    if not all_scores:
        return {}
    flat = torch.cat([s.reshape(-1) for s in all_scores.values()])
    keep = lowest_k_mask(flat, prune_count(ratio, flat.numel()))
    out, start = {}, 0
    for fqn, s in all_scores.items():
        out[fqn] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


@dataclass
class PruneResult:
    model: nn.Module
    record: dict           # the artifact transform record
    report: list[dict]     # per module: zeros, total, sparsity


def check_ratio(ratio: float, what: str = "ratio") -> None:
    if not 0 <= ratio < 1:
        raise KilnError(f"{what} {ratio} is outside [0, 1)")


def prune_unstructured(model: nn.Module, ratio: float, criterion: str = "magnitude", scope: str = "global", *,
                       targets: Iterable[str] | None = None, overrides: dict[str, float] | None = None,
                       ctx: ScoreContext | None = None) -> PruneResult:
    """Mask `ratio` of the targets' weights (default: every Linear/Conv); `overrides` give some
    modules their own ratio, pruned locally. Masks already present only gain zeros."""
    check_ratio(ratio)
    as_torch_linears(model)   # a mask on PyG's Linear would save under names its restore lacks
    overrides = dict(overrides or {})
    for fqn, r in overrides.items():
        check_ratio(r, f"ratio of module {fqn!r}:")
    targets = [t for t in (default_targets(model) if targets is None else targets) if t not in overrides]
    for fqn in [*targets, *overrides]:
        check_target(model, fqn)
    ctx = ctx or ScoreContext()
    keep = masks_for(scores(model, targets, criterion, ctx), ratio, scope)
    for fqn, r in overrides.items():
        keep |= masks_for(scores(model, [fqn], criterion, ctx), r, "local")
    for fqn, k in keep.items():
        set_mask(model.get_submodule(fqn), k)
    record = {"kind": KIND, "criterion": criterion, "scope": scope, "ratio": ratio, "masks": sorted(keep)}
    return PruneResult(model, record, sparsity_report(model, [*targets, *overrides]))


def sparsity_report(model: nn.Module, fqns: Iterable[str]) -> list[dict]:
    """Zeros counted in each module's effective weight (what the forward pass uses)."""
    rows = []
    for fqn in fqns:
        with torch.no_grad():
            w = model.get_submodule(fqn).weight
        zeros, total = int((w == 0).sum()), w.numel()
        rows.append({"module": fqn, "zeros": zeros, "total": total, "sparsity": zeros / total})
    return rows


# -- activation sparsity ----------------------------------------------------------------------

class ActivationSparsity:
    """Forward hook zeroing the `ratio` smallest-magnitude outputs of each sample (exact count)."""

    def __init__(self, fqn: str, ratio: float):
        check_ratio(ratio, f"activation ratio of module {fqn!r}:")
        self.fqn, self.ratio = fqn, ratio

    def __call__(self, module: nn.Module, args, out):
        if not isinstance(out, torch.Tensor):
            raise KilnError(f"module {self.fqn!r}: activation sparsity needs a tensor output, got {type(out).__name__}")
        flat = out.reshape(out.shape[0], -1)
        k = prune_count(self.ratio, flat.shape[1])
        if k == 0:
            return out
        drop = torch.argsort(flat.abs(), dim=1, stable=True)[:, :k]
        return flat.scatter(1, drop, 0.0).reshape(out.shape)


def sparsify_activations(model: nn.Module, ratios: dict[str, float]) -> dict:
    """Attach an ActivationSparsity hook to each named module; returns the record's entry."""
    for fqn, ratio in ratios.items():
        module = _module(model, fqn)
        module.register_forward_hook(ActivationSparsity(fqn, ratio))
    return dict(ratios)


def _module(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise KilnError(f"module {fqn!r}: no such module in the model") from None


def restore_masks(model: nn.Module, fqns: Iterable[str]) -> nn.Module:
    """Placeholder all-ones masks on the named modules; the saved weights then fill them in."""
    as_torch_linears(model)   # as the pruning saw them
    for fqn in fqns:
        module = check_target(model, fqn)
        if mask_of(module) is None:
            set_mask(module, torch.ones_like(module.weight, dtype=torch.bool))
    return model


def sparse_execution(model: nn.Module, fqns: Iterable[str], pattern: str, index_bits: float,
                     density: float | None = None) -> tuple[nn.Module, Execution]:
    """The pruned model as a sparse kernel runs it: masks folded into the weights, and per
    module its kept fraction (counted from the weights unless the pattern fixes it) and the
    index bits per weight a sparse format stores."""
    make_permanent(model)
    modules = {}
    for fqn in fqns:
        w = check_target(model, fqn).weight
        kept = density if density is not None else float((w != 0).sum()) / max(w.numel(), 1)
        modules[fqn] = ModuleExecution(sparsity=Sparsity(kept, pattern, index_bits))
    note = (f"{pattern} sparsity: FLOPs and weight bytes of the kept weights only (plus their index), assuming a "
            f"kernel that skips the zeros" + (" (sparse tensor cores run 2:4)" if pattern == "2:4" else ""))
    return model, Execution(modules, (note,))


def _execution(model: nn.Module, record: dict) -> tuple[nn.Module, Execution]:
    # a one-bit mask per weight, as `kiln prune` reports the stored size
    model, execution = sparse_execution(model, record.get("masks", []), "unstructured", 1.0)
    if record.get("activations"):
        note = "activation sparsity not costed: its zeros are data-dependent"
        execution = Execution(execution.modules, execution.notes + (note,))
    return model, execution


@register_transform(KIND, execution=_execution)
def _restore(model: nn.Module, record: dict) -> nn.Module:
    if not record.get("permanent"):
        restore_masks(model, record.get("masks", []))
    sparsify_activations(model, record.get("activations", {}))
    return model
