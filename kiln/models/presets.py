"""preset:NAME[?key=value&...]: published model configurations at their full size.

Each preset is a transformers config with the figures of a published model, each with its
source, and the input the model was made for (one sequence of its context, or one image).
Presets are far larger than this machine's memory (GPT-3 175B's fp32 weights are 700 GB), so
`kiln analyze` builds them without weights, on PyTorch's meta device (kiln.models.meta);
`kiln.load` on a preset whose weights do not fit says so instead of running out of memory.
The query overrides any config field, e.g. `preset:llama3-70b?num_hidden_layers=2`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.errors import KilnError, first_line
from kiln.models.loaded import LoadedModel, available_bytes


@dataclass(frozen=True)
class Preset:
    """A published configuration: transformers `model_type`, the head the model is built
    with (`causal-lm` or `base`), the config fields that differ from the class defaults, the
    input (`text` of `length` tokens, or `image`), the published parameter count, and sources."""

    model_type: str
    head: str
    fields: dict[str, Any]
    inputs: str
    length: int
    params: float
    source: str
    note: str = ""
    family: str = "transformer"
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset(
        "llama", "causal-lm",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
             rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
        "text", 4096, 8.03e9,
        "meta-llama/Meta-Llama-3-8B config.json (Hugging Face hub, April 2024); 8.03 B parameters"),
    "llama3-70b": Preset(
        "llama", "causal-lm",
        dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
             rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
        "text", 4096, 70.6e9,
        "meta-llama/Meta-Llama-3-70B config.json (Hugging Face hub, April 2024); 70.6 B parameters"),
    "gpt3-175b": Preset(
        "gpt2", "causal-lm",
        dict(n_embd=12288, n_layer=96, n_head=96, n_inner=4 * 12288, n_positions=2048, vocab_size=50257),
        "text", 2048, 175.0e9,
        "Brown et al. 2020, 'Language Models are Few-Shot Learners', Table 2.1: 96 layers, d_model 12288, "
        "96 heads of 128, context 2048, 175.0 B parameters; GPT-2's 50257-token BPE (section 2.1)",
        note="GPT-2's architecture with dense attention: the paper alternates dense and locally banded "
             "sparse attention layers, which transformers has no config for"),
    "bert-large": Preset(
        "bert", "base",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             vocab_size=30522, max_position_embeddings=512),
        "text", 512, 340e6,
        "Devlin et al. 2019, 'BERT', section 3: BERT-LARGE L=24, H=1024, A=16, 340 M parameters; "
        "google-bert/bert-large-uncased config.json (vocabulary 30522, feed-forward 4096)"),
    "vit-h14": Preset(
        "vit", "base",
        dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
             image_size=224, patch_size=14),
        "image", 224, 632e6,
        "Dosovitskiy et al. 2021, 'An Image is Worth 16x16 Words', Table 1: ViT-Huge 32 layers, hidden 1280, "
        "MLP 5120, 16 heads, 632 M parameters; /14 patches at 224x224 (google/vit-huge-patch14-224-in21k)",
        family="vision-transformer"),
}


def names() -> str:
    return ", ".join(sorted(PRESETS))


def get(name: str, spec: str = "") -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        raise KilnError(f"{spec or 'preset:' + name}: unknown preset {name!r}; known: {names()}")
    return preset


def check_preset(name: str, query: dict[str, str], spec: str) -> None:
    """Refuse an unknown preset or a bad field at once (before any model is built)."""
    _config(get(name, spec), query, spec)


def load_preset(name: str, query: dict[str, str], spec: str) -> LoadedModel:
    """Build the preset (weights on the current default device: meta under kiln.models.meta)."""
    preset = get(name, spec)
    config = _config(preset, query, spec)
    if torch.get_default_device().type != "meta":
        _refuse_if_too_big(preset, config, spec)
    model = _build(preset, config, spec)
    kwargs = example_inputs(preset, config)
    params = sum(p.numel() for p in model.parameters())
    desc = (f"{name}: {preset.model_type} ({type(model).__name__}), {params / 1e9:.2f} B params "
            f"(published {preset.params / 1e9:.3g} B); {preset.source}" + (f"; {preset.note}" if preset.note else ""))
    return LoadedModel(spec, model, (), kwargs, family=preset.family, task="features", description=desc)


def _config(preset: Preset, query: dict[str, str], spec: str):
    from transformers import CONFIG_MAPPING

    fields = dict(preset.fields)
    defaults = CONFIG_MAPPING[preset.model_type]()
    for key, text in query.items():
        if not hasattr(defaults, key):
            raise KilnError(f"{spec}: {type(defaults).__name__} has no field {key!r}")
        fields[key] = _value(key, text, getattr(defaults, key), spec)
    if hasattr(defaults, "use_cache"):
        fields["use_cache"] = False   # torch.export fails on the cache object a cached forward returns
    try:
        return CONFIG_MAPPING[preset.model_type](**fields)
    except Exception as exc:   # the config's own validation
        raise KilnError(f"{spec}: transformers rejected the config: {first_line(exc)}") from None


def _value(key: str, text: str, default: Any, spec: str) -> Any:
    kind = type(default) if isinstance(default, (bool, int, float)) else str
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise KilnError(f"{spec}: {key}={text!r}: expected true or false")
        return text.lower() == "true"
    try:
        value = kind(text)
    except ValueError:
        raise KilnError(f"{spec}: {key}={text!r}: expected {kind.__name__}") from None
    if kind is int and value < 1 and (key.startswith(("num_", "n_")) or key.endswith(("_size", "_layers"))):
        raise KilnError(f"{spec}: {key}={text}: a size or count, it must be a positive integer")
    return value


def _build(preset: Preset, config, spec: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if preset.head == "causal-lm" else AutoModel
    try:
        with torch.random.fork_rng(devices=[]):   # deterministic weights, caller's RNG untouched
            torch.manual_seed(0)
            return auto.from_config(config).eval()
    except Exception as exc:
        raise KilnError(f"{spec}: building {preset.model_type} failed: {type(exc).__name__}: {first_line(exc)}") from None


def _refuse_if_too_big(preset: Preset, config, spec: str) -> None:
    # a 70B model's weights would be allocated (and the machine swap or kill the process) first
    with torch.device("meta"):
        model = _build(preset, config, spec)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    if 2 * need > available_bytes():
        raise KilnError(f"{spec}: its weights need {need / 1e9:.1f} GB and this machine has "
                        f"{available_bytes() / 1e9:.1f} GB available: analyse it without weights "
                        f"(`kiln analyze {spec}` does so by itself; in Python, kiln.models.meta.load_meta)")


def example_inputs(preset: Preset, config) -> dict:
    """One sequence of the preset's length (token ids), or one image; zeros, as values do not
    change the cost, and meta tensors where the default device is meta."""
    if preset.inputs == "image":
        size = config.image_size
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size)}
    return {"input_ids": torch.zeros(1, preset.length, dtype=torch.long),
            "attention_mask": torch.ones(1, preset.length, dtype=torch.long)}
