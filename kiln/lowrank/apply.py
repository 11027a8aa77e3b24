"""Factorise the modules a plan chose: pick each rank, swap the module, record what changed.

The record `{"kind": "lowrank", "modules": {fqn: {"type": "Linear", "rank": r} |
{"type": "Conv2d", "ranks": [r_in, r_out]}}}` is all `kiln.lowrank.restore` needs to rebuild the
architecture; the factors themselves load from the artifact's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kiln.lowrank import svd, tucker
from kiln.lowrank.config import Choice, Plan
from kiln.models.linear import as_torch_linears
from kiln.models.probe import record

KIND = "lowrank"


@dataclass(frozen=True)
class Decision:
    """One module's outcome: the ranks (None when left dense) or why it stayed dense."""
    fqn: str
    type: str
    ranks: tuple[int, ...] | None
    params_before: int
    params_after: int
    reason: str = ""


def shared_weights(model: nn.Module) -> dict[str, str]:
    """Module FQN -> another module it shares a parameter with (tied embeddings, reused layers)."""
    owners: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module = name.rpartition(".")[0]
        first = owners.setdefault(id(p), module)
        if first != module:
            shared[module], shared[first] = first, module
    return shared


def decide(fqn: str, module: nn.Module, choice: Choice) -> Decision:
    """The ranks a choice gives one module, or why it stays dense (a rank that saves nothing)."""
    dense = sum(p.numel() for p in module.parameters())
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return Decision(fqn, name, None, dense, dense, f"grouped Conv2d (groups={module.groups}) is not supported")
        ranks = _conv_ranks(module, choice)
        after = tucker.tucker2_params(module, *ranks)
    else:
        out_f, in_f = module.weight.shape
        ranks = (_linear_rank(module, choice),)
        after = svd.svd_params(in_f, out_f, ranks[0], module.bias is not None)
    if after >= dense:
        return Decision(fqn, name, None, dense, dense, f"rank {'x'.join(map(str, ranks))} saves no parameters")
    return Decision(fqn, name, ranks, dense, after)


def _linear_rank(linear: nn.Linear, choice: Choice) -> int:
    out_f, in_f = linear.weight.shape
    if choice.kind == "budget":
        return min(svd.rank_for_budget(in_f, out_f, choice.value), min(in_f, out_f))
    if choice.kind == "energy":
        return svd.rank_for_energy(svd.singular_values(linear.weight), choice.value)
    return min(int(choice.value), min(in_f, out_f))


def _conv_ranks(conv: nn.Conv2d, choice: Choice) -> tuple[int, int]:
    if choice.kind == "budget":
        return tucker.ranks_for_budget(conv, choice.value)
    if choice.kind == "energy":
        s_in, s_out = tucker.mode_singular_values(conv.weight)
        return svd.rank_for_energy(s_in, choice.value), svd.rank_for_energy(s_out, choice.value)
    r = int(choice.value)
    return min(r, conv.in_channels), min(r, conv.out_channels)


def factorized(module: nn.Module, ranks: tuple[int, ...], fqn: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return tucker.factorize_conv(module, (ranks[0], ranks[1]), fqn)
    return svd.factorize_linear(module, ranks[0], fqn)


def replace(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Put `new` at `fqn` (the model itself when fqn is empty); returns the model."""
    if not fqn:
        return new
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def factorize(model: nn.Module, plan: Plan) -> tuple[nn.Module, list[Decision], dict]:
    """Swap every planned module for its factorisation; (model, decisions, transform record)."""
    as_torch_linears(model)   # PyG's Linear is factorised, and restored, as the nn.Linear it is
    shared = shared_weights(model)
    decisions = [Decision(f, type(model.get_submodule(f)).__name__, None, 0, 0, why) for f, why in plan.skipped.items()]
    record: dict = {"kind": KIND, "modules": {}}
    for fqn, choice in plan.chosen.items():
        module = model.get_submodule(fqn)
        if fqn in shared:
            n = sum(p.numel() for p in module.parameters())
            decisions.append(Decision(fqn, type(module).__name__, None, n, n, f"shares a weight with {shared[fqn] or 'the root'}"))
            continue
        d = decide(fqn, module, choice)
        decisions.append(d)
        if d.ranks is not None:
            model = replace(model, fqn, factorized(module, d.ranks, fqn))
            record["modules"][fqn] = {"type": d.type, "rank": d.ranks[0]} if d.type == "Linear" \
                else {"type": d.type, "ranks": list(d.ranks)}
    return model, decisions, record


def module_inputs(model: nn.Module, fqns: list[str], run) -> dict[str, tuple]:
    """The positional inputs each named module receives in one call of `run(model)`."""
    return record(model, fqns, run)


def module_flops(module: nn.Module, args: tuple) -> int:
    """torch.utils.flop_counter's count of one module call."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()
