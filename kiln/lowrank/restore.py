"""Rebuild a factorised architecture from its transform record (the weights load afterwards)."""
from __future__ import annotations

from torch import nn

from kiln.errors import KilnError
from kiln.models.linear import as_torch_linears
from kiln.lowrank.apply import KIND, replace
from kiln.lowrank.svd import LowRankLinear
from kiln.lowrank.tucker import Tucker2Conv2d, check_conv
from kiln.runs.transforms import register_transform


@register_transform(KIND)
def restore(model: nn.Module, record: dict) -> nn.Module:
    modules = record.get("modules")
    if not isinstance(modules, dict):
        raise KilnError("lowrank transform record needs a 'modules' table")
    as_torch_linears(model)   # as factorize() saw it
    for fqn, entry in modules.items():
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise KilnError(f"lowrank record names {fqn!r}, which the model does not have") from None
        model = replace(model, fqn, _empty(module, entry, fqn))
    return model


def _empty(module: nn.Module, entry: dict, fqn: str) -> nn.Module:
    kind = entry.get("type")
    if kind == "Linear" and isinstance(module, nn.Linear):
        return LowRankLinear(module.in_features, module.out_features, int(entry["rank"]), module.bias is not None)
    if kind == "Conv2d" and isinstance(module, nn.Conv2d):
        check_conv(module, fqn)
        r_in, r_out = entry["ranks"]
        return Tucker2Conv2d(module, (int(r_in), int(r_out)))
    raise KilnError(f"lowrank record: {fqn} is a {type(module).__name__}, recorded as {kind!r}")
