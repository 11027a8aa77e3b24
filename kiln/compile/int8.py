"""Real int8 Linears on the CPU: int8 x int8 -> int32 matmuls, not a model of their error.

Two kernels (`Int8Target`): torchao's, compiled by inductor into oneDNN (backend `torchao`),
and ONNX Runtime's, reached through QuantizeLinear/DequantizeLinear pairs that it fuses into
MatMulIntegerToFloat (backend `onnxruntime:dtype=int8`, calibrated per-tensor inputs only:
ONNX has no symmetric per-token quantization). One lowering, two sources of scales:
- a model kiln quantized (fake quantization, `kiln quantize`): every quantized Linear whose
  weight is a symmetric signed integer of at most 8 bits (per tensor or per channel) and whose
  input is symmetric int8 (per tensor, calibrated or dynamic, or per token) keeps kiln's own
  integer weights and scales; SmoothQuant's input scale comes along. Every other quantized
  layer (other formats, per-group scales, attention matmuls) stays fake-quantized, and
  `plan_int8` says which is which and why;
- a float model: every nn.Linear gets int8 weights per output channel and int8 activations
  per token, both scaled from the tensors (torchao's Int8DynamicActivationInt8WeightConfig).

For torchao, both build torchao's Int8Tensor weights and compile with inductor's freezing
(`Frozen`). Freezing is what makes it fast: it turns the weights into constants, so inductor's pattern
`_int_mm -> * x_scale -> * w_scale` becomes oneDNN's `qlinear_pointwise` on a prepacked
weight (VNNI int8 dot products here), with the activation's quantization fused into the
kernel before it. Without freezing inductor calls plain `aten._int_mm`.

kiln reads a quantized model only through its modules' public attributes (`module`,
`weight_q`, `input_q`, `output_q`, a quantizer's `integer_grid()`): compile/ imports nothing
from quant/. torchao is imported inside the functions: importing this module stays light.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.compile.runtime import Example, Frozen, OrtModule
from kiln.errors import KilnError

INT8_ACT = 8    # activations are quantized by the kernel itself, on an 8-bit grid


@dataclass(frozen=True)
class Int8Target:
    """Which activation scales a runtime's int8 kernels take: calibrated per tensor always;
    per token and per tensor computed at run time where `dynamic`."""

    name: str
    dynamic: bool


TORCHAO = Int8Target("torchao", dynamic=True)
ORT_QDQ = Int8Target("onnxruntime QDQ", dynamic=False)


@dataclass(frozen=True)
class Int8Plan:
    """Which quantized layers a real int8 kernel runs, and why the others stay fake-quantized."""

    int8: tuple[str, ...] = ()
    fake: tuple[tuple[str, str], ...] = ()     # (layer, reason)
    layers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)   # fqn -> the op

    def to_dict(self) -> dict:
        return {"int8": list(self.int8), "fake": [{"layer": n, "reason": r} for n, r in self.fake]}

    def describe(self) -> str:
        """One line: the layers on int8 kernels and the ones left as fake quantization."""
        fake = "; ".join(f"{_names([n for n, r in self.fake if r == reason])} ({reason})"
                         for reason in dict.fromkeys(r for _, r in self.fake))
        return (f"real int8 kernels: {_names(list(self.int8)) or 'none'}; "
                f"fake quantization: {fake or 'none'}")


def _names(fqns: list[str]) -> str:
    """Layer names with their indices folded where several share a pattern:
    encoder.layer.*.attention.self.query (x6)."""
    groups: dict[str, list[str]] = {}
    for n in fqns:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", n), []).append(n)
    return ", ".join(f"{p} (x{len(g)})" if len(g) > 1 else g[0] for p, g in groups.items())


def is_fake_quantized(model: nn.Module) -> bool:
    """Whether any submodule is a kiln quantizer (it says how it rounds: `integer_grid`)."""
    return any(callable(getattr(m, "integer_grid", None)) for m in model.modules())


def _quant_ops(model: nn.Module):
    """kiln's quantized operators: (fqn, op) for each module wrapping another with quantizers."""
    for name, m in model.named_modules():
        if hasattr(m, "weight_q") and hasattr(m, "input_q") and isinstance(getattr(m, "module", None), nn.Module):
            yield name, m


def _why_not(op, target: Int8Target) -> str | None:
    """None when `target`'s int8 kernel computes what `op` fake-quantizes; else the reason."""
    if not isinstance(op.module, nn.Linear):
        return f"{type(op.module).__name__}: int8 kernels here are for Linear only"
    w = op.weight_q.integer_grid() if op.weight_q is not None else None
    x = op.input_q.integer_grid() if op.input_q is not None else None
    if op.weight_q is None or op.input_q is None:
        return "weight-only or activation-only quantization: no int8 x int8 matmul"
    if w is None or w.bits > 8 or w.granularity.value not in ("tensor", "channel") or w.scale is None:
        return f"weight {op.weight_q.extra_repr().split(': ', 1)[1]}: no int8 kernel"
    if x is None or x.bits != INT8_ACT or x.granularity.value not in ("tensor", "token") or \
            (x.scale is None and not target.dynamic):
        return f"input {op.input_q.extra_repr().split(': ', 1)[1]}: no int8 kernel"
    return None


def plan_int8(model: nn.Module, target: Int8Target = TORCHAO) -> Int8Plan:
    """For a kiln-quantized model: the Linears `target`'s int8 kernels run, and the rest."""
    int8, fake, layers = [], [], {}
    for name, op in _quant_ops(model):
        reason = _why_not(op, target)
        if reason is None:
            int8.append(name)
            layers[name] = op
        else:
            fake.append((name, reason))
    for name, m in model.named_modules():
        if hasattr(m, "kiln_attention"):
            fake.append((name, "attention matmuls"))
    return Int8Plan(tuple(int8), tuple(fake), layers)


def _int8_linear(linear: nn.Linear, act_per_token: bool, qdata: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, act_scale: torch.Tensor | None = None) -> nn.Linear:
    """A Linear with a torchao Int8Tensor weight: int8 `qdata` times `w_scale` (per output
    channel (out, 1) or per tensor (1, 1)), or scaled from the weight itself when None;
    activations quantized to int8 per token or per tensor, with `act_scale` (calibrated, shaped
    like the input) or at run time."""
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs

    act = QuantizeTensorToInt8Kwargs(granularity=PerRow() if act_per_token else PerTensor())
    weight = linear.weight.detach()
    if qdata is None:
        tensor = Int8Tensor.from_hp(weight, PerRow(), act_quant_kwargs=act)
    else:
        block = [1, weight.shape[1]] if w_scale.numel() > 1 else list(weight.shape)
        tensor = Int8Tensor(qdata, w_scale.reshape(-1, 1).float(), block, weight.dtype, act_quant_scale=act_scale,
                            act_quant_kwargs=act)
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(tensor, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out


class _IntoRange(nn.Module):
    """SmoothQuant's input scale, then the lower end of kiln's grid: kiln's int8 is the narrow
    range [-127, 127] times a calibrated scale, torchao's activation rounding clamps to -128,
    so an input below -127.5 steps (beyond what calibration saw) would land one step apart."""

    def __init__(self, pre_scale: torch.Tensor | None, low: float | None):
        super().__init__()
        self.register_buffer("pre_scale", pre_scale)
        self.low = low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        return x if self.low is None else x.clamp(min=self.low)


def _weight_integers(op) -> torch.Tensor:
    """The integers kiln's weight quantizer rounds `op`'s weight to, as int8."""
    w = op.weight_q.integer_grid()
    return torch.clamp(torch.round(op.module.weight.detach() / w.scale), w.qmin, w.qmax).to(torch.int8)


def _lowered(op, rank: int) -> nn.Module:
    """kiln's quantized Linear `op` on an int8 kernel, with kiln's integers and scales; `rank`
    is the number of dims of its input (a calibrated activation scale is shaped like it)."""
    w, x = op.weight_q.integer_grid(), op.input_q.integer_grid()
    qdata = _weight_integers(op)
    act_scale = None if x.scale is None else x.scale.reshape((1,) * rank).float()
    pre = getattr(op.module, "inv_scale", None)
    low = None if x.scale is None else x.qmin * x.scale.item()
    linear = _int8_linear(op.module, x.granularity.value == "token", qdata, w.scale, act_scale)
    parts = [linear]
    if pre is not None or low is not None:
        parts.insert(0, _IntoRange(None if pre is None else pre.detach(), low))
    # an output quantizer stays as it was: fake quantization of the int8 kernel's result
    parts += [op.output_q] if op.output_q is not None else []
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _input_ranks(model: nn.Module, names: list[str], example: Example) -> dict[str, int]:
    """The number of dims of each named module's input on the example (a static activation
    scale must be shaped like it); layers the example never reaches are left out."""
    ranks, handles = {}, []
    for name in names:
        def hook(_m, args, name=name):
            ranks[name] = args[0].dim()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        example.call(model)
    finally:
        for h in handles:
            h.remove()
    return ranks


def lower_int8(model: nn.Module, example: Example, target: Int8Target = TORCHAO) -> nn.Module:
    """`model` (the caller's private copy) with its Linears on `target`'s int8 kernels, in
    place, not compiled: a kiln-quantized model's eligible layers (plan_int8), or, for torchao,
    every Linear of a float model. A KilnError when there is nothing to lower."""
    if is_fake_quantized(model):
        plan = plan_int8(model, target)
        if not plan.int8:
            raise KilnError(f"no quantized layer has a format an int8 kernel runs ({plan.describe()})")
        ranks = _input_ranks(model, list(plan.int8), example) if target is TORCHAO else {}
        for name in plan.int8:
            op = plan.layers[name]
            _replace(model, name, _lowered(op, ranks.get(name, 2)) if target is TORCHAO else _qdq(op))
        return model
    # nn.MultiheadAttention reads its out_proj's weight directly, not through F.linear
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    if not names:
        raise KilnError("the model has no nn.Linear to run in int8")
    for name in names:
        _replace(model, name, _int8_linear(model.get_submodule(name), act_per_token=True))
    return model


class QDQLinear(nn.Module):
    """kiln's quantized Linear as ONNX's QDQ form: int8 weights behind DequantizeLinear, the
    input through QuantizeLinear and DequantizeLinear with kiln's calibrated scale; ONNX
    Runtime fuses the pair around the matmul into MatMulIntegerToFloat. ONNX's int8 clamps to
    -128 and kiln's narrow grid to -127: the input is clamped to kiln's first."""

    def __init__(self, op):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

        w, x = op.weight_q.integer_grid(), op.input_q.integer_grid()
        weight = op.module.weight.detach()
        # stored (in, out): the graph is then matmul(DQ(x), DQ(w)) + bias, which ONNX Runtime
        # fuses; F.linear on a 2-D input exports as Gemm, which it leaves in float
        self.register_buffer("qweight", _weight_integers(op).t().contiguous())
        self.register_buffer("w_scale", w.scale.reshape(-1).expand(weight.shape[0]).float().contiguous())
        self.register_buffer("w_zero", torch.zeros(weight.shape[0], dtype=torch.int64))
        self.register_buffer("bias", None if op.module.bias is None else op.module.bias.detach().clone())
        pre = getattr(op.module, "inv_scale", None)
        self.register_buffer("pre_scale", None if pre is None else pre.detach().clone())
        self.x_scale = float(x.scale.item())
        self.low = x.qmin * self.x_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        if self.pre_scale is not None:
            x = x * self.pre_scale
        xq = qd.quantize_per_tensor(x.clamp(min=self.low), self.x_scale, 0, -128, 127, torch.int8)
        x = qd.dequantize_per_tensor(xq, self.x_scale, 0, -128, 127, torch.int8)
        w = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero, 1, -128, 127, torch.int8)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


def _qdq(op) -> nn.Module:
    # an output quantizer stays as it was: fake quantization of the kernel's result
    return QDQLinear(op) if op.output_q is None else nn.Sequential(QDQLinear(op), op.output_q)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# A lower bar (default 50 on CPU) for keeping an elementwise result instead of recomputing
# it: each int8 linear reads its input twice (per-token max, then quantize); with 16 the
# dequantize + bias before it is kept in a row buffer (GELU's erf is still computed twice).
# 163 vs 175 ms per batch (two copies of each, interleaved, 24 rounds; zoo:minilm 32 x 128,
# 2 threads); fp32 gains nothing.
INDUCTOR_INT8 = {"realize_opcount_threshold": 16}


def build_torchao(model: nn.Module, example: Example, opts: dict) -> nn.Module:
    """Backend `torchao`: lower_int8, compiled with inductor's freezing."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise KilnError("torchao is not installed (pip install torchao==0.18.0)") from None
    return Frozen(lower_int8(model, example), INDUCTOR_INT8)


def build_torch_ao(model: nn.Module, example: Example, opts: dict) -> nn.Module:
    """Backend `torch.ao`: torch.ao.quantization.quantize_dynamic (qint8 Linear, fbgemm,
    eager): per-tensor weights and per-tensor dynamic activations with its own scales.
    Deprecated upstream; the classic peer. Refused for a kiln-quantized model: it would
    quantize kiln's fake-quantized layers again with scales of its own."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    if is_fake_quantized(model):
        raise KilnError("runs its own dynamic quantization, not kiln's: use backend torchao for a quantized model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # its deprecation notice, once per call
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def int8_weights(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every weight stored as 8-bit integers: name -> shape. Recognises torchao's Int8Tensor
    (its int8 `qdata`), torch.ao's dynamic quantized Linear (qint8 packed weight) and the
    int8 initializers of an OrtModule's ONNX graph."""
    found: dict[str, tuple[int, ...]] = {}
    for name, mod in module.named_modules():
        if isinstance(mod, OrtModule):
            found.update(_onnx_int8_initializers(mod.onnx_bytes, prefix=name))
            continue
        w = getattr(mod, "weight", None)
        if callable(w) and not isinstance(w, torch.Tensor):   # torch.ao's packed Linear
            w = w()
        qdata = getattr(w, "qdata", None)
        if isinstance(qdata, torch.Tensor) and qdata.dtype in (torch.int8, torch.uint8):
            found[f"{name}.weight"] = tuple(qdata.shape)
        elif isinstance(w, torch.Tensor) and w.dtype in (torch.qint8, torch.quint8, torch.int8):
            found[f"{name}.weight"] = tuple(w.shape)
    return found


def _onnx_int8_initializers(onnx_bytes: bytes, prefix: str) -> dict[str, tuple[int, ...]]:
    import onnx

    eight = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    graph = onnx.load_from_string(onnx_bytes).graph
    return {f"{prefix}.{t.name}".lstrip("."): tuple(t.dims) for t in graph.initializer
            if t.data_type in eight and len(t.dims) == 2}
