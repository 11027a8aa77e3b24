"""The trainer's state (optimizer, schedule, epoch, history) for --resume, written atomically,
so a run killed at any moment leaves its last good checkpoint loadable."""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import KilnError, first_line
from kiln.io import atomic_write


def save_state(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:
        raise KilnError(f"trainer state {path} cannot be read: {first_line(exc)}") from None
