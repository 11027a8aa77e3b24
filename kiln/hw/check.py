"""The integer model against kiln's fake-quantized model: inputs, per-layer codes, logits."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kiln.hw import intmodel
from kiln.hw.ir import Layer, codes
from kiln.quant.modules import QuantOp


def first_op(model: nn.Module) -> QuantOp:
    return next(m for m in model.modules() if isinstance(m, QuantOp))


def input_codes(model: nn.Module, layers: list[Layer], x: torch.Tensor) -> np.ndarray:
    """The design's input: the first layer's input codes for float inputs x (B, ...), exactly
    as the fake-quantized model rounds them."""
    q = codes(x.float(), first_op(model).input_q)
    return q.to(torch.int64).numpy().reshape(x.shape[0], *layers[0].in_shape)


def fake_quant_codes(model: nn.Module, x: torch.Tensor) -> tuple[list[np.ndarray], torch.Tensor]:
    """The input codes every QuantOp of the fake-quantized model rounds its input to, and its output."""
    seen: list[np.ndarray] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(
        codes(inp[0].float(), mod.input_q).to(torch.int64).numpy().reshape(inp[0].shape[0], -1)))
        for m in model.modules() if isinstance(m, QuantOp)]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def compare(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """How the integer model's codes and outputs compare with the fake-quantized model's."""
    xin = input_codes(model, layers, x)
    y, outs = intmodel.run(xin, layers, trace=True)
    seen, out = fake_quant_codes(model, x)
    dense_inputs = [outs[i - 1] for i, lay in enumerate(layers) if lay.kind == "dense" and i > 0]
    per_layer = []
    for ref, got, lay in zip(seen[1:], dense_inputs, [l for l in layers if l.kind == "dense"][1:]):
        got = got.reshape(got.shape[0], -1)
        per_layer.append({"layer": lay.name, "codes_equal": float((ref == got).mean()),
                          "max_code_diff": int(np.abs(ref - got).max())})
    scale = layers[-1].meta["out_scale"]
    ref_out = out.double().numpy() / scale
    res = {"samples": int(x.shape[0]), "input_layers": per_layer,
           "output_max_diff_lsb": float(np.abs(ref_out - y).max()),
           "argmax_agreement": float((ref_out.argmax(1) == y.argmax(1)).mean())}
    if labels is not None:
        lab = labels.numpy()
        res["accuracy_integer"] = float((y.argmax(1) == lab).mean())
        res["accuracy_fake_quant"] = float((ref_out.argmax(1) == lab).mean())
    return res
