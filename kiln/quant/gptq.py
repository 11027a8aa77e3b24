"""GPTQ: weight-only post-training quantization with second-order error compensation.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a Linear with weight W (rows x cols) and calibration inputs X, GPTQ
minimises ||X W^T - X Q^T||^2 over grid values Q one column at a time: after rounding column
j, the rounding error is spread over the columns not yet quantized through the inverse
Hessian H^-1 of that objective, H = 2 X^T X / n (the Optimal Brain Surgeon update, OBS).
Algorithm 1 of the paper, as implemented here:

- dampen H by `percdamp` times its mean diagonal, so it is safely invertible;
- take the upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j of U is, up to a factor,
  the OBS update for column j once columns < j are fixed, so no inverse is ever updated;
- quantize columns in blocks of `block` and apply each block's errors to the later columns in
  one matrix product ("lazy batch updates": the same result, fewer memory passes);
- with groups, a group's scale is taken from its current, already error-updated weights when
  its first column comes up (the reference's static_groups=False);
- with act_order, columns go in order of descending diag(H), the most salient first;
- a dead input (diag(H) = 0: the input is always zero) gets weight 0 and is skipped.

Round-to-nearest (`rtn_linear`) uses the same grid and groups, so the two differ only in the
rounding. `gptq(model, ...)` runs the model's Linears stage by stage (one transformer block per
stage), each stage calibrated on the outputs of the stages already quantized, as the paper does.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.quant.config import GPTQConfig
from kiln.quant.formats import Format, IntFormat, parse_format
from kiln.quant.quantizer import Granularity
from kiln.train.tasks import forward

Forward = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class QuantizedWeight:
    """A fake-quantized weight: `weight` (rows x cols, fp32) equals
    (codes - zero_point[:, g]) * scale[:, g] for each column's group g = group_index[col]."""

    weight: torch.Tensor
    scale: torch.Tensor                  # rows x groups
    zero_point: torch.Tensor | None      # rows x groups, None for symmetric formats
    group_index: torch.Tensor            # cols, int64

    def codes(self) -> torch.Tensor:
        """The integer grid values (as floats) that the weight encodes."""
        q = self.weight / self.scale[:, self.group_index]
        return torch.round(q + (self.zero_point[:, self.group_index] if self.zero_point is not None else 0))


def _symmetric(fmt: Format) -> bool:
    return not isinstance(fmt, IntFormat) or (fmt.signed and fmt.symmetric)


def grid_params(w: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row (scale, zero point) mapping each row of `w` onto the format's range: absmax for
    symmetric formats, min/max (range widened to include 0) with an integer zero point otherwise.
    An all-zero row gets scale 1, so it rounds to 0 instead of dividing by 0."""
    if not fmt.scaled:
        raise KilnError(f"GPTQ needs a scaled format (int, minifloat), not {fmt.describe()}")
    if _symmetric(fmt):
        scale = w.abs().amax(1, keepdim=True) / fmt.qmax
        zero = None
    else:
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not _symmetric(fmt):
        zero = torch.round(fmt.qmin - lo / scale)
    return scale, zero


def _resolve_group(group_size: int, cols: int) -> int:
    if group_size < 0:
        raise KilnError(f"group_size must be >= 0 (0: one group per row), got {group_size}")
    return cols if group_size == 0 else min(group_size, cols)


def _pack(q: torch.Tensor, scales: list, zeros: list, group_index: torch.Tensor) -> QuantizedWeight:
    zero = torch.cat(zeros, 1) if zeros and zeros[0] is not None else None
    return QuantizedWeight(q, torch.cat(scales, 1), zero, group_index)


@torch.no_grad()
def rtn_linear(weight: torch.Tensor, fmt: Format | str, group_size: int = 0) -> QuantizedWeight:
    """Round-to-nearest of a (rows x cols) weight onto `fmt`'s grid, one scale per row and per
    group of `group_size` consecutive input columns (0: one group per row)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    w = weight.detach().float()
    g = _resolve_group(group_size, w.shape[1])
    q, scales, zeros = torch.empty_like(w), [], []
    for c0 in range(0, w.shape[1], g):
        scale, zero = grid_params(w[:, c0:c0 + g], fmt)
        q[:, c0:c0 + g] = fmt.quantize(w[:, c0:c0 + g], scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return _pack(q, scales, zeros, torch.arange(w.shape[1]) // g)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, in float64 for a stable factorisation."""
    H = H.double()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError:
        raise KilnError(f"GPTQ: the damped Hessian is not positive definite (percdamp {percdamp}); "
                        "raise percdamp or use more calibration data") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def gptq_linear(weight: torch.Tensor, H: torch.Tensor, fmt: Format | str, group_size: int = 0,
                block: int = 128, percdamp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ of one (rows x cols) weight given the Hessian H = 2 X^T X / n (cols x cols) of its
    inputs. Groups of `group_size` columns (0: one per row) follow the processing order, so
    with act_order a group holds the columns of similar salience (see `group_index`)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise KilnError(f"GPTQ: H is {tuple(H.shape)} but the weight has {cols} input columns")
    H = H.detach().double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, percdamp).float()
    g = _resolve_group(group_size, cols)
    if g < cols:   # a group never straddles two blocks, so its scale sees all earlier updates
        block = g * max(1, block // g)
    Q, scales, zeros = torch.zeros_like(W), [], []
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, E1, U1 = W[:, b0:b1].clone(), W.new_zeros(rows, b1 - b0), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if (b0 + i) % g == 0:
                scale, zero = grid_params(W1[:, i:i + g] if g < cols else W, fmt)
                scales.append(scale)
                zeros.append(zero)
            q = fmt.quantize(W1[:, i:i + 1], scale, zero)[:, 0]
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q[:, b0 + i], E1[:, i] = q, err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    inverse = torch.argsort(perm)
    return _pack(Q[:, inverse], scales, zeros, (torch.arange(cols) // g)[inverse])


def output_error(weight: torch.Tensor, qweight: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's objective: tr((W - Q) H (W - Q)^T) = 2/n ||X W^T - X Q^T||^2 for H = 2 X^T X / n."""
    d = (weight.detach().double() - qweight.double())
    return float(((d @ H.double()) * d).sum())


# ---------------------------------------------------------------------------------------------
# model level


@dataclass(frozen=True)
class LayerReport:
    """One quantized Linear: its stage, effective group and GPTQ's objective against RTN's."""

    name: str
    stage: str
    in_features: int
    out_features: int
    format: str
    group: int                   # effective columns per scale (in_features when per row)
    error: float | None          # tr((W-Q) H (W-Q)^T) of GPTQ's rounding (None for RTN)
    rtn_error: float | None      # the same for round-to-nearest on the same grid
    seconds: float


# a batch of inputs (a tensor or a dict of them) through the model: kiln's one call
default_forward = forward


def shared_weights(model: nn.Module) -> dict[str, str]:
    """Linear name -> the other parameter its weight is tied to (a GPT's head and embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            others = [n for n in names.get(id(m.weight), []) if n != f"{mname}.weight"]
            if others:
                out[mname] = others[0]
    return out


def select_linears(model: nn.Module, modules: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """(Linears to quantize, skipped -> why). By default every Linear whose weight is its own:
    quantizing a tied head would quantize the embedding with it."""
    tied = shared_weights(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if modules is None:
        return [n for n in sorted(linears) if n not in tied], {n: f"weight tied to {tied[n]}" for n in tied}
    for n in modules:
        if n not in linears:
            raise KilnError(f"{n!r} is not a Linear of the model; Linears: {', '.join(sorted(linears))}")
        if n in tied:
            raise KilnError(f"Linear {n!r} shares its weight with {tied[n]}: quantizing it would change both")
    return list(modules), {}


def _stage_of(model: nn.Module, name: str) -> str:
    """The outermost ModuleList element holding `name` (a transformer block), else `name`."""
    parts = name.split(".")
    for k in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:k])), nn.ModuleList):
            return ".".join(parts[:k + 1])
    return name


def _stages(model, names, batches, forward, true_sequential) -> tuple[dict[str, list[str]], list[str]]:
    """Stage name -> its Linears, in execution order, and the Linears the batches never reach."""
    order: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        forward(model, batches[0])
    finally:
        for h in hooks:
            h.remove()
    stages: dict[str, list[str]] = {}
    for n in order:
        stages.setdefault(n if true_sequential else _stage_of(model, n), []).append(n)
    return stages, [n for n in names if n not in order]


def collect_hessians(model, names, batches, forward) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for the inputs of each named Linear over the batches (n: input rows)."""
    sums = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                           dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(module, args, name):
        x = args[0].detach().reshape(-1, module.in_features).double()
        sums[name] += x.T @ x
        counts[name] += x.shape[0]

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * sums[n] / max(counts[n], 1) for n in names}


def _check(config: GPTQConfig) -> None:
    if config.group_size < 0:
        raise KilnError(f"gptq: group_size must be >= 0 (0: one scale per output row), got {config.group_size}")
    if config.block < 1:
        raise KilnError(f"gptq: block must be >= 1, got {config.block}")
    if not 0 <= config.percdamp <= 1:
        raise KilnError(f"gptq: percdamp must be in [0, 1], got {config.percdamp}")


@torch.no_grad()
def _run(model, batches, forward, plan: dict[str, tuple[Format, int]], config: GPTQConfig,
         true_sequential: bool) -> tuple[list[LayerReport], dict[str, QuantizedWeight], list[str]]:
    """The engine: stage by stage, collect the Hessians on the partly quantized model, then
    quantize the stage's Linears (plan: name -> (format, group size)) and write them back."""
    if not batches:
        raise KilnError("GPTQ needs at least one calibration batch")
    _check(config)
    was_training = model.training
    model.eval()
    layers, results = [], {}
    try:
        stages, unused = _stages(model, list(plan), batches, forward, true_sequential)
        for stage, members in stages.items():
            hessians = collect_hessians(model, members, batches, forward)
            for name in members:
                linear, (fmt, group), H = model.get_submodule(name), plan[name], hessians[name]
                t0 = time.perf_counter()
                result = gptq_linear(linear.weight, H, fmt, group, config.block, config.percdamp, config.act_order)
                seconds = time.perf_counter() - t0
                layers.append(LayerReport(
                    name, stage, linear.in_features, linear.out_features, fmt.describe(),
                    _resolve_group(group, linear.in_features), output_error(linear.weight, result.weight, H),
                    output_error(linear.weight, rtn_linear(linear.weight, fmt, group).weight, H), seconds))
                linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
                results[name] = result
    finally:
        model.train(was_training)
    return layers, results, unused


def _report(method: str, config: dict, layers: list[LayerReport], skipped: dict[str, str]) -> dict:
    return {"method": method, "config": config, "layers": [asdict(layer) for layer in layers], "skipped": skipped}


def gptq(model: nn.Module, calib_batches: Iterable[Any], forward: Forward = default_forward,
         fmt: Format | str = "int4", config: GPTQConfig = GPTQConfig(), modules: Sequence[str] | None = None,
         true_sequential: bool = False) -> dict:
    """Quantize the model's Linears (`modules`, default all with untied weights) in place with
    GPTQ: fake-quant weights on `fmt`'s grid, `config.group_size` columns per scale (0: per row).

    Stage by stage in execution order (a stage is one element of the model's outermost
    ModuleList, i.e. a transformer block, or a lone Linear; one Linear with `true_sequential`):
    the model runs on every calibration batch with the earlier stages already quantized, the
    Hessians of the stage's Linears are collected, and the stage is quantized. `forward(model,
    batch)` runs one batch. Returns a JSON-ready report: per layer its objective under GPTQ and
    under round-to-nearest, and the Linears skipped with the reason.
    """
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    names, skipped = select_linears(model, modules)
    layers, _, unused = _run(model, list(calib_batches), forward, {n: (fmt, config.group_size) for n in names},
                             config, true_sequential)
    skipped.update({n: "never called on the calibration batches" for n in unused})
    return _report("gptq", {"format": fmt.describe(), **asdict(config), "true_sequential": true_sequential},
                   layers, skipped)


def gptq_for_config(model: nn.Module, qconfig, batches: list, forward: Forward = default_forward
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """GPTQ for a `kiln quantize` config: every Linear the config gives a scaled, static weight
    quantizer, on that quantizer's own grid (format and per-channel or per-group scales), so
    that the weight quantizer can adopt GPTQ's scales and leave the weights as they are.
    The groups are the weight quantizer's (its granularity and group_size); config.group_size
    is not used here. Returns (report, Linear name -> (scales, zero points) as rows x groups)."""

    config: GPTQConfig = qconfig.gptq
    plan, skipped = {}, {}
    tied = shared_weights(model)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not name:
            continue
        off, specs = qconfig.resolve(name, "Linear")
        spec = specs.get("weight")
        if off or spec is None or not spec.format.scaled or spec.runtime_scale:
            continue
        if name in tied:
            skipped[name] = f"weight tied to {tied[name]}"
            continue
        if spec.granularity is Granularity.TENSOR:
            raise KilnError(f"gptq: {name}.weight has one scale per tensor; GPTQ needs granularity "
                            "'channel' or 'group'")
        group = spec.group_size if spec.granularity is Granularity.GROUP else 0
        if config.act_order and group:
            raise KilnError("gptq: act_order permutes the columns of each group, which per-group weight "
                            "quantizers (contiguous groups) cannot express; use act_order with 'channel'")
        plan[name] = (spec.format, group)
    if not plan:
        raise KilnError("gptq: the quant config gives no Linear a static weight quantizer with a scaled format")
    layers, results, unused = _run(model, batches, forward, plan, config, False)
    skipped.update({n: "never called on the calibration batches" for n in unused})
    return _report("gptq", asdict(config), layers, skipped), {n: (r.scale, r.zero_point) for n, r in results.items()}


@torch.no_grad()
def rtn(model: nn.Module, fmt: Format | str = "int4", group_size: int = 128,
        modules: Sequence[str] | None = None) -> dict:
    """Round-to-nearest of the model's Linears in place, on the grid and groups GPTQ uses."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    names, skipped = select_linears(model, modules)
    layers = []
    for name in names:
        linear = model.get_submodule(name)
        t0 = time.perf_counter()
        q = rtn_linear(linear.weight, fmt, group_size).weight
        layers.append(LayerReport(name, name, linear.in_features, linear.out_features, fmt.describe(),
                                  _resolve_group(group_size, linear.in_features), None, None,
                                  time.perf_counter() - t0))
        linear.weight.data.copy_(q.to(linear.weight.dtype))
    return _report("rtn", {"format": fmt.describe(), "group_size": group_size}, layers, skipped)


__all__ = ["LayerReport", "QuantizedWeight", "collect_hessians", "default_forward", "gptq", "gptq_for_config",
           "gptq_linear", "grid_params", "output_error", "rtn", "rtn_linear", "select_linears", "shared_weights"]
