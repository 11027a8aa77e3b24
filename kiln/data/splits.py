"""Mechanism shared by every dataset: seeded stratified splits, a tensor-backed Dataset,
option checks that fail with one-line KilnErrors, and small helpers for user files."""
from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kiln.errors import KilnError, first_line

# train / val / test fractions used by every dataset unless its description says otherwise
FRACTIONS = (0.8, 0.1, 0.1)


def stratified_split(labels: np.ndarray, seed: int, fractions: Sequence[float] = FRACTIONS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays: per class, a seeded shuffle cut by `fractions`
    (val and test rounded half up, train takes the rest); each split is then shuffled.

    Same labels and seed -> the same indices (numpy's PCG64 Generator)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(len(idx) * fractions[1] + 0.5)
        n_test = int(len(idx) * fractions[2] + 0.5)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore


class ArrayDataset(Dataset):
    """Samples (x[i], y[i]) from tensors held in memory; x may be a dict of tensors.

    `.x` and `.y` give the whole split at once (for fast evaluation and for tests)."""

    def __init__(self, x: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor):
        n = len(y)
        for v in (x.values() if isinstance(x, dict) else [x]):
            if len(v) != n:
                raise ValueError(f"x has {len(v)} rows but y has {n}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if isinstance(self.x, dict):
            return {k: v[i] for k, v in self.x.items()}, self.y[i]
        return self.x[i], self.y[i]


def take(x: torch.Tensor | dict[str, torch.Tensor], idx: np.ndarray):
    """Rows `idx` of a tensor or of every tensor in a dict."""
    index = torch.from_numpy(idx)
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


# ---- option checks: each raises one line naming the option and what is accepted ----------

def choice(dataset: str, key: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise KilnError(f"{dataset}: {key}={value!r} is not accepted; use one of "
                        f"{', '.join(map(str, allowed))}")
    return value


def int_in(dataset: str, key: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise KilnError(f"{dataset}: {key}={value} is out of range; use an integer from {lo} to {hi}")
    return value


def user_path(dataset: str, path: str, accepted: str) -> str:
    """An existing file or folder the user named, or a KilnError saying what is accepted."""
    full = os.path.expanduser(str(path))
    if not os.path.exists(full):
        raise KilnError(f"{dataset}: path {path!r} does not exist; give {accepted}")
    return full


def load_npz(dataset: str, path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of a user's .npz (no pickles), or a one-line KilnError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise KilnError(f"{dataset}: {path} lacks array(s) {', '.join(missing)}; "
                                f"it has {', '.join(z.files) or 'none'}, and needs {', '.join(keys)}")
            return {k: z[k] for k in z.files}
    except KilnError:
        raise
    except Exception as exc:  # a corrupt or non-npz file: name it, one line
        raise KilnError(f"{dataset}: cannot read {path} ({first_line(exc)}); expected an .npz "
                       f"with arrays {', '.join(keys)}") from None


def int_labels(dataset: str, y: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 0..K-1, or a KilnError."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise KilnError(f"{dataset}: labels in {where} must be a 1-D array of integers >= 0 "
                        f"(got dtype {y.dtype}, shape {tuple(y.shape)})")
    return y.astype(np.int64)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def missing_package(dataset: str, package: str, pip: str, alternative: str = "") -> KilnError:
    extra = f", or {alternative}" if alternative else ""
    return KilnError(f"{dataset} needs the {package} package: pip install {pip}{extra}")
