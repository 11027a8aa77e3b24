"""hf-config:MODEL_TYPE[?key=value&...]: any transformers architecture, random weights.

Every model type transformers maps to a model class (`MODEL_MAPPING_NAMES`, 631 in 5.24)
builds from its config: the base model (AutoModel.from_config, seeded, eval mode, default
sdpa attention), its sizes shrunk to CPU scale by the generic rule of shrink.py, or by a
hand-written recipe (recipes.py) for the types kiln supported before it. The query string
overrides any field of the config class after that: `hf-config:llama?num_hidden_layers=4`,
dotted keys for sub-configs (`hf-config:clip?vision_config.image_size=64`).
use_cache is always off: torch.export fails on the cache object a cached forward returns.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError, first_line
from kiln.models.hf_config.constraints import check_constraints
from kiln.models.hf_config.generic import default_config, width_ladder, generic_config
from kiln.models.hf_config.inputs import (INPUTS, SEQ, SIZE_INPUTS, example_inputs, generic_inputs, grid_input,
                                          image_token_counts, patch_inputs, time_major_features,
                                          video, with_image_tokens)
from kiln.models.hf_config.query import check_sizes, squash
from kiln.models.hf_config.recipes import SUPPORTED, recipe_kwargs
from kiln.models.hf_config.shrink import field
from kiln.models.loaded import LoadedModel

__all__ = ["SEQ", "SUPPORTED", "all_types", "example_inputs", "load_hf_config", "recipe_config"]


def all_types() -> list[str]:
    """Every model type transformers maps to a base model class, plus the recipes' own."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(set(MODEL_MAPPING_NAMES) | set(SUPPORTED))


def load_hf_config(model_type: str, query: dict[str, str], spec: str, generic: bool = False) -> LoadedModel:
    """Build `model_type` at CPU size, `query` overriding any config field.

    `generic=True` ignores a hand-written recipe (the survey uses it to check which recipes
    the generic path makes unnecessary)."""
    check_sizes(query, spec)   # before transformers is imported (seconds): a bad size fails at once
    known = _mapped_types_unimported()
    if known and model_type not in SUPPORTED and model_type not in known:
        _unknown(model_type, sorted(known | set(SUPPORTED)), spec)
    cls = _config_class(model_type, spec)
    recipe = None if generic else SUPPORTED.get(model_type)
    if recipe is not None:
        config = _construct(cls, recipe_kwargs(cls, recipe, query, spec), spec)
        check_constraints(config, query, spec)
        with _quiet_transformers():
            model = _build(config, spec)
            kw = _run(model, lambda: INPUTS[recipe.inputs](model, config), spec)
        family = recipe.family
    else:
        config, model, kw = _generic(cls, query, spec)
        family = _family(model, config, kw)
    return LoadedModel(spec, model, (), kw, family=family, task="features",
                       description=_describe(model_type, model, config, family),
                       size_inputs=tuple(k for k in kw if k in SIZE_INPUTS), value_specialised=True)


def recipe_config(model_type: str, query: dict[str, str], spec: str):
    """The config object of a hand-written recipe type at its CPU size with the query applied,
    no model built (kiln.plan costs huge configs from it); None for a type without a recipe."""
    recipe = SUPPORTED.get(model_type)
    if recipe is None:
        return None
    check_sizes(query, spec)
    cls = _config_class(model_type, spec)
    config = _construct(cls, recipe_kwargs(cls, recipe, query, spec), spec)
    check_constraints(config, query, spec)
    return config


def _generic(cls, query: dict[str, str], spec: str):
    """The shrink ladder (shrink.py): the first size whose model builds and runs wins; a failure
    of every size reports the first one's error (the smallest config's)."""
    base = default_config(cls, spec)
    try:
        ladder = width_ladder(base)
    except Exception as exc:  # noqa: BLE001 - a config the name-based shrink cannot read
        raise KilnError(f"{spec}: shrinking {cls.__name__} failed: {squash(exc)}") from None
    first_error = None
    for width in ladder:
        try:
            config = generic_config(base, width, query, spec)  # a bad query key fails here, at once
        except KilnError:
            raise
        except Exception as exc:  # noqa: BLE001 - a config the name-based shrink cannot read
            raise KilnError(f"{spec}: shrinking {cls.__name__} failed: {squash(exc)}") from None
        check_constraints(config, query, spec)
        try:
            with _quiet_transformers():
                model = _build(config, spec)
                return config, model, _run_generic(model, config, spec)
        except KilnError as exc:
            first_error = first_error or exc
    raise first_error


def _run_generic(model: torch.nn.Module, config, spec: str) -> dict:
    """The generic inputs, or the first variant that runs: image placeholders as many as the
    vision tower yields, mel features time-major (B, frames, bins) instead of (B, bins, frames),
    raw audio with a channel axis (B, 1, samples), time-major features of each feature width
    the config names (conformers stack two 80-bin frames into 160 features; AST's spectrogram),
    the main input alone (the text of a vision-language model). The first error is reported.
    A vision tower fed patches and their grid gets the patch layouts of patch_inputs in turn."""
    if grid_input(model):
        candidates = patch_inputs(model, config)
        for kw in candidates:
            with contextlib.suppress(Exception):
                return _run(model, lambda: kw, spec, raw=True)
        return _run(model, lambda: candidates[0], spec)   # none runs: the first layout's error
    first = generic_inputs(model, config)
    try:
        return _run(model, lambda: first, spec, raw=True)
    except Exception as exc:
        variants = [with_image_tokens(config, first, n) for n in image_token_counts(config, exc)]
        if "pixel_values" in first and first["pixel_values"].dim() == 4:  # a video model's clip
            variants.append(dict(first, pixel_values=video(first["pixel_values"], config)))
        if "input_features" in first:
            variants.append(dict(first, input_features=first["input_features"].transpose(1, 2).contiguous()))
            variants += [dict(first, input_features=f) for f in time_major_features(config)]
        if "input_values" in first:  # codecs take (batch, channels, samples)
            variants.append(dict(first, input_values=first["input_values"].unsqueeze(1)))
            variants += [dict(first, input_values=f) for f in time_major_features(config)]
        variants.append(None)  # the main input alone, built only if needed
        for kw in variants:
            with contextlib.suppress(Exception):
                return _run(model, (lambda: kw) if kw is not None else
                            (lambda: generic_inputs(model, config, multimodal=False)), spec, raw=True)
        if isinstance(exc, KilnError):
            raise
        raise KilnError(f"{spec}: the model's forward failed on its example inputs: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None


def _run(model: torch.nn.Module, make, spec: str, raw: bool = False) -> dict:
    """The example inputs, once checked to run: a bad size must fail here, not in the user's face."""
    try:
        kw = make()
        if any(p.is_meta for p in model.parameters()):
            return kw   # no weights (kiln.models.meta): nothing can run; capture checks the inputs
        with torch.no_grad():
            model(**kw)
    except Exception as exc:
        if raw:
            raise
        raise KilnError(f"{spec}: the model's forward failed on its example inputs: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    return kw


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


@functools.lru_cache(maxsize=1)
def _mapped_types_unimported() -> frozenset[str]:
    """MODEL_MAPPING_NAMES's keys read from its source, without importing transformers (tens of
    seconds on a busy machine): an unknown type fails at once. Empty if the file cannot be read,
    and then the import decides."""
    spec = importlib.util.find_spec("transformers")
    source = Path(spec.origin).parent / "models/auto/modeling_auto.py" if spec and spec.origin else None
    try:
        text = source.read_text()
        block = text[text.index("MODEL_MAPPING_NAMES = OrderedDict("):]
        block = block[: block.index("\n    ]\n")]
    except (AttributeError, OSError, ValueError):
        return frozenset()
    return frozenset(re.findall(r'^\s*\("([\w.-]+)",', block, flags=re.M))


def _config_class(model_type: str, spec: str):
    from transformers import CONFIG_MAPPING

    known = all_types()
    if model_type not in known or model_type not in CONFIG_MAPPING:
        _unknown(model_type, known, spec)
    return CONFIG_MAPPING[model_type]


def _unknown(model_type: str, known: list[str], spec: str) -> None:
    close = difflib.get_close_matches(model_type, known, n=5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise KilnError(f"{spec}: unknown model type {model_type!r} for hf-config; {hint}"
                    f"{len(known)} types are known (`kiln models --hf` lists them)")


def _construct(cls, kwargs: dict, spec: str):
    try:
        return cls(**kwargs)
    except Exception as exc:  # strict dataclass validation, or a config's own checks
        raise KilnError(f"{spec}: transformers rejected the config: {squash(exc)}") from None


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


def _family(model: torch.nn.Module, config, kw: dict) -> str:
    """The family of a generically built model, from its config and the inputs it takes."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if "pixel_values" in kw and "input_ids" in kw:
        return "multimodal"
    if "input_values" in kw or "input_features" in kw:
        return "audio"
    if "pixel_values" in kw:
        has_heads = any(isinstance(m, torch.nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                        for m in model.modules())
        return "vision-transformer" if has_heads else "cnn"
    if any(k in vars(config) for k in ("state_size", "mamba_d_state", "ssm_state_size")):
        return "ssm"
    return "transformer"
_HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim", "hidden_sizes")
_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "depths")


def _first(config, names: tuple[str, ...]) -> Any:
    for cfg in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
        for name in names:
            value = field(cfg, name) if cfg is not None else None
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
        decoder = field(config, "decoder_layers") or field(config, "num_decoder_layers")
        parts.append(f"{layers}+{decoder} layers" if decoder else f"{layers} layers")
    parts.append(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    return ", ".join(parts)

