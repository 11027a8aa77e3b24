"""torch.utils.flop_counter on the eager model: the reference kiln's FLOPs are held against.

Three blind spots of flop_counter are filled so the reference is fair: the CPU fused attention
op gets the formula flop_counter uses for the GPU kernels (custom_mapping),
mixture-of-experts models run their experts as the eager loop (plain matmuls it can see)
instead of transformers' opaque grouped-matmul op, and oneDNN is off while it counts (on CPU
an LSTM otherwise runs as one fused oneDNN op that flop_counter counts as 0 FLOPs; without
it, the same op runs as the cells' matmuls, which it counts).

`export_path=True` runs the eager model on the code path torch.export takes: some models
branch on torch.compiler.is_exporting() (qwen3.5's gated delta rule solves a triangular
system eagerly, an op flop_counter does not count, but builds its inverse by substitution and
multiplies when exported), and kiln costs the exported program.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.analysis.flops import sdpa_custom_mapping
from kiln.models.loaded import LoadedModel


def eager_experts(model: torch.nn.Module) -> torch.nn.Module:
    """The model (a copy where it changes) running its mixture-of-experts as the eager loop of
    plain matmuls flop_counter sees, instead of transformers' opaque grouped-matmul op."""
    # Every module's config, not only the top one's: a vision-language model's text tower has
    # its own config (kimi_k25's MoE text model set grouped_mm while the top config said nothing).
    configs = [getattr(m, "config", None) for m in model.modules()]
    if any(getattr(c, "_experts_implementation", None) not in (None, "eager") for c in configs):
        model = copy.deepcopy(model)
        for module in model.modules():
            if hasattr(module, "config"):
                module.config._experts_implementation = "eager"
    return model


def flop_counter_flops(loaded: LoadedModel, count_cpu_attention: bool = True, export_path: bool = False) -> int:
    model = eager_experts(loaded.model)
    mapping = sdpa_custom_mapping() if count_cpu_attention else {}
    exporting = mock.patch("torch.compiler.is_exporting", return_value=True) if export_path else contextlib.nullcontext()
    # not under no_grad: flop_counter's module tracker trips on some models (deberta-v2) there
    with _without_onednn(), exporting, FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(*loaded.example_inputs, **loaded.example_kwargs)
    return counter.get_total_flops()


@contextlib.contextmanager
def _without_onednn():
    with contextlib.ExitStack() as stack:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the flags' note that TF32 on oneDNN needs an Intel GPU
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stack.close()
