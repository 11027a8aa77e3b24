"""The constraints of a model's sizes that torch would otherwise report deep in a forward
("selected index k out of range"), checked on the built config so a query that breaks one
is refused in one line that names it. Only constraints a queried key takes part in are
checked: the defaults are the model's own business (some models pad a ragged size)."""
from __future__ import annotations

from typing import Callable

from kiln.errors import KilnError
from kiln.models.hf_config.shrink import field, walk

_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_ACTIVE = ("num_experts_per_tok", "num_experts_per_token", "moe_topk")
_HIDDEN = ("hidden_size", "d_model", "n_embd", "embed_dim")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
_KV = ("num_key_value_heads",)


def _pick(config, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = field(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _active_experts(config, queried: set) -> tuple[tuple[str, ...], str] | None:
    experts, active = _pick(config, _EXPERTS), _pick(config, _ACTIVE)
    if experts and active and active[1] > experts[1]:
        return (experts[0], active[0]), (f"{active[0]}={active[1]} > {experts[0]}={experts[1]}: "
                                         "a token cannot be routed to more experts than there are")
    return None


def _heads_divide(config, queried: set) -> tuple[tuple[str, ...], str] | None:
    hidden, heads = _pick(config, _HIDDEN), _pick(config, _HEADS)
    if hidden and heads and hidden[1] % heads[1] and "head_dim" not in queried:
        return (hidden[0], heads[0]), (f"{hidden[0]}={hidden[1]} is not a multiple of {heads[0]}={heads[1]}: "
                                       "each attention head takes an equal slice of the hidden size")
    return None


def _kv_divides(config, queried: set) -> tuple[tuple[str, ...], str] | None:
    heads, kv = _pick(config, _HEADS), _pick(config, _KV)
    if heads and kv and heads[1] % kv[1]:
        return (heads[0], kv[0]), (f"{heads[0]}={heads[1]} is not a multiple of {kv[0]}={kv[1]}: "
                                   "grouped-query attention shares each key/value head among equal groups")
    return None


def _patches_tile(config, queried: set) -> tuple[tuple[str, ...], str] | None:
    image, patch = field(config, "image_size"), field(config, "patch_size")
    if isinstance(image, int) and isinstance(patch, int) and patch > 0 and image % patch:
        return ("image_size", "patch_size"), (f"image_size={image} is not a multiple of patch_size={patch}: "
                                              "the patches must tile the image")
    return None


CHECKS: tuple[Callable, ...] = (_active_experts, _heads_divide, _kv_divides, _patches_tile)


def check_constraints(config, query: dict[str, str], spec: str) -> None:
    """Raise KilnError for the first broken constraint that a key of `query` takes part in."""
    queried = {key.rpartition(".")[2] for key in query}
    for node in walk(config):
        for check in CHECKS:
            broken = check(node, queried)
            if broken and queried & set(broken[0]):
                raise KilnError(f"{spec}: {broken[1]}")
