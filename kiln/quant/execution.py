"""A quantized model as it runs: each fake-quantized op is the float op it simulates, taking
its operands at their formats' bits (kiln.analysis.execution), so `kiln analyze` costs a
quantized run on the hardware's low-precision peaks before anything is compiled."""
from __future__ import annotations

from torch import nn

from kiln.analysis.execution import Execution, Family, ModuleExecution, Precision
from kiln.quant.block import BlockFloat, MXFormat
from kiln.quant.formats import FixedPoint, Format, IntFormat
from kiln.quant.logbin import Binary, LogFormat, Ternary
from kiln.quant.minifloat import MiniFloat
from kiln.quant.modules import QuantOp
from kiln.quant.quantizer import Quantizer


def element(fmt: Format) -> tuple[Family, int, int, int]:
    """(family, element bits, exponent bits, mantissa bits) of the values a kernel multiplies."""
    if isinstance(fmt, IntFormat):
        return Family.INT, fmt.bits_, 0, fmt.bits_ - 1
    if isinstance(fmt, FixedPoint):
        return Family.INT, fmt.width, 0, fmt.width - 1
    if isinstance(fmt, MiniFloat):
        return Family.FLOAT, 1 + fmt.exp + fmt.man, fmt.exp, fmt.man
    if isinstance(fmt, MXFormat):   # OCP MX: the block's E8M0 scale is applied in the accumulation
        fp = fmt._fp
        return (Family.INT, 8, 0, 7) if fp is None else (Family.FLOAT, 1 + fp.exp + fp.man, fp.exp, fp.man)
    if isinstance(fmt, BlockFloat):  # shared exponent, signed integer mantissas
        return Family.INT, fmt.man, 0, fmt.man - 1
    if isinstance(fmt, LogFormat):   # signed powers of two: a float with no mantissa bits
        return Family.FLOAT, fmt.bits_, max(fmt.bits_ - 1, 1), 0
    if isinstance(fmt, (Binary, Ternary)):   # +-1 (and 0) times a scale: 2-bit integers
        return Family.INT, 2, 0, 1
    return Family.FLOAT, 32, 8, 23   # an unknown format: costed as fp32, never optimistic


def precision(q: Quantizer | None, numel: int = 0) -> Precision | None:
    """How a quantizer's tensor is stored: the format's bits plus, for a weight of `numel`
    elements, its fp32 scales (and zero points) amortised, as kiln saves them."""
    if q is None:
        return None
    family, bits, exp, man = element(q.spec.format)
    stored = q.spec.bits
    scale = getattr(q, "scale", None)
    if numel and scale is not None:
        stored += 32 * scale.numel() * (2 if getattr(q, "zero_point", None) is not None else 1) / numel
    return Precision(q.spec.format.describe(), family, bits, stored, exp, man)


def execution(model: nn.Module, config: dict) -> tuple[nn.Module, Execution]:
    """Unwrap every QuantOp to its float module and restore transformers' attention, in place;
    say per module how its operands are stored."""
    modules: dict[str, ModuleExecution] = {}
    for fqn, op in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantOp)]:
        numel = op.weight.numel()
        modules[fqn] = ModuleExecution(precision(op.weight_q, numel), precision(op.input_q), precision(op.output_q))
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, op.module)
    for fqn, m in list(model.named_modules()):
        qa = m.__dict__.get("_modules", {}).get("kiln_attention")
        if qa is not None:
            p = precision(qa.q)
            modules[fqn] = ModuleExecution(p, p, None)
            del m.kiln_attention
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and getattr(m, "config", None) is not None \
                and getattr(m.config, "_attn_implementation", "") not in ("sdpa", "eager", None):
            m.set_attn_implementation("sdpa")
    note = ("quantized ops costed as low-precision kernels: operands at their formats' bits, at the fastest peak "
            "of the profile that holds both exactly (fake-quantization ops left out)")
    return model, Execution(modules, (note,))
