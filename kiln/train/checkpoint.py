"""Checkpoints: safetensors weights and a trainer state, each written atomically, so a run
killed at any moment leaves its last good checkpoint loadable."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from kiln.errors import KilnError, first_line
from kiln.io import publish


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors; tied weights (a GPT's embedding and head) are stored once."""
    _atomic(path, lambda tmp: save_model(model, tmp))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise KilnError(f"checkpoint {path} does not exist")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:
        raise KilnError(f"checkpoint {path} is corrupt or not a safetensors file: {first_line(exc)}") from None
    if missing or unexpected:
        names = (list(missing) + list(unexpected))[:3]
        raise KilnError(f"checkpoint {path} does not fit the model (e.g. {', '.join(names)}): a foreign checkpoint")


def save_state(state: dict, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:
        raise KilnError(f"trainer state {path} cannot be read: {first_line(exc)}") from None
