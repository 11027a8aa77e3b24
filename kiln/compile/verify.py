"""Checking an optimised Graph against eager PyTorch, and turning it back into a module.

`EagerOracle` is a PassManager verifier: after each pass, the Graph's module must give the
eager model's outputs on fresh random inputs, within a relative tolerance measured against
the output's scale (max |got - ref| <= rtol * max |ref|; integer outputs must be equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from kiln.graph.graph import Graph
from kiln.models.loaded import LoadedModel


def random_like(x: Any, gen: torch.Generator) -> Any:
    """A random input shaped like `x`: normal floats, ints within x's range (token ids stay in
    the vocabulary), random booleans; anything else as it was."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if x.dtype == torch.bool:
            return torch.rand(x.shape, generator=gen) < 0.5
        if x.numel():
            low, high = int(x.min()), int(x.max()) + 1
            return torch.randint(low, high, x.shape, generator=gen, dtype=x.dtype)
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(random_like(i, gen) for i in x)
    if isinstance(x, dict):
        return {k: random_like(v, gen) for k, v in x.items()}
    return x


def relative_error(got: Any, expected: Any) -> float:
    """max |got - ref| / max |ref| over every output tensor (inf where structure or an integer
    output differs)."""
    a, b = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)], \
        [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return float("inf")
            continue
        scale = y.detach().abs().max().item() if y.numel() else 0.0
        diff = (x.detach().double() - y.detach().double()).abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff / scale if scale else diff)
    return worst


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-5   # fp32: reassociated sums (folded weights, fused kernels) stay well inside

    def __post_init__(self):
        if self.rtol < 0:
            raise ValueError(f"rtol must be >= 0, got {self.rtol}")


class EagerOracle:
    """Verifier: the Graph's module matches the eager model on `trials` random inputs."""

    def __init__(self, loaded: LoadedModel, trials: int = 2, seed: int = 0, tolerance: Tolerance = Tolerance()):
        gen = torch.Generator().manual_seed(seed)
        self.tolerance = tolerance
        self.inputs = [(random_like(tuple(loaded.example_inputs), gen), random_like(dict(loaded.example_kwargs), gen))
                       for _ in range(trials)]
        model = loaded.model.eval()
        with torch.no_grad():
            self.expected = [model(*a, **k) for a, k in self.inputs]
        self.worst = 0.0

    def error(self, graph: Graph) -> float:
        module = to_module(graph)
        with torch.no_grad():
            return max(relative_error(module(*a, **k), e) for (a, k), e in zip(self.inputs, self.expected))

    def __call__(self, graph: Graph) -> None:
        err = self.error(graph)
        self.worst = max(self.worst, err)
        if not err <= self.tolerance.rtol:
            raise AssertionError(f"outputs differ from eager: relative error {err:.3g} > {self.tolerance.rtol:g}")


def to_module(graph: Graph) -> torch.nn.Module:
    """The Graph as a runnable nn.Module with the original model's call signature."""
    return graph.module()


def reexport(graph: Graph, loaded: LoadedModel) -> Graph:
    """Export the optimised Graph's module again with torch.export, as the original was: the
    optimised model stays exportable (ONNX, AOTInductor and saved programs start here)."""
    with torch.no_grad():
        program = torch.export.export(to_module(graph), tuple(loaded.example_inputs), dict(loaded.example_kwargs),
                                      strict=False)
    return Graph(program, name=graph.name)
