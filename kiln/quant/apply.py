"""Apply a QuantConfig to a model, calibrate it, report what quantization did per layer, and
restore a quantized model from its transform record."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from kiln.errors import KilnError, first_line
from kiln.models.linear import as_torch_linears
from kiln.models.probe import record
from kiln.models.zoo.layers import SelfAttention
from kiln.quant.config import QuantConfig, parse_config, to_table
from kiln.quant.execution import execution as quant_execution
from kiln.quant.modules import HF_ATTENTION, OPS, QuantAttention, QuantOp, register_hf_attention
from kiln.quant.quantizer import Quantizer
from kiln.quant.smoothquant import SmoothedLinear
from kiln.runs.transforms import TransformRecord, register_transform

KIND = "quant"


def _is_attention(module: nn.Module) -> bool:
    """kiln's zoo attention, or a transformers attention module (it calls the attention
    function registry with itself as the first argument and carries `scaling`)."""

    if isinstance(module, SelfAttention):
        return True
    return type(module).__module__.startswith("transformers.") and type(module).__name__.endswith("Attention") \
        and hasattr(module, "scaling") and hasattr(module, "config")


def _type_name(module: nn.Module) -> str | None:
    if type(module) in OPS:
        return type(module).__name__
    if isinstance(module, nn.Linear):      # SmoothQuant's input-scaling Linear
        return "Linear"
    return "attention" if _is_attention(module) else None


def quantize(model: nn.Module, config: QuantConfig, skipped: list[dict] | None = None) -> nn.Module:
    """Wrap every module the config selects, in place; returns the model. A rule whose
    pattern matches no module is a KilnError. A module chosen by its type whose shape the
    format cannot take (MX blocks of 32 along 34 inputs) stays float, appended to `skipped`
    with the reason, as N:M pruning skips what it cannot group; named by its FQN, it is an error."""
    as_torch_linears(model)   # another library's Linear (PyG's) is quantized as the nn.Linear it is
    used = [False] * len(config.rules)
    plan = []
    for fqn, module in model.named_modules():
        name = _type_name(module)
        if name is None or not fqn:
            continue
        for i, rule in enumerate(config.rules):
            used[i] |= rule.match.matches(fqn, name)
        skip, specs = config.resolve(fqn, name)
        if skip or not any(specs.values()):
            continue
        plan.append((fqn, module, name, specs))
    for rule, hit in zip(config.rules, used):
        if not hit:
            raise KilnError(f"quant config: rule {rule.match} matches no quantizable module "
                            f"(Linear, Conv1d/2d/3d, Embedding or attention)")
    if not plan:
        raise KilnError("quant config selects no module of this model")
    named = {r.match.pattern for r in config.rules if r.match.kind == "fqn"}
    hf_attention, left = False, []
    for fqn, module, name, specs in plan:
        if name == "attention":
            if specs.get("attention") is None:
                continue
            module.kiln_attention = QuantAttention(fqn, specs["attention"])
            hf_attention |= not hasattr(module, "heads")
            continue
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            op = QuantOp(module, fqn, specs.get("weight"), specs.get("input"), specs.get("output"))
            op.check_shapes()
        except KilnError as exc:
            if fqn in named:
                raise
            left.append({"module": fqn, "reason": first_line(exc)})
            continue
        setattr(parent, child, op)
    if left and len(left) == len(plan):
        raise KilnError(f"quant config: the format fits no module it selects ({left[0]['module']}: {left[0]['reason']})")
    if skipped is not None:
        skipped += left
    if hf_attention:
        register_hf_attention()
        for m in model.modules():
            if hasattr(m, "set_attn_implementation") and hasattr(m, "config"):
                m.set_attn_implementation(HF_ATTENTION)
    return model


def quantizers(model: nn.Module) -> Iterable[Quantizer]:
    return (m for m in model.modules() if isinstance(m, Quantizer))


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object]) -> int:
    """Run `batches` through the model with activation quantizers observing ranges, then fix
    their scales; returns the number of batches seen."""
    qs = [q for q in quantizers(model) if q.role != "weight"]
    for q in qs:
        q.calibrating = True
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            forward(model, batch)
            n += 1
    finally:
        for q in qs:
            q.calibrating = False
        model.train(was_training)
    if n == 0:
        raise KilnError("calibration got no batches")
    for q in qs:
        q.finish_calibration()
    return n


def sqnr_db(ref: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - q)^2)."""
    noise = (ref.double() - q.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def report(reference: nn.Module, model: nn.Module, run: Callable[[nn.Module], object]) -> dict:
    """Per quantized layer: formats, bits, weight SQNR and output SQNR against the float
    `reference` (the same model before quantization) on one batch; totals: average weight
    bits and model size in bytes (float parameters counted at their own width)."""
    ops = {n: m for n, m in model.named_modules() if isinstance(m, QuantOp)}
    attn = {n: m.kiln_attention for n, m in model.named_modules() if hasattr(m, "kiln_attention")}
    ref_out = record(reference, list(ops), run, outputs=True)
    q_out = record(model, list(ops), run, outputs=True)
    layers = []
    for name, op in ops.items():
        w = op.weight.detach()
        wq = op.quantized_weight().detach()
        layers.append({
            "name": name, "type": type(op.module).__name__,
            "weight": op.weight_q.spec.format.describe() if op.weight_q else "fp32",
            "input": op.input_q.spec.format.describe() if op.input_q else "fp32",
            "output": op.output_q.spec.format.describe() if op.output_q else "fp32",
            "weight_bits": op.weight_q.spec.bits if op.weight_q else 32.0,
            "params": w.numel(),
            "weight_sqnr_db": sqnr_db(w, wq),
            "output_sqnr_db": sqnr_db(ref_out[name], q_out[name]) if name in ref_out and name in q_out else None,
        })
    for name, qa in attn.items():
        layers.append({"name": name, "type": "attention", "weight": "-", "input": qa.q.spec.format.describe(),
                       "output": "fp32", "weight_bits": None, "params": 0, "weight_sqnr_db": None,
                       "output_sqnr_db": None})
    # bits over the whole model: quantized weights at their format's bits (a tied weight
    # counted once), every other parameter at its dtype's width
    qbits = {}
    for op in ops.values():
        if op.weight_q is not None:
            qbits[id(op.weight)] = op.weight_q.spec.bits
    seen, total_bits, total_params = set(), 0.0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        bits = qbits.get(id(p), p.element_size() * 8)
        total_bits += bits * p.numel()
        total_params += p.numel()
    # the weight scales (and zero points) are stored too: fp32 each, as kiln saves them
    for op in ops.values():
        if op.weight_q is not None and hasattr(op.weight_q, "scale"):
            total_bits += 32 * op.weight_q.scale.numel() * (2 if op.weight_q.zero_point is not None else 1)
    qparams = sum(op.weight.numel() for op in ops.values() if op.weight_q is not None)
    avg_w = sum(op.weight_q.spec.bits * op.weight.numel() for op in ops.values() if op.weight_q) / qparams \
        if qparams else 32.0
    return {"layers": layers, "quantized_layers": len(ops) + len(attn),
            "avg_weight_bits": avg_w, "avg_bits_all_params": total_bits / max(total_params, 1),
            "model_bytes": math.ceil(total_bits / 8),
            "fp32_bytes": 4 * total_params}


def _smoothed(model: nn.Module) -> list[str]:
    """FQNs of the Linears SmoothQuant gave an input scale (inside a QuantOp or not)."""
    wrapped = {f"{n}.module": n for n, m in model.named_modules()
               if isinstance(m, QuantOp) and isinstance(m.module, SmoothedLinear)}
    return sorted(wrapped.get(n, n) for n, m in model.named_modules() if isinstance(m, SmoothedLinear))


def quant_record(model: nn.Module, config: QuantConfig) -> TransformRecord:
    """The config as its table and where SmoothQuant left input scales: all the architecture
    a restore needs (the scales, SmoothQuant's and GPTQ's weights load from the weights file)."""
    return TransformRecord.of(KIND, {"quant": to_table(config), "smoothed": _smoothed(model)})


@register_transform(KIND, execution=quant_execution)
def restore(model: nn.Module, config: dict) -> nn.Module:
    table, smoothed = config.get("quant"), config.get("smoothed", [])
    if not isinstance(table, dict) or not isinstance(smoothed, list):
        raise KilnError("quant transform record needs a 'quant' table and a 'smoothed' list")
    as_torch_linears(model)   # as quantize() saw it, before a smoothed Linear is rebuilt
    for fqn in smoothed:
        try:
            linear = model.get_submodule(fqn)
        except AttributeError:
            raise KilnError(f"quant record names {fqn!r}, which the model does not have") from None
        parent, _, child = fqn.rpartition(".")
        # a placeholder scale: the saved inv_scale replaces it when the weights load
        setattr(model.get_submodule(parent), child, SmoothedLinear(linear, torch.ones(linear.in_features)))
    return quantize(model, parse_config(table, "quant transform record"))
