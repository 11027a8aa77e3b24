"""Any transformers model type's config at CPU size: its defaults shrunk (shrink.py), then the query.

Sub-configs are shrunk and rebuilt one by one with the same width divisor and passed to the parent
as config objects, so the parent keeps them as they are; a dotted query key reaches into them
(`vision_config.image_size=64`, `text_config.vision_config.x=...` for nested ones).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from kiln.errors import KilnError
from kiln.models.hf_config.query import canonical, known_keys, parse_value, squash, suggest
from kiln.models.hf_config.shrink import (_ACTIVE, _EXPERTS, ACTIVE, choose_width, field, is_config,
                                          placeholders_in_vocab, shrink_kwargs)


def default_config(cls, spec: str):
    try:
        config = cls()
    except Exception as exc:  # a config class that cannot build its own defaults
        raise KilnError(f"{spec}: {cls.__name__}() with its defaults failed: {squash(exc)}") from None
    if importlib.util.find_spec("timm") is None:
        _native_backbones(config)
    return config


# timm backbones that transformers implements itself: (model type, config keywords, the stage
# timm's feature index 0 is). timm's resnets count the stem as feature 0, its swins do not.
# Each config class's defaults are the named network (ResNetConfig() is resnet-50, SwinConfig()
# swin-tiny-patch4-window7-224).
_TIMM_NATIVE = {
    "resnet18": ("resnet", {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]}, 0),
    "resnet34": ("resnet", {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]}, 0),
    "resnet50": ("resnet", {}, 0),
    "resnet101": ("resnet", {"depths": [3, 4, 23, 3]}, 0),
    "swin_tiny_patch4_window7_224": ("swin", {}, 1),
}


def _native_backbones(config) -> None:
    """Without timm (not installed here: it pulls torchvision and another torch), a default
    config whose backbone is a timm network transformers also implements (DETR and its
    descendants default to timm's resnet50, OmDet-Turbo to its swin-tiny) gets transformers'
    own network with the same stages out, as `use_timm_backbone=False` would; the released
    checkpoints' weights differ only in naming. Backbones without a native twin stay as they are."""
    from transformers import CONFIG_MAPPING

    for f in dataclasses.fields(config):
        sub = field(config, f.name)
        if not is_config(sub):
            continue
        native = _TIMM_NATIVE.get(getattr(sub, "backbone", None)) if sub.model_type == "timm_backbone" else None
        if native is None:
            _native_backbones(sub)
            continue
        model_type, kwargs, offset = native
        indices = [i + offset for i in (getattr(sub, "out_indices", None) or [4 - offset])]
        setattr(config, f.name, CONFIG_MAPPING[model_type](num_channels=sub.num_channels, out_indices=indices, **kwargs))


def width_ladder(base) -> list[int]:
    """Width divisors to try in turn: the full shrink, then widths 4x larger (some models round
    a width in ways the ratios do not keep; wider sizes avoid the rounding)."""
    first = choose_width(base)
    return [first, first // 4] if first >= 4 else [first]


def generic_config(base, width: int, query: dict[str, str], spec: str):
    """`base` (a default config) its widths divided by `width`, with `query` applied over it."""
    tree: dict[str, dict] = {}
    for key, text in query.items():
        node = tree
        *path, name = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[name] = text
    return _rebuild(base, width, tree, spec, "")


def _rebuild(config, width: int, query: dict, spec: str, where: str):
    cls = type(config)
    kwargs = shrink_kwargs(config, width)
    subs = {f.name: field(config, f.name) for f in dataclasses.fields(config)
            if is_config(field(config, f.name))}
    for name, sub in subs.items():
        kwargs[name] = _rebuild(sub, width, query.get(name, {}), spec, f"{where}{name}.")
    placeholders_in_vocab(config, kwargs)
    known = known_keys(cls)
    for key, text in query.items():
        if isinstance(text, dict):
            if key not in subs:
                raise KilnError(f"{spec}: {cls.__name__} has no sub-config {where + key!r}; "
                                f"sub-configs: {', '.join(subs) or 'none'}")
            continue
        if key not in known:
            raise KilnError(f"{spec}: {cls.__name__} has no attribute {key!r}; {suggest(key, known)}")
        kwargs[canonical(cls, key)] = parse_value(where + key, text, known[key], spec)
    if "use_cache" in known:
        kwargs["use_cache"] = False  # even over the query: export fails on a returned DynamicCache
    config = construct(cls, kwargs, spec)
    unset = _unset_derived(config, known) | _mrope_fit(config, "rope_parameters" in query)
    return construct(cls, kwargs | unset, spec) if unset else config


def _mrope_fit(config, queried: bool) -> dict:
    """M-RoPE sections rescaled to the rotary half of the head the built config has (head_dim
    x partial_rotary_factor / 2), where the ratio shrink missed it (a derived head_dim, glm's
    partial rotary factor); the proportions are kept."""
    rope = field(config, "rope_parameters")
    sections = rope.get("mrope_section") if isinstance(rope, dict) and not queried else None
    heads, hidden = field(config, "num_attention_heads"), field(config, "hidden_size")
    head = field(config, "head_dim")
    if head is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
        head = hidden // heads
    if not (isinstance(sections, (list, tuple)) and all(isinstance(v, int) for v in sections) and isinstance(head, int)):
        return {}
    partial = rope.get("partial_rotary_factor") or field(config, "partial_rotary_factor") or 1
    half = int(head * partial) // 2
    if sum(sections) == half or half < len(sections):
        return {}
    fitted = [max(1, v * half // sum(sections)) for v in sections]
    fitted[0] += half - sum(fitted)
    return {"rope_parameters": dict(rope, mrope_section=fitted)} if fitted[0] > 0 else {}


def _unset_derived(config, known: dict) -> dict:
    """Fields some default configs leave None that their model reads as numbers (hunyuan's and
    ministral's head_dim, nemotron's num_key_value_heads; the released configs carry them):
    their standard meaning, one key/value head per query head and hidden / heads per head."""
    heads, hidden = field(config, "num_attention_heads"), field(config, "hidden_size")
    out = {}
    if "num_key_value_heads" in known and field(config, "num_key_value_heads") is None and isinstance(heads, int):
        out["num_key_value_heads"] = heads
    if ("head_dim" in known and field(config, "head_dim") is None and isinstance(heads, int)
            and isinstance(hidden, int) and heads > 0 and hidden % heads == 0):
        out["head_dim"] = hidden // heads
    # a forecaster's horizon (time_series_transformer, informer, autoformer: their released
    # configs set it; the model refuses to build without it): 8 steps
    if "prediction_length" in known and field(config, "prediction_length") is None:
        out["prediction_length"] = 8
    # experts routed per token left None (deepseek_v2: the released configs set 6): 2 of the 4 kept
    experts = [v for name in known if _EXPERTS.match(name) for v in [field(config, name)] if isinstance(v, int) and v > 0]
    for name in known:
        if experts and _ACTIVE.match(name) and name == canonical(type(config), name) and field(config, name) is None:
            out[name] = min(ACTIVE, max(experts))
    return out


def construct(cls, kwargs: dict[str, Any], spec: str):
    try:
        return cls(**kwargs)
    except Exception as exc:  # strict dataclass validation, or a config's own checks
        raise KilnError(f"{spec}: transformers rejected the config: {squash(exc)}") from None
