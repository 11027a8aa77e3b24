"""hf-config:MODEL_TYPE[?key=value&...]: any transformers architecture, random weights.

The base model (AutoModel.from_config, seeded, eval mode, default sdpa attention) is built
with small CPU-friendly sizes: hidden 64, 2 layers, 4 heads, vocab 1000, batch 2 x 16 tokens,
32x32 or 64x64 images, half a second of 16 kHz audio. The query string overrides any field of
the config class, after those defaults: `hf-config:llama?num_hidden_layers=4&hidden_size=128`.
Values parse as int, then float, then true/false, else string; commas make a list
(`depths=1,2`); dotted keys reach sub-configs (`hf-config:clip?vision_config.image_size=64`).
use_cache is always off: torch.export fails on the cache object a cached forward returns.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kiln.errors import KilnError, first_line
from kiln.models.loaded import LoadedModel

BATCH, SEQ, DEC_SEQ, AUDIO_SAMPLES = 2, 16, 8, 8000

# Shared tiny sizes; a recipe applies only the keys its config class knows.
ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TEXT = dict(ENCODER, vocab_size=1000, max_position_embeddings=128)
DECODER = dict(TEXT, num_key_value_heads=2)  # GQA where the architecture has it
SEQ2SEQ = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
               vocab_size=1000, max_position_embeddings=128)
T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
          vocab_size=1000, relative_attention_num_buckets=8)
VIT = dict(ENCODER, image_size=32, patch_size=8)
AUDIO = dict(ENCODER, conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


@dataclass(frozen=True)
class Recipe:
    """How to make a tiny model of one type.

    `base` holds shared sizes (keys the config lacks are skipped); `extra` holds this type's
    own settings and must only name keys its config has; `inputs` names an input builder;
    `fix` derives settings that must track others after the query is applied.
    """

    family: str
    inputs: str
    base: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    fix: Callable[[dict], dict] | None = None


def _efficientnet_fix(kw: dict) -> dict:
    # The model's final BatchNorm is sized by hidden_dim but fed round_filters(1280) channels.
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    cfg = type("Cfg", (), {"depth_divisor": kw.get("depth_divisor", 8),
                           "width_coefficient": kw.get("width_coefficient", 2.0)})
    return {"hidden_dim": round_filters(cfg, 1280)}


def _marian_fix(kw: dict) -> dict:
    # Marian keeps a separate decoder vocabulary; it must follow vocab_size.
    return {"decoder_vocab_size": kw.get("vocab_size", 1000)}


def _r(family, inputs, base=None, fix=None, **extra) -> Recipe:
    return Recipe(family, inputs, dict(base or {}), extra, fix)


_TF, _VIT, _CNN, _AUD, _ED = "transformer", "vision-transformer", "cnn", "audio", "encoder-decoder"
_CLIP_TEXT = dict(TEXT, max_position_embeddings=32)

# Every type below builds, runs and exports (torch.export, strict=False) with output equal to
# eager; tests/test_hf_config.py checks it (transformers 5.23, torch 2.13, CPU). Tried and left out:
#   (longformer and led build and run, but torch.export cannot capture them: their attention
#   branches on `is_global_attn.item()`, data-dependent; kiln reports that construct.)
#   vit_mae: forward draws random masking noise each call, so no two runs (or eager vs export) agree
#   deepseek_v3: a tiny MLA/MoE config that runs was not found quickly (rotary broadcast error)
SUPPORTED: dict[str, Recipe] = {
    # text encoders
    "bert": _r(_TF, "text", TEXT),
    "roberta": _r(_TF, "text", TEXT),
    "distilbert": _r(_TF, "text", TEXT, hidden_dim=128),
    "albert": _r(_TF, "text", TEXT, embedding_size=32),
    "electra": _r(_TF, "text", TEXT, embedding_size=32),
    # disentangled attention as in the released DeBERTa-v2/v3 checkpoints (the config default is off)
    "deberta-v2": _r(_TF, "text", TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"],
                     position_biased_input=False),
    "xlm-roberta": _r(_TF, "text", TEXT),
    # mpnet's relative_position_bucket ignores the config and assumes 32 buckets: keep its default.
    "mpnet": _r(_TF, "text", TEXT),
    "convbert": _r(_TF, "text", TEXT, embedding_size=64),
    "mobilebert": _r(_TF, "text", TEXT, embedding_size=32, intra_bottleneck_size=32,
                     num_feedforward_networks=2),
    "big_bird": _r(_TF, "text", TEXT, attention_type="original_full"),  # block-sparse needs long inputs
    "modernbert": _r(_TF, "text", TEXT, local_attention=8),
    "longformer": _r(_TF, "text", TEXT, attention_window=[8, 8]),
    # decoders
    "gpt2": _r(_TF, "text", TEXT, n_inner=128),
    "gpt_neo": _r(_TF, "text", TEXT, attention_types=[[["global", "local"], 1]], window_size=8),
    "gptj": _r(_TF, "text", TEXT, n_inner=128, rotary_dim=8),
    "gpt_neox": _r(_TF, "text", TEXT),
    "gpt_bigcode": _r(_TF, "text", TEXT, n_inner=128),
    "llama": _r(_TF, "text", DECODER),
    "mistral": _r(_TF, "text", DECODER, head_dim=16),
    "qwen2": _r(_TF, "text", DECODER),
    "qwen3": _r(_TF, "text", DECODER, head_dim=16),
    "gemma": _r(_TF, "text", DECODER, head_dim=16),
    "gemma2": _r(_TF, "text", DECODER, head_dim=16, sliding_window=8),
    "gemma3_text": _r(_TF, "text", DECODER, head_dim=16, sliding_window=8),
    "phi": _r(_TF, "text", DECODER),
    "phi3": _r(_TF, "text", DECODER),
    "falcon": _r(_TF, "text", TEXT),
    "bloom": _r(_TF, "text", TEXT),
    "opt": _r(_TF, "text", TEXT, ffn_dim=128),
    "stablelm": _r(_TF, "text", DECODER),
    "olmo2": _r(_TF, "text", DECODER),
    "starcoder2": _r(_TF, "text", DECODER),
    "mixtral": _r(_TF, "text", DECODER, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen3_moe": _r(_TF, "text", dict(DECODER, **MOE)),
    "qwen2_moe": _r(_TF, "text", dict(DECODER, **MOE), shared_expert_intermediate_size=64),
    "olmoe": _r(_TF, "text", DECODER, num_experts=4, num_experts_per_tok=2),
    # gpt_oss's YaRN rope expects max_position_embeddings = factor x original (no table is built)
    "gpt_oss": _r(_TF, "text", DECODER, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                  sliding_window=8, max_position_embeddings=131072),
    "llama4_text": _r(_TF, "text", DECODER, head_dim=16, num_local_experts=4, intermediate_size_mlp=128),
    # state-space models
    "mamba": _r("ssm", "text", TEXT, state_size=8),
    "falcon_mamba": _r("ssm", "text", TEXT, state_size=8),
    "jamba": _r("ssm", "text", DECODER, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2),
    "mamba2": _r("ssm", "text", TEXT, num_heads=8, head_dim=16, n_groups=1, state_size=8, chunk_size=8),
    "rwkv": _r("ssm", "ids", TEXT, attention_hidden_size=64, context_length=64),
    # encoder-decoders
    "t5": _r(_ED, "seq2seq", T5),
    "mt5": _r(_ED, "seq2seq", T5),
    "bart": _r(_ED, "seq2seq", SEQ2SEQ),
    "mbart": _r(_ED, "seq2seq", SEQ2SEQ),
    "marian": _r(_ED, "seq2seq", SEQ2SEQ, _marian_fix),
    "pegasus": _r(_ED, "seq2seq", SEQ2SEQ),
    "blenderbot": _r(_ED, "seq2seq", SEQ2SEQ),
    "m2m_100": _r(_ED, "seq2seq", SEQ2SEQ),
    "led": _r(_ED, "seq2seq", SEQ2SEQ, attention_window=[8, 8], max_encoder_position_embeddings=128,
              max_decoder_position_embeddings=128),
    # vision
    "vit": _r(_VIT, "image", VIT),
    "deit": _r(_VIT, "image", VIT),
    "beit": _r(_VIT, "image", VIT),
    "dinov2": _r(_VIT, "image", VIT),
    "data2vec-vision": _r(_VIT, "image", VIT),
    "dinov3_vit": _r(_VIT, "image", VIT),
    "yolos": _r(_VIT, "image", VIT, image_size=[32, 32], num_detection_tokens=10),
    "hiera": _r(_VIT, "image", image_size=[64, 64], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                query_stride=[2, 2], masked_unit_size=[8, 8], num_query_pool=1),
    "pvt_v2": _r(_VIT, "image", image_size=64, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                 num_attention_heads=[1, 2, 4, 4]),
    "swin": _r(_VIT, "image", image_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "swinv2": _r(_VIT, "image", image_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "convnext": _r(_CNN, "image", image_size=64, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    "convnextv2": _r(_CNN, "image", image_size=64, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    "resnet": _r(_CNN, "image", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    "focalnet": _r(_CNN, "image", image_size=32, embed_dim=16, depths=[1, 1], hidden_sizes=[16, 32]),
    "regnet": _r(_CNN, "image", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
    "mobilenet_v1": _r(_CNN, "image", image_size=64, depth_multiplier=0.25),
    "mobilenet_v2": _r(_CNN, "image", image_size=64, depth_multiplier=0.25),
    "efficientnet": _r(_CNN, "image", None, _efficientnet_fix, image_size=64, width_coefficient=0.25,
                       depth_coefficient=0.5),
    "segformer": _r(_VIT, "image", depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64],
                    num_attention_heads=[1, 2, 4, 4]),
    "mobilevit": _r(_CNN, "image", image_size=64, hidden_sizes=[32, 48, 64],
                    neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64]),
    "levit": _r(_VIT, "image", image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                depths=[1, 1, 1], key_dim=[8, 8, 8]),
    # audio
    "wav2vec2": _r(_AUD, "audio", AUDIO),
    "hubert": _r(_AUD, "audio", AUDIO),
    "wavlm": _r(_AUD, "audio", AUDIO, num_buckets=32),
    "data2vec-audio": _r(_AUD, "audio", AUDIO),
    "sew": _r(_AUD, "audio", AUDIO, conv_dim=(32,) * 13),  # sew's feature encoder has 13 convs
    "unispeech": _r(_AUD, "audio", AUDIO),
    "whisper": _r(_AUD, "whisper", SEQ2SEQ, max_source_positions=32, max_target_positions=64),
    # multimodal
    "clip": _r("multimodal", "text+image", projection_dim=32, text_config=_CLIP_TEXT, vision_config=VIT),
    "siglip": _r("multimodal", "text+image", text_config=_CLIP_TEXT, vision_config=VIT),
    "clip_vision_model": _r(_VIT, "image", VIT),
}


def load_hf_config(model_type: str, query: dict[str, str], spec: str) -> LoadedModel:
    """Build `model_type` from its config with tiny defaults, `query` overriding them."""
    recipe = SUPPORTED.get(model_type)
    if recipe is None:
        raise KilnError(f"{spec}: unknown model type {model_type!r} for hf-config; supported: {_names()}")
    _check_sizes(query, spec)   # before transformers is imported (seconds): a bad size fails at once
    cls = _config_class(model_type, spec)
    kwargs = _config_kwargs(cls, recipe, query, spec)
    try:
        config = cls(**kwargs)
    except Exception as exc:  # strict dataclass validation, or a config's own checks
        raise KilnError(f"{spec}: transformers rejected the config: {_squash(exc)}") from None
    with _quiet_transformers():
        model = _build(config, spec)
        kw = _run_example(model, config, recipe.inputs, spec)
    return LoadedModel(spec, model, (), kw, family=recipe.family, task="features",
                       description=_describe(model_type, model, config, recipe.family))


@contextlib.contextmanager
def _quiet_transformers():
    # On CPU transformers warns that CUDA-only kernels (mamba_ssm, causal_conv1d) are missing.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _run_example(model: torch.nn.Module, config, inputs: str, spec: str) -> dict:
    """The example inputs, once checked to run: a bad size must fail here, not in the user's face."""
    try:
        kw = _INPUTS[inputs](model, config)
        if any(p.is_meta for p in model.parameters()):
            return kw   # no weights (kiln.models.meta): nothing can run; capture checks the inputs
        with torch.no_grad():
            model(**kw)
    except Exception as exc:
        raise KilnError(f"{spec}: the model's forward failed on its example inputs: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    return kw


def _names(limit: int = 200) -> str:
    text = ", ".join(sorted(SUPPORTED))
    if len(text) > limit:
        text = text[:limit].rsplit(", ", 1)[0] + f", ... ({len(SUPPORTED)} in all)"
    return text


def _squash(exc: BaseException, limit: int = 240) -> str:
    # Config validation errors put the useful part on their second line: keep the lines joined.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_class(model_type: str, spec: str):
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:  # a transformers release without this architecture
        raise KilnError(f"{spec}: this transformers version has no model type {model_type!r}") from None


def _known(cls) -> dict[str, Any]:
    """Settable config keys of `cls` -> their default (dataclasses.MISSING where none)."""
    if dataclasses.is_dataclass(cls):
        keys = {f.name: f.default for f in dataclasses.fields(cls)}
    else:
        params = inspect.signature(cls.__init__).parameters.values()
        keys = {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}
    aliases = getattr(cls, "attribute_map", {}) or {}
    return keys | {alias: keys.get(target, dataclasses.MISSING) for alias, target in aliases.items()}


def _canonical(cls, key: str) -> str:
    # Aliases (gpt2's hidden_size -> n_embd) must not fight the real name in kwargs.
    return (getattr(cls, "attribute_map", {}) or {}).get(key, key)


def _defaults(cls, recipe_base: dict, extra: dict) -> dict:
    known = _known(cls)
    out = {_canonical(cls, k): v for k, v in recipe_base.items() if k in known}
    out |= {_canonical(cls, k): copy.deepcopy(v) for k, v in extra.items()}
    return out


def _config_kwargs(cls, recipe: Recipe, query: dict[str, str], spec: str) -> dict:
    subs = getattr(cls, "sub_configs", {}) or {}
    kwargs = _defaults(cls, recipe.base, {k: v for k, v in recipe.extra.items() if k not in subs})
    kwargs |= {k: _defaults(subs[k], v, {}) for k, v in recipe.extra.items() if k in subs}
    chosen = set()
    for key, text in query.items():
        prefix, dot, name = key.rpartition(".")
        target = subs.get(prefix) if dot else cls
        if target is None:
            raise KilnError(f"{spec}: {cls.__name__} has no sub-config {prefix!r} (key {key!r}); "
                            f"sub-configs: {', '.join(subs) or 'none'}")
        known = _known(target)
        if name not in known:
            raise KilnError(f"{spec}: {target.__name__} has no attribute {name!r}; {_suggest(name, known)}")
        dest = kwargs.setdefault(prefix, {}) if dot else kwargs
        dest[_canonical(target, name)] = _parse(key, text, known[name], spec)
        chosen.add(prefix + dot + _canonical(target, name))
    if recipe.fix:
        kwargs |= {k: v for k, v in recipe.fix(kwargs).items() if k not in chosen}
    if "use_cache" in _known(cls):
        kwargs["use_cache"] = False  # even over the query: export fails on a returned DynamicCache
    _fit_token_ids(cls, kwargs, chosen)
    for name, sub in subs.items():
        if isinstance(kwargs.get(name), dict):
            mine = {c.partition(".")[2] for c in chosen if c.startswith(name + ".")}
            _fit_token_ids(sub, kwargs[name], mine)
    return kwargs


def _fit_token_ids(cls, kwargs: dict, chosen: set) -> None:
    """Move special token ids that fall outside the tiny vocabulary back inside it.

    Out-of-range ids break embeddings whose padding_idx is the pad id (modernbert, whisper)
    and make transformers warn; `id % vocab` keeps equal ids equal and distinct ones distinct.
    """
    vocab = kwargs.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        return
    for key, default in _known(cls).items():
        if key.endswith("token_id") and key not in chosen and key == _canonical(cls, key):
            value = kwargs.get(key, default)
            if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                kwargs[key] = value % vocab


def _suggest(name: str, known: dict) -> str:
    import difflib

    from transformers import PreTrainedConfig

    common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    close = difflib.get_close_matches(name, list(known), n=3)
    own = [k for k in known if k not in common and not k.startswith("_") and k not in close][:8]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}valid keys include {', '.join(own)}, ..."


# Config fields that are sizes or counts (layers, heads, widths): torch fails deep inside the
# build, or builds an empty model, when one is 0 or negative. Token ids, dropout, epsilons and
# window lengths (where -1 or 0 can mean "off") do not match.
_SIZE = re.compile(r"(^num_|^n_|_size$|_layers$|_heads$|_dim$|_dims$|_channels$|^d_model$|^d_ff$|^d_kv$"
                   r"|_ffn_dim$|^depths$|^max_position_embeddings$)")


def _check_sizes(query: dict[str, str], spec: str) -> None:
    for key, text in query.items():
        values = [_scalar(part.strip()) for part in text.split(",")]
        if _SIZE.search(key.rpartition(".")[2]) and any(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 for v in values):
            raise KilnError(f"{spec}: {key}={text}: a size or count, it must be a positive integer")


def _parse(key: str, text: str, default: Any, spec: str) -> Any:
    """int, then float, then true/false, else the string; commas make a list (depths=1,2)."""
    if not text.strip():
        raise KilnError(f"{spec}: empty value for {key}; expected a number, true/false or a string")
    if "," in text:
        return [_scalar(part.strip()) for part in text.split(",")]
    value = _scalar(text)
    if isinstance(default, (bool, int, float)) and isinstance(value, str):
        raise KilnError(f"{spec}: cannot parse {key}={text!r}: expected {type(default).__name__}")
    if isinstance(default, float) and type(value) is int:
        value = float(value)  # the config's strict validation refuses an int for a float field
    if isinstance(default, (list, tuple)):
        value = [value]  # depths=1 means a one-stage list
    return value


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _build(config, spec: str) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        with torch.random.fork_rng(devices=[]):  # deterministic weights, caller's RNG untouched
            torch.manual_seed(0)
            # from_config writes attn_implementation into the config it gets: give it a copy.
            model = AutoModel.from_config(copy.deepcopy(config))
    except Exception as exc:
        raise KilnError(f"{spec}: building {config.model_type} failed: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    return model.eval()


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _ids(vocab: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, length), generator=gen)


def _text(model, config, gen=None, mask=True) -> dict:
    gen = gen or torch.Generator().manual_seed(0)
    kw = {"input_ids": _ids(config.vocab_size, SEQ, gen)}
    if mask and _accepts(model, "attention_mask"):
        kw["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
    return kw


def _seq2seq(model, config) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "decoder_vocab_size", None) or config.vocab_size
    return _text(model, config, gen) | {"decoder_input_ids": _ids(vocab, DEC_SEQ, gen)}


def _image(model, config, gen=None) -> dict:
    gen = gen or torch.Generator().manual_seed(0)
    size = getattr(config, "image_size", None) or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (BATCH, getattr(config, "num_channels", 3), h, w)
    return {"pixel_values": torch.randn(shape, generator=gen)}


def _text_image(model, config) -> dict:
    gen = torch.Generator().manual_seed(0)
    return _text(model, config.text_config, gen) | _image(model, config.vision_config, gen)


def _audio(model, config) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=gen)}


def _whisper(model, config) -> dict:
    # Whisper's encoder convs halve the frames and insist on exactly max_source_positions.
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions, generator=gen)
    return {"input_features": feats, "decoder_input_ids": _ids(config.vocab_size, DEC_SEQ, gen)}


_INPUTS: dict[str, Callable[[torch.nn.Module, Any], dict]] = {
    "text": _text, "seq2seq": _seq2seq, "image": _image, "text+image": _text_image,
    "audio": _audio, "whisper": _whisper,
    "ids": lambda model, config: _text(model, config, mask=False),  # rwkv warns that it ignores a mask
}

_HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim", "hidden_sizes")
_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "depths")


def _first(config, names: tuple[str, ...]) -> Any:
    for cfg in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return value
    return None


def _describe(model_type: str, model: torch.nn.Module, config, family: str) -> str:
    hidden = _first(config, ("hidden_sizes",) if family == "cnn" else _HIDDEN)
    # CNN configs' num_hidden_layers is often a constant unrelated to the built depth.
    layers = _first(config, ("depths",) if family == "cnn" else _LAYERS)
    parts = [f"{model_type} ({type(model).__name__}, random weights)"]
    if hidden is not None:
        parts.append(f"hidden {hidden[-1] if isinstance(hidden, (list, tuple)) else hidden}")
    if layers is not None:
        layers = sum(layers) if isinstance(layers, (list, tuple)) else layers
        decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
        parts.append(f"{layers}+{decoder} layers" if decoder else f"{layers} layers")
    parts.append(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    return ", ".join(parts)


def example_inputs(model: torch.nn.Module, config) -> dict:
    """Tiny example inputs for a transformers model of any supported type (used by hf:PATH)."""
    recipe = SUPPORTED.get(config.model_type)
    if recipe is not None:
        return _INPUTS[recipe.inputs](model, config)
    by_main_input = {"input_ids": _text, "pixel_values": _image, "input_values": _audio}
    builder = by_main_input.get(getattr(model, "main_input_name", ""))
    if builder is None:
        raise KilnError(f"cannot make example inputs for model type {config.model_type!r}: "
                        f"its main input {getattr(model, 'main_input_name', '?')!r} is not one of {', '.join(by_main_input)}")
    return builder(model, config)
