"""One wrapper per operator, the format plugged in: no class per (operator x format).

`QuantOp` wraps an nn.Module of a supported type and runs the module's own computation with
fake-quantized weight, input and output; the table `OPS` says, per module type, how to call
the operator with a given weight and which axis each tensor reduces over. The matmuls inside
attention are reached through `QuantAttention`: q, k and v are quantized before Q K^T, the
probabilities and v before P V. It plugs into kiln's zoo attention (`layers.Attend`) and into
Hugging Face models through transformers' attention-function registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kiln.quant.quantizer import QSpec, Quantizer


@dataclass(frozen=True)
class Op:
    """How to run one module type with a substituted weight."""

    run: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    input_axis: int            # the reduction axis of the input activation
    quantize_input: bool = True


def _conv(m, x, w):
    return m._conv_forward(x, w, m.bias)


def _embedding(m, x, w):
    return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


OPS: dict[type[nn.Module], Op] = {
    nn.Linear: Op(lambda m, x, w: F.linear(x, w, m.bias), -1),
    nn.Conv1d: Op(_conv, 1),
    nn.Conv2d: Op(_conv, 1),
    nn.Conv3d: Op(_conv, 1),
    nn.Embedding: Op(_embedding, -1, quantize_input=False),   # its input is token ids
}
TYPE_NAMES = {t.__name__: t for t in OPS}


class QuantOp(nn.Module):
    """A supported module with quantizers on its weight, input and output (each optional)."""

    def __init__(self, module: nn.Module, fqn: str, weight: QSpec | None, input: QSpec | None,
                 output: QSpec | None):
        super().__init__()
        self.module, self.fqn = module, fqn
        # a SmoothQuant'd Linear (kiln.quant.smoothquant.SmoothedLinear) is a Linear that scales its input
        self.op = OPS[nn.Linear] if isinstance(module, nn.Linear) else OPS[type(module)]
        w = module.weight
        self.weight_q = Quantizer(weight, "weight", 1, tuple(w.shape), f"{fqn}.weight") if weight else None
        in_shape = (w.shape[1] * getattr(module, "groups", 1),)     # a conv's weight holds in/groups
        self.input_q = Quantizer(input, "input", self.op.input_axis, _act_shape(in_shape, self.op.input_axis),
                                 f"{fqn}.input") if input and self.op.quantize_input else None
        out_shape = (w.shape[0],) if not isinstance(module, nn.Embedding) else (w.shape[1],)
        self.output_q = Quantizer(output, "output", self.op.input_axis, _act_shape(out_shape, self.op.input_axis),
                                  f"{fqn}.output") if output else None
        if self.weight_q is not None:
            self.weight_q.init_from(w)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self):
        return getattr(self.module, "bias", None)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_q(self.module.weight) if self.weight_q is not None else self.module.weight

    def check_shapes(self) -> None:
        """Quantize the weight, and a zero input of the module's width, once: a format that cannot
        take their shapes (MX blocks of 32 along 34 inputs) fails here, not at the first batch."""
        with torch.no_grad():
            self.quantized_weight()
            if self.input_q is not None and not self.input_q.spec.format.scaled:
                w = self.module.weight
                width = (w.shape[1] * getattr(self.module, "groups", 1),)
                self.input_q(torch.zeros(_act_shape(width, self.op.input_axis)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = getattr(self.module, "inv_scale", None)
        if smooth is not None:
            x = x * smooth
        if self.input_q is not None:
            x = self.input_q(x)
        y = self.op.run(self.module, x, self.quantized_weight())
        return self.output_q(y) if self.output_q is not None else y


def _act_shape(features: tuple[int, ...] | None, axis: int) -> tuple[int, ...] | None:
    """A stand-in activation shape with the feature count on the reduction axis, enough to
    size per-channel and per-group scales before any data is seen."""
    if features is None:
        return None
    return (1, features[0]) if axis == -1 else (1, features[0], 1)


class QuantAttention(nn.Module):
    """Quantizers for the two matmuls of attention: Q K^T (q and k) and P V (p and v)."""

    def __init__(self, fqn: str, spec: QSpec):
        super().__init__()
        self.fqn = fqn
        # q, k, v are (B, H, T, D): Q K^T reduces over D (last); P V reduces over T (P's last, V's -2)
        self.q = Quantizer(spec, "input", -1, None, f"{fqn}.q")
        self.k = Quantizer(spec, "input", -1, None, f"{fqn}.k")
        self.v = Quantizer(spec, "input", -2, None, f"{fqn}.v")
        self.p = Quantizer(spec, "input", -1, None, f"{fqn}.p")

    def attend(self, q, k, v, mask=None, scale=None, causal=False, dropout=0.0):
        """softmax(Q K^T * scale + mask) V with each matmul operand quantized; mask is additive
        or boolean (True = keep), as in F.scaled_dot_product_attention."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = self.q(q) @ self.k(k).transpose(-1, -2) * scale
        if causal:
            t, s = scores.shape[-2:]
            keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout:
            p = F.dropout(p, dropout)
        return self.p(p) @ self.v(v)


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function ("kiln_quant"): the module's QuantAttention does the math."""
    qa: QuantAttention = module.kiln_attention
    if key.shape[1] != query.shape[1]:         # grouped-query attention: repeat k/v heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False))) and attention_mask is None
    out = qa.attend(query, key, value, attention_mask, scaling, causal, dropout)
    return out.transpose(1, 2).contiguous(), None


HF_ATTENTION = "kiln_quant"


def register_hf_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HF_ATTENTION, hf_attention)
    # transformers builds the mask per attention implementation: an unknown one gets none at
    # all, so take eager attention's (a materialised additive mask, causal and padding in it)
    AttentionMaskInterface.register(HF_ATTENTION, eager_mask)
