"""hf:PATH: a local Hugging Face model directory, loaded offline (from_pretrained).

Text models are fed a real sentence through the directory's own tokenizer when it has one;
other modalities get the same tiny example inputs as hf-config.
"""
from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import KilnError, first_line
from kiln.models.hf_config import example_inputs
from kiln.models.loaded import LoadedModel

EXAMPLE_TEXT = "A gripping, beautifully shot film whose quiet final act stays with you long after the credits."


def load_hf_dir(path: str, spec: str, max_length: int = 128) -> LoadedModel:
    directory = Path(path)
    if not directory.is_dir():
        raise KilnError(f"{spec}: directory {path} does not exist (hf:PATH takes a local Hugging Face model directory)")
    if not (directory / "config.json").is_file():
        raise KilnError(f"{spec}: {path} has no config.json, so it is not a Hugging Face model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise KilnError(f"{spec}: cannot read config.json: {type(exc).__name__}: {first_line(exc)}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False   # export fails on the cache object a cached forward returns
    try:
        model = AutoModel.from_pretrained(directory, config=config, local_files_only=True).eval()
    except Exception as exc:
        raise KilnError(f"{spec}: cannot load the weights in {path}: {type(exc).__name__}: {first_line(exc)}") from None
    kwargs = _tokenized(directory, model, max_length)
    if kwargs is None:

        kwargs = example_inputs(model, config)
    n_params = sum(p.numel() for p in model.parameters())
    return LoadedModel(spec, model, (), kwargs, family="transformer", task="features",
                       description=f"{config.model_type} from {path} ({type(model).__name__}, {n_params / 1e6:.2f} M params)")


def _tokenized(directory: Path, model, max_length: int) -> dict | None:
    if getattr(model, "main_input_name", "") != "input_ids":
        return None
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception:
        return None   # a broken tokenizer is not fatal: random token ids still exercise the model
    try:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer([EXAMPLE_TEXT], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    except Exception:
        return None   # e.g. no pad/eos/unk token to pad with: random token ids instead
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in enc.items() if k in accepted}
