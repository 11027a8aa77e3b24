"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". A few input channels of a Linear carry activations far larger than the rest,
so one per-tensor activation scale wastes most of the int8 grid on them. Since
X W^T = (X diag(s)^-1) (W diag(s))^T, dividing input channel j by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplying weight column j by s_j leaves the
output unchanged while it evens out the activation ranges (alpha = 0.5 splits the difficulty
between the two; eq. 4 of the paper).

The division costs nothing when the Linears' input comes straight from a LayerNorm whose output
feeds nothing else: it folds into the norm's weight and bias. Which norm feeds which Linears is
read from the torch.export graph of the model, not from module names: a norm qualifies when
every use of its output (through dropout, copies and views that keep the channel dimension) is
the input of a Linear. That holds for pre-LN transformers (GPT-2, ViT, kiln's zoo:gpt and
zoo:vit: ln1 -> attn.qkv, ln2 -> mlp.0). In post-LN BERT (zoo:minilm) every LayerNorm output
also feeds a residual add, so folding would change the model; `Unfoldable.SCALE_INPUT` then
turns those Linears into `SmoothedLinear`s that multiply their input by 1/s, an elementwise
step that an int8 kernel fuses into its activation quantization. Linears with a tied weight
(a GPT's head) are never smoothed: scaling them would scale the embedding too.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.models.loaded import LoadedModel
from kiln.quant.formats import Format, parse_format
from kiln.quant.gptq import Forward, default_forward, grid_params, select_linears, shared_weights


class Unfoldable(enum.Enum):
    """What to do with Linears whose input scale cannot fold into a LayerNorm."""

    SKIP = "skip"                  # leave them (and report why)
    SCALE_INPUT = "scale_input"    # smooth them with an explicit input multiply (SmoothedLinear)
    # only those whose input is a norm's output that also feeds something else (post-LN BERT:
    # Q/K/V and FC1), the Linears SmoothQuant's paper smooths; FC2 and the attention output
    # projection read GELU or attention outputs, where smoothing moved more error than it removed
    SCALE_NORM_INPUT = "scale_norm_input"


class SmoothedLinear(nn.Linear):
    """A Linear whose input is divided by a smoothing scale s per input channel (the weight's
    columns already carry s): the stand-in for a LayerNorm fold where none is possible."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("inv_scale", (1.0 / scale).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.inv_scale)


@dataclass(frozen=True)
class Group:
    """Linears that read one tensor; `norm` is the LayerNorm it comes from when s folds into it."""

    linears: tuple[str, ...]
    norm: str | None
    fed_by_norm: bool = False      # the input is a norm's output (whether or not s can fold)


# ---------------------------------------------------------------------------------------------
# finding LayerNorm -> Linear pairs in the exported graph

NORMS = ("layer_norm", "rms_norm")
# ops whose output channel j is a function of input channel j alone (in eval mode)
ELEMENTWISE = frozenset({"dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "feature_dropout"})
RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "expand", "unsqueeze", "flatten", "slice", "select"})


def _op(n: torch.fx.Node) -> str:
    t = n.target
    return t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _keeps_channels(n: torch.fx.Node) -> bool:
    """Does `n` pass its first input through with the last (channel) dimension untouched?"""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], torch.fx.Node):
        return False
    op, src = _op(n), n.args[0]
    if op in ELEMENTWISE:
        return True
    if op in RESHAPES:
        val, src_val = n.meta.get("val"), src.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(src_val, torch.Tensor) or not val.dim():
            return False
        if op in ("slice", "select"):   # along a batch/sequence dim, not the channels
            dim = n.args[1] if len(n.args) > 1 else 0
            return dim % src_val.dim() != src_val.dim() - 1
        return val.shape[-1] == src_val.shape[-1]
    return False


def _source(n: torch.fx.Node) -> torch.fx.Node:
    while _keeps_channels(n):
        n = n.args[0]
    return n


def _uses(n: torch.fx.Node) -> Iterator[tuple[torch.fx.Node, torch.fx.Node]]:
    """(user, the value it reads) for every use of n, looking through channel-keeping ops."""
    for user in n.users:
        if _keeps_channels(user) and user.args[0] is n:
            yield from _uses(user)
        else:
            yield user, n


class _Bound(nn.Module):
    """The model with its forward function bound, so torch.export sees one batch argument."""

    def __init__(self, model: nn.Module, forward: Forward):
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, batch):
        return self._forward(self.model, batch)


def find_groups(model: nn.Module, batch: Any, forward: Forward = default_forward) -> tuple[list[Group], dict[str, str]]:
    """(groups of Linears sharing one input, Linear -> why it cannot be smoothed), from the
    torch.export graph of `forward(model, batch)`."""

    was_training = model.training
    try:
        program = capture(LoadedModel("smoothquant", _Bound(model, forward), (batch,))).program
    finally:
        model.train(was_training)
    params = {k: v.removeprefix("model.") for k, v in program.graph_signature.inputs_to_parameters.items()}
    tied = shared_weights(model)
    by_input: dict[torch.fx.Node, list[str]] = {}
    skipped: dict[str, str] = {}
    for n in program.graph.nodes:
        if n.op != "call_function" or _op(n) != "linear":
            continue
        weight = params.get(getattr(n.args[1], "name", ""), "")
        name = weight.removesuffix(".weight")
        if not weight.endswith(".weight") or not isinstance(_module(model, name), nn.Linear):
            continue   # F.linear on a computed weight: not a Linear module to rescale
        if name in tied:
            skipped[name] = f"weight tied to {tied[name]}"
        else:
            by_input.setdefault(_source(n.args[0]), []).append(name)
    groups = []
    for src, names in by_input.items():
        norm, why = _foldable_norm(src, model, params, set(names))
        groups.append(Group(tuple(names), norm, src.op == "call_function" and _op(src) in NORMS))
        if norm is None:
            skipped.update({n: why for n in names})
    return groups, skipped


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _foldable_norm(src: torch.fx.Node, model, params: dict, linears: set[str]) -> tuple[str | None, str]:
    """(the norm module s folds into, or None and why not)."""
    if src.op != "call_function" or _op(src) not in NORMS:
        return None, f"input comes from {_op(src) if src.op == 'call_function' else src.op}, not a LayerNorm"
    weight = params.get(getattr(src.args[2] if len(src.args) > 2 else None, "name", ""), "")
    if len(src.args[1]) != 1 or not weight.endswith(".weight"):
        return None, f"{_op(src)} {src.name} has no per-channel weight parameter to fold into"
    norm = weight.removesuffix(".weight")
    others = sorted({_op(u) for u, v in _uses(src) if not (_op(u) == "linear" and u.args[0] is v)})
    if others:
        return None, f"the output of {norm} also feeds {', '.join(others)} (a residual in post-LN models)"
    readers = {params.get(getattr(u.args[1], "name", ""), "").removesuffix(".weight") for u, _ in _uses(src)}
    if readers != linears:
        return None, f"the output of {norm} also feeds {', '.join(sorted(readers - linears))}, which cannot be smoothed"
    return norm, ""


# ---------------------------------------------------------------------------------------------
# statistics and the transform


def _channel_absmax(model: nn.Module, names: Sequence[str], batches: list, forward: Forward) -> dict[str, torch.Tensor]:
    """max over calibration inputs of |x_j| per input channel j of each named Linear."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name, x):
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        amax[name] = torch.maximum(amax[name], m) if name in amax else m

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: hook(n, a[0])) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return amax


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 for channels that are all zero on either side."""
    s = act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
    return torch.where((act_absmax > 0) & (weight_absmax > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def outlier_ratio(channel_absmax: torch.Tensor) -> float:
    """How far the largest channel stands out: max over channels / median over channels."""
    return float(channel_absmax.max() / channel_absmax.median().clamp(min=1e-12))


@torch.no_grad()
def smooth(model: nn.Module, calib_batches: Iterable[Any], forward: Forward = default_forward, alpha: float = 0.5,
           unfoldable: Unfoldable = Unfoldable.SKIP) -> dict:
    """Apply SmoothQuant in place: fold per-channel scales into LayerNorm -> Linear pairs (and,
    with `Unfoldable.SCALE_INPUT`, smooth the other Linears with an explicit input scale).
    The fp32 model computes the same function afterwards, up to float rounding. Returns a
    JSON-ready report: each smoothed group with its norm (None: explicit scale) and its
    activations' outlier ratio (max / median channel absmax) before and after, and the Linears
    left alone with the reason."""
    if not 0.0 <= alpha <= 1.0:
        raise KilnError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    unfoldable = Unfoldable(unfoldable)
    batches = list(calib_batches)
    if not batches:
        raise KilnError("smoothquant needs at least one calibration batch")
    groups, skipped = find_groups(model, batches[0], forward)
    chosen = [g for g in groups if g.norm is not None or unfoldable is Unfoldable.SCALE_INPUT
              or (unfoldable is Unfoldable.SCALE_NORM_INPUT and g.fed_by_norm)]
    if not chosen:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:2])
        raise KilnError(f"smoothquant found no LayerNorm -> Linear pair whose scale folds ({reasons}); "
                        "in Python, unfoldable=Unfoldable.SCALE_INPUT smooths such Linears with an explicit scale")
    was_training = model.training
    model.eval()
    try:
        amax = _channel_absmax(model, [g.linears[0] for g in chosen], batches, forward)
    finally:
        model.train(was_training)
    done = []
    for g in chosen:
        act = amax[g.linears[0]]
        s = _apply(model, g, act, alpha)
        done.append({"linears": list(g.linears), "norm": g.norm, "ratio_before": outlier_ratio(act),
                     "ratio_after": outlier_ratio(act / s)})
        if g.norm is None:
            for n in g.linears:
                skipped.pop(n, None)
    return {"alpha": alpha, "groups": done, "skipped": skipped}


def _apply(model: nn.Module, g: Group, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale the group's weight columns by s and divide its input by s (in the norm or explicitly)."""
    linears = [model.get_submodule(n) for n in g.linears]
    w_amax = torch.stack([m.weight.detach().abs().amax(0).float() for m in linears]).amax(0)
    s = smoothing_scale(act_absmax, w_amax, alpha)
    for m in linears:
        m.weight.mul_(s.to(m.weight.dtype))
    if g.norm is not None:
        norm = model.get_submodule(g.norm)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
    else:
        for n, m in zip(g.linears, linears):
            _replace(model, n, SmoothedLinear(m, s))
    return s


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------------------------
# W8A8 simulation, to measure what smoothing buys


@contextmanager
def fake_quant_linears(model: nn.Module, weight_format: Format | str = "int8", act_format: Format | str = "int8",
                       modules: Sequence[str] | None = None) -> Iterator[None]:
    """Within the block, the Linears compute with fake-quantized weights (one scale per output
    row) and inputs (one dynamic absmax scale per call, per tensor: the setting where activation
    outliers hurt most). A SmoothedLinear's input is quantized after its smoothing scale."""
    wf = parse_format(weight_format) if isinstance(weight_format, str) else weight_format
    af = parse_format(act_format) if isinstance(act_format, str) else act_format
    names, _ = select_linears(model, modules)
    saved, handles = {}, []
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            saved[n] = m.weight.detach().clone()
            scale, zero = grid_params(m.weight.detach().float(), wf)
            m.weight.copy_(wf.quantize(m.weight.detach().float(), scale, zero).to(m.weight.dtype))
            handles.append(m.register_forward_pre_hook(lambda mod, a, af=af: (_quant_input(mod, a[0], af),) + a[1:]))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, w in saved.items():
                model.get_submodule(n).weight.copy_(w)


def _quant_input(module: nn.Module, x: torch.Tensor, fmt: Format) -> torch.Tensor:
    inv = getattr(module, "inv_scale", None)
    seen = x * inv if inv is not None else x
    scale, zero = grid_params(seen.detach().reshape(1, -1).float(), fmt)
    q = fmt.quantize(seen.float(), scale.reshape(()), None if zero is None else zero.reshape(())).to(x.dtype)
    return q / inv if inv is not None else q


__all__ = ["Group", "SmoothedLinear", "Unfoldable",
           "fake_quant_linears", "find_groups", "outlier_ratio", "smooth", "smoothing_scale"]
