"""MNIST-1D (Greydanus & Steinbach): 1-D signals of the ten digits, generated offline by the
mnist1d package's own generator with its canonical arguments (its download path needs a network)."""
from __future__ import annotations

import functools
import pickle
import random

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.splits import (
    ArrayDataset, int_in, int_labels, load_npz, missing_package, package_version,
    stratified_split, user_path,
)
from kiln.errors import KilnError, first_line

KEYS = ("x", "y", "x_test", "y_test")
PATH_FORMATS = "mnist1d's mnist1d_data.pkl (a trusted file: it is a pickle) or an .npz with x, y, x_test, y_test"


@functools.lru_cache(maxsize=2)
def generate(samples: int) -> dict[str, np.ndarray]:
    """mnist1d.data.make_dataset with the package's default arguments (seed 42, 40-long signals,
    80% train), except num_samples; the caller's global RNG state is put back afterwards."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise missing_package("mnist1d", "mnist1d", "mnist1d", "give path=") from None
    args = get_dataset_args()
    args.num_samples = samples
    state_py, state_np = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)   # seeds numpy's and Python's global RNGs itself
    finally:
        random.setstate(state_py)
        np.random.set_state(state_np)
    return {k: data[k] for k in KEYS}


def read_user_file(path: str) -> dict[str, np.ndarray]:
    full = user_path("mnist1d", path, PATH_FORMATS)
    if full.endswith(".npz"):
        return load_npz("mnist1d", full, KEYS)
    try:
        with open(full, "rb") as fh:
            data = pickle.load(fh)
    except Exception as exc:
        raise KilnError(f"mnist1d: cannot read {path}; give {PATH_FORMATS} ({first_line(exc)})") from None
    if not isinstance(data, dict) or any(k not in data for k in KEYS):
        raise KilnError(f"mnist1d: {path} is not an mnist1d dataset; it needs keys {', '.join(KEYS)}")
    return data


@register("mnist1d", "classification",
          "MNIST-1D, generated offline by the mnist1d package (make_dataset, its default seed 42 "
          "and arguments): 10 classes of 40-long signals. Its own split is kept: the last 20% "
          "(1,000 of 5,000) is test; a stratified seeded 1/8 of its train part is val "
          "(3,500/500/1,000; same seed, same split). x: 1x40 float32 as generated (standardised "
          "over the dataset). path: mnist1d_data.pkl or an .npz with x, y, x_test, y_test.",
          "mnist1d make_dataset() (generated, seed 42)", samples=5000, path=None)
def mnist1d(seed: int = 0, path: str | None = None, samples: int = 5000) -> DataSplits:
    int_in("mnist1d", "samples", samples, 100, 100_000)
    if path is not None:
        data, source = read_user_file(path), f"{path}: a saved MNIST-1D dataset"
    else:
        data = generate(samples)
        source = (f"mnist1d {package_version('mnist1d')} make_dataset(): {samples:,} generated "
                  f"MNIST-1D signals (seed 42)")
    x_tr, x_te = (np.asarray(data[k], dtype=np.float32) for k in ("x", "x_test"))
    y_tr, y_te = (int_labels("mnist1d", data[k], str(path or "mnist1d")) for k in ("y", "y_test"))
    if x_tr.ndim != 2 or x_te.ndim != 2 or x_tr.shape[1] != x_te.shape[1] \
            or len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise KilnError(f"mnist1d: {path} has x {x_tr.shape}, x_test {x_te.shape}, y {y_tr.shape}, "
                        f"y_test {y_te.shape}; expected (N,L), (M,L), (N,), (M,)")
    train_idx, val_idx, _ = stratified_split(y_tr, seed, (0.875, 0.125, 0.0))

    def split(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.copy()))

    train = split(x_tr[train_idx], y_tr[train_idx])
    val = split(x_tr[val_idx], y_tr[val_idx])
    test = split(x_te, y_te)
    return DataSplits("mnist1d", "classification", train, val, test,
                      num_classes=int(max(y_tr.max(), y_te.max())) + 1,
                      sample_shape=(1, x_tr.shape[1]), source=source,
                      info={"split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
                            "seed": seed})
