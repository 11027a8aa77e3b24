"""DARTS: differentiable architecture search (Liu, Simonyan, Yang, ICLR 2019).

Every edge of a cell is a mixed op, the softmax(alpha)-weighted sum of all candidate ops.
Network weights w are trained on one half of the training split, architecture parameters alpha
on the other. First order treats w as fixed when stepping alpha; second order differentiates
through one virtual SGD step w' = w - xi * dL_train/dw:

    dL_val(w', a)/da = d_a L_val(w', a) - xi * d2L_train(w, a)/(da dw) . d_w' L_val(w', a)

with the Hessian-vector product taken by central finite differences (the paper's eq. 8).
The found cell keeps each node's two strongest incoming edges (zero op excluded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.search.nas.fit import Tensors, accuracy, batches, cosine
from kiln.search.nas.space import (
    CellNetwork, CellSpace, FactorizedReduce, Genotype, Macro, ReLUConvBN, build_op, discretise,
)


class MixedOp(nn.Module):
    """sum_k weights[k] * op_k(x); `weights` are already normalised (softmaxed) by the caller."""

    def __init__(self, space: CellSpace, c: int, stride: int):
        super().__init__()
        self.names = space.ops
        self.ops = nn.ModuleList(build_op(name, c, stride, affine=False) for name in space.ops)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    """A cell whose every possible edge (node j reads states 0..j+1) is a mixed op."""

    def __init__(self, space: CellSpace, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.multiplier = space.nodes
        self.pre0 = FactorizedReduce(c_pp, c, affine=False) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, False)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(MixedOp(space, c, 2 if reduction and i < 2 else 1)
                                   for j in range(space.nodes) for i in range(j + 2))

    def forward(self, s0, s1, weights):
        states, k = [self.pre0(s0), self.pre1(s1)], 0
        while k < len(self.edges):
            node = sum(self.edges[k + i](h, weights[k + i]) for i, h in enumerate(states))
            k += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


def edge_count(nodes: int) -> int:
    return sum(j + 2 for j in range(nodes))


class SearchNetwork(CellNetwork):
    """The over-parameterised network: one alpha matrix (edges x ops) per cell type."""

    def __init__(self, space: CellSpace, macro: Macro, gen: torch.Generator | None = None):
        super().__init__(macro, lambda r, c_pp, c_p, c, r_prev: SearchCell(space, c_pp, c_p, c, r, r_prev))
        self.space = space
        shape = (edge_count(space.nodes), len(space.ops))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape, generator=gen))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape, generator=gen))

    def features(self, x):
        w_normal = self.alpha_normal.softmax(dim=-1)
        w_reduce = self.alpha_reduce.softmax(dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return s1.mean(dim=(2, 3))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weights(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("alpha_")]

    def genotype(self) -> Genotype:
        with torch.no_grad():
            return Genotype(normal=discretise(self.alpha_normal.softmax(-1), self.space),
                            reduce=discretise(self.alpha_reduce.softmax(-1), self.space))


def loss_on(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _grad(loss, params) -> list[torch.Tensor]:
    """Gradients, zeros for parameters the loss does not use (alpha_reduce without reductions)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _set(params, values) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def hessian_vector(model: SearchNetwork, batch, v: list[torch.Tensor], r: float = 0.01) -> list[torch.Tensor]:
    """d2 L(w, a)/(da dw) . v by central differences: (d_a L(w + e v) - d_a L(w - e v)) / 2e,
    e = r / |v| (DARTS's choice of step)."""
    w, alphas = model.weights(), model.arch_parameters()
    eps = r / torch.cat([t.flatten() for t in v]).norm().clamp_min(1e-12)
    saved = [p.detach().clone() for p in w]
    _set(w, [p + eps * t for p, t in zip(saved, v)])
    g_plus = _grad(loss_on(model, batch), alphas)
    _set(w, [p - eps * t for p, t in zip(saved, v)])
    g_minus = _grad(loss_on(model, batch), alphas)
    _set(w, saved)
    return [(a - b) / (2 * eps) for a, b in zip(g_plus, g_minus)]


def second_order_alpha_grad(model: SearchNetwork, train_batch, val_batch, xi: float,
                            weight_decay: float = 0.0, fd_step: float = 0.01) -> list[torch.Tensor]:
    """The unrolled architecture gradient (one virtual SGD step of size xi, no momentum);
    `fd_step` is the finite difference's r (a ReLU kink inside the step biases it)."""
    w, alphas = model.weights(), model.arch_parameters()
    g_train = _grad(loss_on(model, train_batch), w)
    saved = [p.detach().clone() for p in w]
    _set(w, [p - xi * (g + weight_decay * p) for p, g in zip(saved, g_train)])
    grads = _grad(loss_on(model, val_batch), alphas + w)
    _set(w, saved)
    d_alpha = grads[: len(alphas)]
    d_w = grads[len(alphas):]
    hvp = hessian_vector(model, train_batch, d_w, fd_step)
    return [da - xi * h for da, h in zip(d_alpha, hvp)]


def first_order_alpha_grad(model: SearchNetwork, val_batch) -> list[torch.Tensor]:
    return _grad(loss_on(model, val_batch), model.arch_parameters())


@dataclass(frozen=True)
class DartsSettings:
    """The search loop's knobs (kiln.search.nas.config.DartsSearch maps onto these)."""
    order: int = 1
    time_budget_s: float = 300.0
    max_epochs: int = 50
    batch_size: int = 64
    w_lr: float = 0.05
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    alpha_lr: float = 3e-3
    alpha_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    eval_samples: int = 1000
    fd_step: float = 0.01
    warmup_fraction: float = 0.0   # of the budget spent on weights only (PC-DARTS warms up 15 of 50 epochs)

    def __post_init__(self):
        if self.order not in (1, 2):
            raise KilnError(f"nas [darts]: order must be 1 or 2, got {self.order}")
        if not 0.0 <= self.warmup_fraction < 1.0 or self.time_budget_s <= 0 or self.max_epochs < 1:
            raise KilnError(f"nas [darts]: need 0 <= warmup_fraction < 1, time_budget_s > 0, max_epochs >= 1; "
                            f"got {self.warmup_fraction}, {self.time_budget_s}, {self.max_epochs}")


@dataclass
class DartsResult:
    genotype: Genotype
    seconds: float
    steps: int
    history: list[dict] = field(default_factory=list)
    alphas: dict = field(default_factory=dict)
    planned_steps: int = 0        # max_epochs' worth
    steps_per_epoch: int = 1


def _alpha_step(model, a_opt, s: DartsSettings, train_batch, val_batch, lr: float) -> None:
    if s.order == 2:
        grads = second_order_alpha_grad(model, train_batch, val_batch, xi=lr, weight_decay=s.w_weight_decay,
                                       fd_step=s.fd_step)
    else:
        grads = first_order_alpha_grad(model, val_batch)
    for p, g in zip(model.arch_parameters(), grads):
        p.grad = g
    a_opt.step()
    a_opt.zero_grad(set_to_none=True)


def _weight_step(model, w_opt, s: DartsSettings, batch) -> float:
    loss = loss_on(model, batch)
    w_opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.weights(), s.grad_clip)
    for p in model.arch_parameters():
        p.grad = None
    w_opt.step()
    return float(loss.detach())


def search(space: CellSpace, macro: Macro, data: Tensors, s: DartsSettings, seed: int,
           on_epoch=None, clock: Callable[[], float] = time.perf_counter) -> DartsResult:
    """Alternate alpha and w steps, epoch by epoch, until the epochs or the wall-time budget run
    out (the learning rate's cosine follows whichever is further along). One epoch = one pass over
    the weight half of `data`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SearchNetwork(space, macro, gen)
    w_half, a_half = data.halves(gen)
    w_opt = torch.optim.SGD(model.weights(), lr=s.w_lr, momentum=s.w_momentum, weight_decay=s.w_weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=s.alpha_lr, betas=(0.5, 0.999),
                             weight_decay=s.alpha_weight_decay)
    per_epoch = max(1, len(w_half) // s.batch_size)
    total = per_epoch * s.max_epochs
    w_feed, a_feed = batches(w_half, s.batch_size, gen), batches(a_half, s.batch_size, gen)
    start, step, history = clock(), 0, []
    held_out = a_half.take(torch.arange(min(s.eval_samples, len(a_half))))
    while step < total and clock() - start < s.time_budget_s:
        progress = max(step / total, (clock() - start) / s.time_budget_s)
        lr = cosine(s.w_lr, progress)
        for group in w_opt.param_groups:
            group["lr"] = lr
        train_batch, val_batch = next(w_feed), next(a_feed)
        if progress >= s.warmup_fraction:
            _alpha_step(model, a_opt, s, train_batch, val_batch, lr)
        loss = _weight_step(model, w_opt, s, train_batch)
        step += 1
        out_of_time = clock() - start >= s.time_budget_s
        if step % per_epoch == 0 or step == total or out_of_time:
            entry = {"epoch": step / per_epoch, "step": step, "seconds": round(clock() - start, 2),
                     "train_loss": loss, "search_val_accuracy": accuracy(model, held_out),
                     "genotype": model.genotype().to_dict()}
            history.append(entry)
            if on_epoch:
                on_epoch(entry, s.time_budget_s)
    alphas = {name: p.detach().softmax(-1).tolist() for name, p in
              (("normal", model.alpha_normal), ("reduce", model.alpha_reduce))}
    return DartsResult(model.genotype(), clock() - start, step, history, alphas, planned_steps=total,
                       steps_per_epoch=per_epoch)
