"""Per-device memory of a training step under a parallel plan, by kind.

Model states follow ZeRO (Rajbhandari et al., arXiv 1910.02054, sec. 5, Figure 1): with psi
parameters on a device, mixed-precision Adam keeps 2 psi bytes of weights, 2 psi of gradients
and K psi of optimizer states (K = 12: fp32 master weights, momentum and variance);
stage 1 shards the optimizer states over the N_d data-parallel ranks, stage 2 also the
gradients, stage 3 also the weights:
    stage 0: (2 + 2 + K) psi       stage 1: (2 + 2) psi + K psi / N_d
    stage 2: 2 psi + (2 + K) psi / N_d     stage 3: (2 + 2 + K) psi / N_d
(7.5B parameters, N_d = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.) Stage 3 also holds the
largest layer's gathered weights and gradients while it computes: 4 bytes per parameter of
it, as DeepSpeed's estimate_zero3_model_states_mem_needs counts (4 L + 18 psi / N_d there,
with its own 18-byte convention: this module keeps ZeRO's 16).
Activations: each micro-batch in flight keeps every layer's saved activations; with
recomputation (activation checkpointing) only each layer's input plus one layer's full set.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.plan.cluster import Precision


def model_state_bytes(params: float, precision: Precision, stage: int, dp: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per device (ZeRO's formulas above)."""
    w, g, k = precision.weight_bytes, precision.weight_bytes, precision.optimizer_bytes
    return {
        "weights": w * params / (dp if stage >= 3 else 1),
        "gradients": g * params / (dp if stage >= 2 else 1),
        "optimizer": k * params / (dp if stage >= 1 else 1),
    }


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    temporaries: float          # ZeRO-3's gathered layer; the largest layer's recomputed activations

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.temporaries

    def to_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "temporaries": self.temporaries, "total": self.total}


def in_flight(schedule: str, stages: int, microbatches: int, stage_index: int = 0) -> float:
    """Micro-batches whose activations a pipeline stage holds at its peak: GPipe keeps all m;
    1F1B keeps p - k on stage k (the first stage p: Narayanan et al., arXiv 2104.04473,
    sec. 2.2.1); interleaved 1F1B keeps p(1 + (p-1)/(p v)) on the first stage (same paper,
    sec. 2.2.2, with v = 2 chunks here)."""
    if stages <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "interleaved":
        return min(float(microbatches), stages * (1 + (stages - 1) / (stages * 2)))
    return float(min(microbatches, stages - stage_index))
