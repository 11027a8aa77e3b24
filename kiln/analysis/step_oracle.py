"""A training step measured in eager PyTorch: the reference `analyze_step` is held against.

- FLOPs: torch.utils.flop_counter's FlopCounterMode around the forward and loss, and around
  `loss.backward()` alone (checkpointing's recomputation runs there), with the CPU fused
  attention ops given flop_counter's GPU formulas (as `kiln.analysis.oracle` does) and its
  grouped-convolution weight gradient divided by the groups it over-counts by; a
  mixture-of-experts model runs its experts as the eager loop flop_counter can see.
- Memory: every storage the step allocates is seen as it is made (a TorchDispatchMode over
  the step's ops) and as it is freed (a weakref callback on the storage), giving the live
  bytes after each op. Weights, buffers, the optimizer's states and the batch exist before
  the step and are counted from the model and the optimizer. A storage's kind is what it
  turns out to be: a parameter's `.grad` after the backward (gradients), made in the forward
  and still alive when the backward starts (activations), anything else (temporaries).
  The optimizer runs in its steady state (one step taken before the measured one).
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop, sdpa_backward_flop_count

from kiln.analysis.flops import sdpa_custom_mapping
from kiln.analysis.oracle import eager_experts
from kiln.analysis.train_step import KINDS, MemoryByKind
from kiln.graph.step import Precision, autocast, checkpointed_forwards, default_loss, make_optimizer


@dataclass(frozen=True)
class MeasuredStep:
    forward_flops: int
    backward_flops: int
    peak_bytes: int
    at_peak: MemoryByKind
    max_by_kind: MemoryByKind


def step_custom_mapping() -> dict:
    """flop_counter's mapping plus the CPU fused attention's backward (GPU kernels' formula)."""

    def cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(tuple(grad_out), tuple(query), tuple(key), tuple(value))

    def conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups,
                      output_mask, out_shape=None, **kwargs) -> int:
        # flop_counter counts a grouped convolution's weight gradient `groups` times (its formula
        # drops the groups); the input gradient it counts right. Measured: Conv2d(8, 8, 3,
        # groups=2) on 2x8x9x9 gives 3x the forward's FLOPs where the arithmetic gives 2x.
        args = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
        grad_in = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
        grad_w = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
        return grad_in + grad_w // groups

    return {**sdpa_custom_mapping(),
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward,
            torch.ops.aten.convolution_backward: conv_backward}


class _Storages(TorchDispatchMode):
    """Live bytes of the storages made under it, event by event."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []    # (+/- bytes, allocation id)
        self.size: dict[int, int] = {}
        self.phase: dict[int, str] = {}
        self.by_ptr: dict[int, int] = {}
        self.known: set[int] = set()               # data_ptrs that existed before (weights, states...)
        self.current = "forward"
        self.alive_at_backward: set[int] = set()
        self._refs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._see(t.untyped_storage())
        return out

    def _see(self, st: torch.UntypedStorage) -> None:
        ptr = st.data_ptr()
        if ptr in self.known or ptr in self.by_ptr or st.nbytes() == 0:
            return
        aid = len(self.size)
        self.size[aid], self.phase[aid], self.by_ptr[ptr] = st.nbytes(), self.current, aid
        self.events.append((st.nbytes(), aid))
        self._refs.append(weakref.ref(st, lambda _, aid=aid, ptr=ptr: self._free(aid, ptr)))

    def _free(self, aid: int, ptr: int) -> None:
        self.events.append((-self.size[aid], aid))
        self.by_ptr.pop(ptr, None)

    def start_backward(self) -> None:
        self.alive_at_backward = {a for a in self.by_ptr.values() if self.phase[a] == "forward"}
        self.current = "backward"


def measure_step(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                 optimizer: str = "adamw", checkpointed: tuple[str, ...] = (),
                 precision: Precision | str = Precision.FP32, loss_fn=default_loss) -> MeasuredStep:
    """FLOPs and memory of one eager training step, run as `capture_step` traces it."""
    kwargs = dict(kwargs or {})
    precision = Precision(precision)
    dtype = torch.bfloat16 if precision is Precision.BF16 else None
    model = eager_experts(model).train()   # flop_counter cannot see the grouped-matmul experts
    if dtype:
        model = model.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone() for p in params] if dtype else []
    opt = make_optimizer(optimizer, masters or params)
    cast = lambda x: x.to(dtype) if dtype and isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    a, kw = tuple(cast(x) for x in args), {k: cast(v) for k, v in kwargs.items()}

    def step(counter=None, storages=None):
        for p in params:
            p.grad = None
        with checkpointed_forwards(model, checkpointed):
            with counter or nullcontext():
                with autocast(dtype):
                    out = model(*a, **kw)
                loss = loss_fn(out)
            if storages is not None:
                storages.start_backward()
            flops_fwd = counter.get_total_flops() if counter else 0
            with counter or nullcontext():
                loss.backward()
        with torch.no_grad():
            for p, m in zip(params, masters):
                m.grad = p.grad.to(m.dtype)
            opt.step()
            for p, m in zip(params, masters):
                p.copy_(m)
                m.grad = None
        return flops_fwd, counter.get_total_flops() if counter else 0   # entering the counter again zeroed it

    step()   # the optimizer's states now exist: measure its steady state
    counter = FlopCounterMode(display=False, custom_mapping=step_custom_mapping())
    fwd, bwd = step(counter)
    for p in params:
        p.grad = None
    storages = _Storages()
    persistent = _persistent(model, opt, masters, a, kw)
    storages.known = {ptr for ptr, _ in persistent}
    with storages:
        step(storages=storages)
        grads = {storages.by_ptr.get(p.grad.untyped_storage().data_ptr()) for p in params if p.grad is not None}
    return _measured(fwd, bwd, storages, grads - {None}, persistent)


def _persistent(model, opt, masters, args, kwargs) -> list[tuple[int, tuple[str, int]]]:
    seen: dict[int, tuple[str, int]] = {}

    def add(t, kind):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), (kind, st.nbytes()))

    for p in model.parameters():
        add(p, "weights")
    for b in model.buffers():
        add(b, "buffers")
    for m in masters:
        add(m, "optimizer_states")
    for state in opt.state.values():
        for v in state.values():
            add(v, "optimizer_states")
    for x in pytree.tree_leaves((args, kwargs)):
        add(x, "inputs")
    return list(seen.items())


def _measured(fwd: int, bwd: int, s: _Storages, grads: set[int], persistent) -> MeasuredStep:
    kind = {a: "gradients" if a in grads else "activations" if a in s.alive_at_backward else "temporaries"
            for a in s.size}
    live: dict[str, int] = defaultdict(int)
    for _, (k, n) in persistent:
        live[k] += n
    peak, at_peak, maxima = sum(live.values()), dict(live), dict(live)
    for delta, aid in s.events:
        live[kind[aid]] += delta
        total = sum(live.values())
        if delta > 0 and total > peak:
            peak, at_peak = total, dict(live)
        for k, v in live.items():
            maxima[k] = max(maxima.get(k, 0), v)
    return MeasuredStep(fwd, bwd, peak, MemoryByKind(**{k: at_peak.get(k, 0) for k in KINDS}),
                        MemoryByKind(**{k: maxima.get(k, 0) for k in KINDS}))
