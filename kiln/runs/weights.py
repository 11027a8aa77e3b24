"""Model weights as safetensors, written atomically, read with a one-line error when they do not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from kiln.errors import KilnError, first_line
from kiln.io import atomic_write


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors; tied weights (a GPT's embedding and head) are stored once."""
    atomic_write(path, lambda tmp: save_model(model, tmp))


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
