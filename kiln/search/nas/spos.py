"""Single Path One-Shot (Guo et al., "Single Path One-Shot NAS with Uniform Sampling", ECCV 2020).

A supernet holds every candidate block of every layer; each training step runs one path drawn
uniformly, so all paths share (and train) the weights of their blocks. A path is then scored with
the inherited weights after recalibrating batch-norm statistics on a few training batches (the
shared running statistics belong to no single path), and evolution searches over paths by that
score. The stand-alone network of a path has the same modules, freshly initialised.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.search.nas.fit import Tensors, accuracy, batches

KERNELS = {"identity": 0, "conv3x3": 3, "conv5x5": 5, "conv7x7": 7}
Path = tuple[int, ...]


def check_space(space) -> None:
    """A SposSpace with at least one path and known block names."""
    if not space.blocks or space.layers < 1:
        raise KilnError(f"nas spos space has no valid architecture: blocks {list(space.blocks)}, "
                        f"layers {space.layers}; accepted blocks: {', '.join(KERNELS)}")
    for name in space.blocks:
        if name not in KERNELS:
            raise KilnError(f"nas spos space: unknown block {name!r}; accepted: {', '.join(KERNELS)}")
    if len(set(space.blocks)) != len(space.blocks):
        raise KilnError(f"nas spos space: a block is listed twice in {list(space.blocks)}")
    if space.channels < 1 or any(not 0 <= k < space.layers for k in space.downsample_after):
        raise KilnError(f"nas spos space: channels must be >= 1 and downsample_after layer indices in "
                        f"0..{space.layers - 1}; got {space.channels}, {list(space.downsample_after)}")


def make_block(name: str, c: int) -> nn.Module:
    k = KERNELS[name]
    if k == 0:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class _Skeleton(nn.Module):
    """Stem, one module per layer (`layer(l, x)`), pooling after `downsample_after`, a classifier."""

    def __init__(self, space, in_channels: int, num_classes: int):
        super().__init__()
        c = space.channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.downsample = set(space.downsample_after)
        self.head = nn.Linear(c, num_classes)

    def run(self, x, layer):
        x = self.stem(x)
        for index in range(self.n_layers):
            x = layer(index, x)
            if index in self.downsample:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


class Supernet(_Skeleton):
    def __init__(self, space, in_channels: int, num_classes: int):
        super().__init__(space, in_channels, num_classes)
        self.space = space
        self.n_layers = space.layers
        self.choices = nn.ModuleList(nn.ModuleList(make_block(b, space.channels) for b in space.blocks)
                                     for _ in range(space.layers))

    def forward(self, x, path: Path):
        return self.run(x, lambda index, h: self.choices[index][path[index]](h))

    def extract(self, path: Path) -> "PathNet":
        """The path as a stand-alone network carrying the inherited weights (and BN statistics)."""
        net = PathNet(self.space, path, self.stem[0].in_channels, self.head.out_features)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("choices.")}
        for index, k in enumerate(path):
            prefix = f"choices.{index}.{k}."
            state.update({f"blocks.{index}." + key[len(prefix):]: v for key, v in self.state_dict().items()
                          if key.startswith(prefix)})
        net.load_state_dict(state)
        return net


class PathNet(_Skeleton):
    """One path as an ordinary network."""

    def __init__(self, space, path: Path, in_channels: int, num_classes: int):
        super().__init__(space, in_channels, num_classes)
        check_path(space, path)
        self.n_layers = space.layers
        self.path = tuple(path)
        self.blocks = nn.ModuleList(make_block(space.blocks[k], space.channels) for k in path)

    def forward(self, x):
        return self.run(x, lambda index, h: self.blocks[index](h))


def check_path(space, path: Path) -> None:
    if len(path) != space.layers or any(not 0 <= k < len(space.blocks) for k in path):
        raise KilnError(f"nas spos: path {list(path)} does not fit {space.layers} layers of "
                        f"{len(space.blocks)} blocks")


def describe(space, path: Path) -> list[str]:
    return [space.blocks[k] for k in path]


class UniformPaths(nn.Module):
    """Training view of a supernet: each call runs a path drawn uniformly at random."""

    def __init__(self, supernet: Supernet, seed: int):
        super().__init__()
        self.supernet = supernet
        self.rng = random.Random(seed)

    def forward(self, x):
        path = tuple(self.rng.randrange(len(self.supernet.space.blocks)) for _ in range(self.supernet.n_layers))
        return self.supernet(x, path)


class FixedPath(nn.Module):
    def __init__(self, supernet: Supernet, path: Path):
        super().__init__()
        self.supernet, self.path = supernet, tuple(path)

    def forward(self, x):
        return self.supernet(x, self.path)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Tensors, n_batches: int, batch_size: int, seed: int) -> None:
    """Replace every BN's running statistics by the exact average over `n_batches` training batches
    run through `model` (momentum None = cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    feed = batches(data, batch_size, torch.Generator().manual_seed(seed))
    for _ in range(n_batches):
        model(next(feed)[0])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def inherited_accuracy(supernet: Supernet, path: Path, train: Tensors, val: Tensors, bn_batches: int,
                       seed: int = 0, batch_size: int = 64) -> float:
    """A path's accuracy on `val` with the supernet's weights, BN recalibrated for that path."""
    view = FixedPath(supernet, path)
    recalibrate_bn(view, train, bn_batches, batch_size, seed)
    return accuracy(view, val)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b (ties corrected): sum of sign products over pairs, over the geometric mean of
    the untied pair counts of each ranking."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("kendall_tau needs two sequences of equal length >= 2")
    num = ties_a = ties_b = 0
    pairs = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            sa = (a[i] > a[j]) - (a[i] < a[j])
            sb = (b[i] > b[j]) - (b[i] < b[j])
            num += sa * sb
            ties_a += sa == 0
            ties_b += sb == 0
            pairs += 1
    den = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return num / den if den else float("nan")
