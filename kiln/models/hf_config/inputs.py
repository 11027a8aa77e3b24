"""Example inputs: the recipes' named builders, and the generic one read off the forward signature.

The generic builder gives what the model's forward names (token ids, pixel values, raw audio,
mel features, decoder ids) sized from the config tree: ids drawn away from every special token
id (an image placeholder in random text would ask for image features), images at the vision
config's size and channels, mel features as long as the encoder's positions allow. A
vision-language model gets as many image placeholders as its vision tower yields features.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch

from kiln.errors import KilnError
from kiln.models.hf_config.recipes import SUPPORTED
from kiln.models.hf_config.shrink import field, walk

BATCH, SEQ, DEC_SEQ, AUDIO_SAMPLES = 2, 16, 8, 8000


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


INPUTS: dict[str, Callable[[torch.nn.Module, Any], dict]] = {
    "text": _text, "seq2seq": _seq2seq, "image": _image, "text+image": _text_image,
    "audio": _audio, "whisper": _whisper,
    "ids": lambda model, config: _text(model, config, mask=False),  # rwkv warns that it ignores a mask
}


def example_inputs(model: torch.nn.Module, config) -> dict:
    """Tiny example inputs for a transformers model of any type (used by hf:PATH)."""
    recipe = SUPPORTED.get(config.model_type)
    if recipe is not None:
        return INPUTS[recipe.inputs](model, config)
    return generic_inputs(model, config)


# built only for a forward that needs them: a vision-language model's optional video input
# would ask for video placeholders in the text
_ONLY_REQUIRED = ("pixel_values_videos", "input_features_mask")
_WITH_MAIN = ("past_values_padding", "freq", "past_time_features", "past_observed_mask", "future_values",
              "future_time_features", "input_features_mask")   # go with the main input, never alone


def generic_inputs(model: torch.nn.Module, config, multimodal: bool = True) -> dict:
    """Inputs named by the forward signature; `multimodal=False` keeps only the main input's kind."""
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    wanted = {name for name in _BUILDERS if name in params and (multimodal or name == main or name in _WITH_MAIN)
              and (name not in _ONLY_REQUIRED or name == main or params[name].default is params[name].empty)}
    kw: dict[str, Any] = {}
    for name in _BUILDERS:
        if name in wanted:
            value = _BUILDERS[name](config, gen)
            if value is not None:
                kw[name] = value
    if "input_ids" in kw and "attention_mask" in params:
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = _safe_ids(config, _vocab(config), DEC_SEQ, gen)
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in kw
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing or not kw:
        raise KilnError(f"no example input for {type(model).__name__}'s forward argument "
                        f"{(missing or [main])[0]!r} (kiln builds {', '.join(_BUILDERS)}, decoder_input_ids)")
    return kw


def _sub(config, *names: str):
    for c in walk(config):
        for name in names:
            value = field(c, name)
            if value is not None and not isinstance(value, bool):
                return c, value
    return None, None


def _vocab(config) -> int | None:
    return _sub(config, "vocab_size")[1]


def _special_ids(config) -> set[int]:
    out = set()
    for c in walk(config):
        for name, value in vars(c).items():
            if re.search(r"(token_id|token_index|_id)$", name) and isinstance(value, int) and not isinstance(value, bool):
                out.add(value)
    return out


def _safe_ids(config, vocab: int | None, length: int, gen: torch.Generator) -> torch.Tensor | None:
    """Token ids away from every special id (pad, bos, image/audio placeholders)."""
    if not vocab:
        return None
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special][:1000] or [0])
    return allowed[torch.randint(0, len(allowed), (BATCH, length), generator=gen)]


def _pixels(config, gen: torch.Generator) -> torch.Tensor:
    holder, size = _sub(config, "image_size")
    if isinstance(size, dict):
        size = (size.get("height", 224), size.get("width", 224))
    h, w = (size, size) if isinstance(size, int) else tuple(size or (224, 224))[:2]
    channels = field(holder, "num_channels") or _sub(config, "num_channels")[1] or 3
    return torch.randn(BATCH, channels, h, w, generator=gen)


def frames(config) -> int:
    """A video model's clip length: the frames its config names (num_frames, frames_per_clip), else 8."""
    count = _first_int(_sub(config, "num_frames", "frames_per_clip", "num_frames_per_clip")[1])
    return count if count and count > 0 else 8


def video(pixels: torch.Tensor, config) -> torch.Tensor:
    """(batch, frames, channels, height, width): the image repeated into a clip, each frame its own noise."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn((pixels.shape[0], frames(config), *pixels.shape[1:]), generator=gen)


def _mel_frames(config) -> int:
    positions = _sub(config, "max_source_positions")[1]
    return 2 * positions if positions else 64  # whisper's convs halve the frames to its positions


def _mel(config, gen: torch.Generator) -> torch.Tensor:
    bins = _sub(config, "num_mel_bins", "feature_size", "input_feat_per_channel")[1] or 80
    return torch.randn(BATCH, bins, _mel_frames(config), generator=gen)


def _series_length(config) -> int:
    """A time-series model's context: its context_length, or 4 patches where that is long (timesfm's
    16384); a model that feeds lagged copies of the series (time_series_transformer, informer,
    autoformer) reads the largest lag further back."""
    context = _sub(config, "context_length")[1]
    patch = _sub(config, "patch_length")[1] or 8
    length = context if isinstance(context, int) and 0 < context <= 1024 else 4 * patch
    return length + max(_lags(config) or [0])


def _lags(config) -> list[int]:
    lags = _sub(config, "lags_sequence")[1]
    return [v for v in lags if isinstance(v, int)] if isinstance(lags, (list, tuple)) else []


def _horizon(config) -> int | None:
    """The forecast length of a lagged-series model (its decoder runs over it), else None."""
    horizon = _sub(config, "prediction_length")[1]
    return horizon if _lags(config) and isinstance(horizon, int) and horizon > 0 else None


def _time_features(config, length: int | None) -> torch.Tensor | None:
    """(batch, length, num_time_features): the calendar features of a lagged-series model."""
    count = _sub(config, "num_time_features")[1] or 0
    return None if length is None or not _lags(config) else torch.randn(BATCH, length, count,
                                                                         generator=torch.Generator().manual_seed(1))


def _series(config, gen: torch.Generator) -> torch.Tensor:
    """past_values: (batch, context, channels) for a multichannel model, else (batch, context)."""
    channels = _sub(config, "num_input_channels")[1]
    shape = (BATCH, _series_length(config)) + ((channels,) if isinstance(channels, int) else ())
    return torch.randn(shape, generator=gen)


_BUILDERS: dict[str, Callable[[Any, torch.Generator], Any]] = {
    "input_ids": lambda config, gen: _safe_ids(config, _vocab(config), SEQ, gen),
    "pixel_values": _pixels,
    "pixel_values_videos": lambda config, gen: video(_pixels(config, gen), config),
    "input_values": lambda config, gen: torch.randn(BATCH, AUDIO_SAMPLES, generator=gen),
    "input_features": _mel,
    "input_features_mask": lambda config, gen: torch.ones(BATCH, _mel_frames(config), dtype=torch.long),
    "past_values": _series,
    # timesfm: no padding in the context, and the frequency class 0 (high frequency)
    "past_values_padding": lambda config, gen: torch.zeros(BATCH, _series_length(config), dtype=torch.long),
    "freq": lambda config, gen: torch.zeros(BATCH, 1, dtype=torch.long),
    # lagged-series models: every value observed, and the forecast window's values and features
    "past_time_features": lambda config, gen: _time_features(config, _series_length(config)),
    "past_observed_mask": lambda config, gen: torch.ones(BATCH, _series_length(config)) if _lags(config) else None,
    "future_values": lambda config, gen: (torch.randn(BATCH, _horizon(config), generator=gen)
                                          if _horizon(config) else None),
    "future_time_features": lambda config, gen: _time_features(config, _horizon(config)),
}


def image_token_counts(config, error: Exception) -> list[int]:
    """Image placeholders per sample to try, read off the model's mismatch error ('Image features
    and image tokens do not match, tokens: 0, features: 73728'): the count is of features or of
    feature elements (x hidden size), over the batch."""
    found = re.search(r"features:?\s*(\d+)", str(error))
    if not found or _image_token(config) is None:
        return []
    total = int(found.group(1))
    hidden = _sub(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size")[1] or 1
    return [n for n in dict.fromkeys((total // BATCH, total // (BATCH * hidden))) if n > 0]


def _image_token(config):
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def with_image_tokens(config, kw: dict, n: int) -> dict:
    """`n` image placeholders in front of each sample's text."""
    ids = torch.cat([torch.full((BATCH, n), _image_token(config), dtype=kw["input_ids"].dtype), kw["input_ids"]], 1)
    out = dict(kw, input_ids=ids)
    if "attention_mask" in kw:
        out["attention_mask"] = torch.ones_like(ids)
    return out


# A vision tower fed a sequence of patches and the (t, h, w) grid of each image (qwen2-vl's and
# its descendants'): the grid's values are sizes, so the graph is specialised to them.
GRIDS = ("grid_thw", "image_grid_thw")
SIZE_INPUTS = GRIDS + ("merge_sizes",)
IMAGES = 2   # images in the patch sequence


def grid_input(model: torch.nn.Module) -> str | None:
    """The grid argument a vision tower's forward requires, if any."""
    params = inspect.signature(model.forward).parameters
    return next((g for g in GRIDS if g in params and params[g].default is params[g].empty), None)


def patch_inputs(model: torch.nn.Module, config) -> list[dict]:
    """Candidate inputs of a vision tower that takes patches and their grid, in the layouts
    the towers use: flattened (patches, channels x temporal x patch x patch), without the
    temporal factor, or unflattened (patches, channels, [temporal,] patch, patch). Each image's
    grid is 1 x 2m x 2m patches for a spatial merge of m (the merge must tile it)."""
    params = inspect.signature(model.forward).parameters
    grid = grid_input(model)
    main = next(p for p in params if p not in SIZE_INPUTS and params[p].kind in
                (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    patch = _first_int(_sub(config, "patch_size")[1]) or 14
    channels = _sub(config, "in_channels", "num_channels", "image_channels")[1] or 3
    temporal = _first_int(_sub(config, "temporal_patch_size", "patch_temporal")[1]) or 1
    merge = _first_int(_sub(config, "spatial_merge_size", "merge_size", "merge_kernel_size")[1]) or 1
    thw = torch.tensor([[1, 2 * merge, 2 * merge]] * IMAGES)
    n = int(thw.prod(-1).sum())
    shapes = dict.fromkeys([(n, channels * temporal * patch * patch), (n, channels * patch * patch),
                            (n, channels, patch, patch), (n, channels, temporal, patch, patch)])
    out = []
    for shape in shapes:
        kw = {main: torch.randn(shape, generator=torch.Generator().manual_seed(0)), grid: thw}
        if "merge_sizes" in params:
            kw["merge_sizes"] = torch.full((IMAGES,), merge)
        out.append(kw)
    return out


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


FRAMES = 64


def time_major_features(config) -> list[torch.Tensor]:
    """(batch, frames, features) for each feature width the config names: a conformer's
    projection input (two stacked 80-bin frames: 160), the feature size, the mel bins; frames
    as the spectrogram's max_length where the model fixes it (AST), else 64."""
    widths = [_sub(config, name)[1] for name in ("feature_projection_input_dim", "feature_size", "num_mel_bins")]
    frames = _sub(config, "max_length")[1]
    frames = frames if isinstance(frames, int) and 0 < frames <= 4096 else FRAMES
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, frames, w, generator=gen)
            for w in dict.fromkeys(w for w in widths if isinstance(w, int) and not isinstance(w, bool) and w > 0)]
