"""Shrink any transformers config to CPU size by the field names every architecture shares.

The rule that keeps a model's own constraints: every width in the config tree (hidden sizes,
feed-forward sizes, embedding and projection dims, convolution widths) is divided by ONE
power of two `width`, every head count by one power of two `heads` <= `width`, and every
per-head size (head_dim, rotary dims, the rope sections) by `width / heads`. Ratios are kept,
so hidden = heads x head_dim, a projection that maps the vision tower onto the text width, or
a rotary dimension dividing the head dimension all still hold. Layer counts become 2 (1 per
stage in `depths`), expert counts 4 with 2 active; vocabularies, token ids, image, patch and
audio sizes keep their defaults (the small widths already make them cheap), except images
above 512 pixels, halved while the patch grid stays whole.

A field whose class default is None is derived by the config itself (llama's head_dim,
gemma3's layer_types): it is left out, so the config derives it again from the shrunk sizes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

# Widths: divided by `width`. Names from the ~630 config classes of transformers 5.
_WIDTH = re.compile(
    r"(^|_)(hidden_size|hidden_sizes|d_model|n_embd|embed_dim|embedding_size|embedding_dim|hidden_dim|"
    r"intermediate_size|ffn_dim|d_ff|d_inner|n_inner|projection_dim|out_hidden_size|mlp_dim|"
    r"kv_lora_rank|q_lora_rank|conv_dim|neck_hidden_sizes|word_embed_proj_dim|codevector_dim|"
    r"classifier_proj_size|feedforward_dim|dim_feedforward|ffn_hidden_size|kv_channels|"
    r"proj_codevector_dim|output_hidden_size|channels|filters|hidden_units|out_features|num_groups|"
    r"condition_dim|d_ssm)$")
# Input channels, sample counts and the like that must keep their value although they match.
_NOT_WIDTH = re.compile(r"^(num_channels|in_channels|audio_channels|input_channels|num_input_channels|"
                        r"out_channels|output_channels|image_channels|num_mel_bins|feature_size)$")
# Per-head sizes: divided by width / heads.
_HEAD_DIM = re.compile(r"(^|_)(head_dim|d_kv|d_head|rotary_dim|head_size|attention_head_size)$")
_HEADS = re.compile(r"(^|_)(num_attention_heads|attention_heads|num_heads|n_head|n_heads|num_key_value_heads|"
                    r"key_value_heads|num_key_heads|num_value_heads|n_kv_heads|num_kv_heads)$")
_LAYERS = re.compile(r"^(num_hidden_layers|num_layers|n_layer|n_layers|encoder_layers|decoder_layers|"
                     r"num_decoder_layers|depth|num_encoder_layers|\w+_num_hidden_layers|\w+_num_layers|"
                     r"num_\w+_layers)$")
_NOT_LAYERS = re.compile(r"^(num_nextn_predict_layers|num_kv_shared_layers|num_dense_layers)$")
_EXPERTS = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$")
_ACTIVE = re.compile(r"^(num_experts_per_tok|num_experts_per_token|moe_topk|top_k|moe_k)$")
_SHARED_EXPERTS = re.compile(r"^(n_shared_experts|num_shared_experts|moe_num_shared_experts)$")
_GROUPS = re.compile(r"^(n_group|topk_group|num_expert_group)$")  # DeepSeek's grouped routing: one group
_DENSE_FIRST = re.compile(r"^(first_k_dense_replace|num_dense_layers)$")  # keep one dense, one MoE layer

_FEATURE_LAYER = re.compile(r"^vision_feature_layers?$")  # a layer index: must stay inside the shrunk tower
MAX_IMAGE = 512
LAYERS, EXPERTS, ACTIVE = 2, 4, 2


@dataclass(frozen=True)
class Factors:
    """Powers of two the widths and the head counts are divided by (1 = kept)."""

    width: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def field(config, name: str) -> Any:
    """config.name; where reading it raises (gemma4's per-layer attributes refuse the
    config-wide read: each layer's config has its own), the value stored in the config (the
    one every layer starts from), else None."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - any refusal means: not a plain field here
        stored = getattr(config, "__dict__", {})
        return stored.get(name)


def is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type") and dataclasses.is_dataclass(value)


def walk(config) -> list:
    """The config and every nested sub-config (text, vision, audio, decoder, ...)."""
    out = [config]
    for f in dataclasses.fields(config):
        value = field(config, f.name)
        if is_config(value):
            out += walk(value)
    return out


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _kind(name: str) -> str | None:
    if _NOT_WIDTH.match(name):
        return None
    for kind, pattern in (("head_dim", _HEAD_DIM), ("heads", _HEADS), ("width", _WIDTH)):
        if pattern.search(name):
            return kind
    return None


def choose_width(config, target: int = 64) -> int:
    """The one width divisor of the whole tree: brings the widest hidden size near `target`
    (one divisor for all sub-configs keeps the widths that must match across them equal)."""
    hidden = [v for c in walk(config) for n in ("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_sizes")
              for v in _ints(field(c, n))]
    return 1 << max(0, int(math.log2(max(hidden) / target))) if hidden else 1


def node_factors(config, width: int) -> Factors:
    """The head divisor of one config: a power of two that divides every head count at least
    as large (smaller ones become 1, so grouped-query ratios still divide), at most `width`,
    stopping once per-head sizes are divided by 8 or less."""
    counts = [v for f in dataclasses.fields(config) if _kind(f.name) == "heads"
              for v in _ints(field(config, f.name)) if v > 0]
    heads = 1

    def halves(h: int) -> bool:
        return h * 2 <= width and all(c % (h * 2) == 0 or c < h * 2 for c in counts)

    while halves(heads) and width // heads > 8:
        heads *= 2
    # a head the ratios would leave at a size not a multiple of 4 (qwen3-vl's vision head of 72
    # at 1/8: 9) breaks rotary embeddings, which split it in halves or quarters: fewer heads
    while halves(heads) and any(d * heads % width or d * heads // width % 4 for d in _head_dims(config, counts)):
        heads *= 2
    return Factors(width, heads)


def _head_dims(config, counts: list[int]) -> list[int]:
    """The per-head sizes of one config: its head_dim fields, else hidden / attention heads."""
    dims = [v for f in dataclasses.fields(config) if _kind(f.name) == "head_dim" and f.name in ("head_dim",)
            for v in _ints(field(config, f.name)) if v > 0]
    hidden = _ints(field(config, "hidden_size"))
    heads = _ints(field(config, "num_attention_heads")) or _ints(field(config, "num_heads"))
    if not dims and len(hidden) == 1 and len(heads) == 1 and heads[0] > 0 and hidden[0] % heads[0] == 0:
        dims = [hidden[0] // heads[0]]
    return [d for d in dims if d % 4 == 0]  # a head not a multiple of 4 already: nothing to keep


def _div(value: int, by: int) -> int:
    # 4 or less is an input's channel count (the 3 leading a stem's channel list), not a width
    return value if value <= 4 else max(1, -(-value // by))


def _scaled(value: Any, by: int) -> Any:
    if by == 1 or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _div(value, by) if value > 0 else value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return type(value)(_div(v, by) if v > 0 else v for v in value)
    return value


def shrink_value(name: str, value: Any, factors: Factors) -> Any:
    """The CPU-size value of one config field (the value itself where the name says nothing)."""
    if not _ints(value):
        return _rope(value, factors) if isinstance(value, dict) else value
    kind = _kind(name)
    if kind == "width":
        return _scaled(value, factors.width)
    if kind == "heads":
        return _scaled(value, factors.heads)
    if kind == "head_dim":
        return _scaled(value, factors.head_dim)
    if name == "depths" and isinstance(value, (list, tuple)):
        return type(value)(min(v, 1) for v in value)
    if isinstance(value, int):
        return _count(name, value)
    if _FEATURE_LAYER.match(name):
        return type(value)(_count(name, v) for v in value)
    return value


def _count(name: str, value: int) -> int:
    if _LAYERS.match(name) and not _NOT_LAYERS.match(name) and value > 0:
        return min(value, LAYERS)
    if _EXPERTS.match(name) and value > 0:
        return min(value, EXPERTS)
    if _ACTIVE.match(name) and value > 0:
        return min(value, ACTIVE)
    if (_SHARED_EXPERTS.match(name) or _GROUPS.match(name)) and value > 0:
        return 1
    if _FEATURE_LAYER.match(name) and value >= LAYERS:
        return LAYERS - 1
    if _DENSE_FIRST.match(name) and value > 0:
        return min(value, LAYERS - 1)
    return value


def _rope(params: dict, factors: Factors) -> dict:
    # mrope sections split the rotary half of the head dimension: they shrink with it.
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = _rope(value, factors)
        elif key == "mrope_section" and _ints(value) and len(_ints(value)) == len(value):
            out[key] = _split(list(value), factors.head_dim)
        elif key == "rotary_dim" and _ints(value):
            out[key] = _scaled(value, factors.head_dim)
        else:
            out[key] = value
    return out


def _split(parts: list[int], by: int, share: float = 1) -> list[int]:
    """Sections that still sum to their total x `share` / `by` (the rotary half of the shrunk head)."""
    total = max(len(parts), int(sum(parts) * share) // by)
    out = [max(1, p * total // sum(parts)) for p in parts]
    out[0] += total - sum(out)
    return out


def _image(config, kwargs: dict) -> None:
    """Images above MAX_IMAGE pixels are halved while the patch grid stays whole."""
    size = kwargs.get("image_size", getattr(config, "image_size", None))
    patch = _ints(kwargs.get("patch_size", getattr(config, "patch_size", None))) or [1]
    if not isinstance(size, int) or isinstance(size, bool):
        return
    while size > MAX_IMAGE and (size // 2) % max(patch[0], 1) == 0 and size % 2 == 0:
        size //= 2
    if size != getattr(config, "image_size", None):
        kwargs["image_size"] = size


def _per_layer(value: Any, old: int, new: int) -> Any:
    """A per-layer list (layer_types, block types...): one of each kind (at most 4), then in order."""
    if not isinstance(value, (list, tuple)) or len(value) != old or new >= old:
        return value
    new = max(new, min(len(set(map(repr, value))), 4))
    picked, seen = [], []
    for i, v in enumerate(value):
        if v not in seen:
            seen.append(v)
            picked.append(i)
    picked = sorted(picked[:new] + [i for i in range(old) if i not in picked][: max(0, new - len(picked))])
    return type(value)(value[i] for i in picked)


def shrink_kwargs(config, width: int) -> dict:
    """Constructor keywords of `type(config)` giving its CPU-size version (sub-configs excluded:
    the caller shrinks and rebuilds each one)."""
    factors = node_factors(config, width)
    out: dict[str, Any] = {}
    layers_old = layers_new = None
    for f in dataclasses.fields(config):
        if f.name.startswith("_") or not f.init:
            continue
        value = field(config, f.name)
        if is_config(value) or (f.default is None and not isinstance(value, dict)):
            continue  # sub-configs are rebuilt by the caller; None-defaults are derived
        if f.default is None:  # a derived rope dict: only its sections are rescaled
            if _rope(value, factors) != value:
                out[f.name] = _rope(value, factors)
            continue
        new = shrink_value(f.name, value, factors)
        if new is not value and new != value or _differs(f, value):
            out[f.name] = new
        if _LAYERS.match(f.name) and f.name in ("num_hidden_layers", "num_layers", "n_layer") and new != value:
            layers_old, layers_new = value, new
    if layers_old:
        # per-layer lists, shrunk or kept at their defaults (zamba2's layers_block_type)
        for f in dataclasses.fields(config):
            value = out.get(f.name, field(config, f.name))
            if (f.name != "depths" and f.init and not f.name.startswith("_") and f.default is not None
                    and isinstance(value, (list, tuple))):
                picked = _per_layer(value, layers_old, layers_new)
                if f.name in out or picked is not value:
                    out[f.name] = picked
        longest = max((len(v) for n, v in out.items() if isinstance(v, (list, tuple))
                       and len(v) > layers_new and len(v) < layers_old), default=0)
        for name in ("num_hidden_layers", "num_layers", "n_layer"):
            if name in out and longest:
                out[name] = longest  # one layer of each kind (zamba: mamba, hybrid, attention)
    _depthwise_groups(config, out, factors)
    _image(config, out)
    _mrope_default(config, out, factors)
    return out


_CONV_GROUPS = re.compile(r"(^|_)groups$|^codebook_dim$")


def _depthwise_groups(config, out: dict, factors: Factors) -> None:
    """A convolution's group count equal to one of the config's widths (mimi's upsample_groups =
    hidden_size: a depthwise convolution) shrinks with that width, so it still divides the
    channels; so does a codebook as wide as the model (wavtokenizer quantizes hidden_size-wide
    vectors without a projection; dac's 8-wide codebooks, projected, stay)."""
    widths = {v for f in dataclasses.fields(config) if _kind(f.name) == "width"
              for v in _ints(field(config, f.name)) if v > 4}
    for f in dataclasses.fields(config):
        value = field(config, f.name)
        if (_CONV_GROUPS.search(f.name) and f.name not in out and isinstance(value, int)
                and not isinstance(value, bool) and value in widths):
            out[f.name] = _scaled(value, factors.width)


def _mrope_default(config, out: dict, factors: Factors) -> None:
    """The qwen2-vl family's modeling code falls back to mrope_section [16, 24, 24] (a 128 head
    dimension) when the config has none; the released configs carry it. A config class that
    exempts mrope_section from rope validation gets that default, shrunk with the head."""
    if "mrope_section" not in (getattr(type(config), "ignore_keys_at_rope_validation", None) or ()):
        return
    rope = out.get("rope_parameters", field(config, "rope_parameters"))
    if isinstance(rope, dict) and "mrope_section" not in rope and "full_attention" not in rope:
        # a partial rotary factor (glm's 0.5) rotates that share of the head: sections shrink with it
        partial = rope.get("partial_rotary_factor") or field(config, "partial_rotary_factor") or 1
        out["rope_parameters"] = dict(rope, mrope_section=_split([16, 24, 24], factors.head_dim, partial))


def placeholders_in_vocab(config, kwargs: dict) -> None:
    """Some default configs put the image placeholder at vocab_size (llava: 32000 of 32000, the
    released checkpoints add tokens): grow the text vocabulary so the placeholder embeds."""
    text = kwargs.get("text_config")
    ids = [v for k, v in vars(config).items() if re.search(r"(image|video|audio)_token_(id|index)$", k)
           and isinstance(v, int) and not isinstance(v, bool)]
    if is_config(text) and ids and isinstance(getattr(text, "vocab_size", None), int) and max(ids) >= text.vocab_size:
        text.vocab_size = max(ids) + 1


def _differs(f: dataclasses.Field, value: Any) -> bool:
    """Keep values the parent config set that differ from the class default (llava's vision
    tower is a CLIP config with its own sizes)."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    return default is dataclasses.MISSING or value != default
