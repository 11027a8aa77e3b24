"""Small, fast training and evaluation on in-memory tensors: every NAS method trains many small
networks briefly, so this skips DataLoaders and checkpoints (the trainer's job for one model)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kiln.data import load_dataset
from kiln.errors import KilnError


@dataclass(frozen=True)
class Tensors:
    """One split as two tensors."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor) -> "Tensors":
        return Tensors(self.x[idx], self.y[idx])

    def halves(self, gen: torch.Generator) -> tuple["Tensors", "Tensors"]:
        """A seeded random 50/50 split (DARTS trains weights on one half, alphas on the other)."""
        perm = torch.randperm(len(self), generator=gen)
        return self.take(perm[: len(self) // 2]), self.take(perm[len(self) // 2:])


@dataclass(frozen=True)
class Data:
    train: Tensors
    val: Tensors
    test: Tensors
    in_channels: int
    num_classes: int


def load_data(spec: str, seed: int) -> Data:
    """A classification dataset of image tensors, whole splits in memory."""

    splits = load_dataset(spec, seed=seed)
    if splits.task != "classification" or not splits.sample_shape or len(splits.sample_shape) != 3:
        raise KilnError(f"nas: dataset {spec!r} is not image classification (task {splits.task}, "
                        f"sample shape {splits.sample_shape}); the cell space needs CxHxW images")

    def tensors(ds) -> Tensors:
        if hasattr(ds, "x") and isinstance(ds.x, torch.Tensor):
            return Tensors(ds.x.float(), ds.y.long())
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return Tensors(torch.stack(xs).float(), torch.as_tensor(ys).long())
    return Data(tensors(splits.train), tensors(splits.val), tensors(splits.test),
                splits.sample_shape[0], splits.num_classes)


def batches(data: Tensors, batch_size: int, gen: torch.Generator):
    """Endless shuffled minibatches (a new permutation each pass; the last short batch dropped)."""
    n = len(data)
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for k in range(0, n - batch_size + 1, batch_size):
            idx = perm[k: k + batch_size]
            yield data.x[idx], data.y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, data: Tensors, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    was = model.training
    model.eval()
    correct = sum(int((model(data.x[k: k + batch_size]).argmax(1) == data.y[k: k + batch_size]).sum())
                  for k in range(0, len(data), batch_size))
    model.train(was)
    return correct / max(len(data), 1)


@dataclass(frozen=True)
class Deadline:
    """A point in time on `clock` (seconds); searches check it between training steps, so a
    budget holds inside a candidate's training, not only between candidates."""
    at: float
    clock: Callable[[], float] = time.perf_counter

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.perf_counter) -> "Deadline":
        return cls(clock() + seconds, clock)

    def passed(self) -> bool:
        return self.clock() >= self.at


@dataclass(frozen=True)
class Recipe:
    """How a candidate (briefly) or the found architecture (fully) is trained: SGD with momentum,
    cosine decay to zero over `epochs` (fractions allowed); `max_seconds` > 0 also caps wall time."""
    epochs: float = 3.0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    max_seconds: float = 0.0

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise KilnError(f"nas train recipe: epochs, batch_size and lr must be positive, got "
                            f"{self.epochs}, {self.batch_size}, {self.lr}")


def cosine(base: float, progress: float) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def train(model: nn.Module, data: Tensors, recipe: Recipe, seed: int, on_step=None,
          deadline: Deadline | None = None) -> dict:
    """Train in place; returns steps (done and planned), seconds and the mean loss of the last
    50 steps. The learning rate follows the cosine by whichever is further along: steps or wall
    time. Training stops before a step that would start past `deadline`."""
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, int(recipe.epochs * len(data) / recipe.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=True)
    model.train()
    start, losses = time.perf_counter(), []
    feed = batches(data, recipe.batch_size, gen)
    done = 0
    for done in range(1, steps + 1):
        elapsed = time.perf_counter() - start
        if recipe.max_seconds and elapsed >= recipe.max_seconds or deadline and deadline.passed():
            done -= 1
            break
        progress = max((done - 1) / steps, elapsed / recipe.max_seconds if recipe.max_seconds else 0.0)
        for group in opt.param_groups:
            group["lr"] = cosine(recipe.lr, progress)
        x, y = next(feed)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(done, steps)
    tail = losses[-50:]
    return {"steps": done, "planned_steps": steps, "seconds": time.perf_counter() - start,
            "train_loss": sum(tail) / len(tail) if tail else float("nan")}
