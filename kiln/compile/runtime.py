"""Runtime plumbing the backends share: example inputs, inductor with freezing, ONNX export and
an ONNX Runtime session behind the model's call signature.

onnx, onnxscript and onnxruntime are imported inside the functions that need them: importing
kiln.compile stays light.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kiln.errors import KilnError, first_line


@dataclass(frozen=True)
class Example:
    """Inputs the model runs on: `model(*args, **kwargs)`; used to compile, export and warm up.
    `calibration`: other Examples (real data where the caller has it) for backends that
    calibrate int8 scales (openvino:dtype=int8)."""

    args: tuple = ()
    kwargs: dict | None = None
    calibration: tuple = ()

    def call(self, fn: Callable) -> Any:
        with torch.no_grad():
            return fn(*self.args, **(self.kwargs or {}))

    def feeds(self, names: list[str]) -> dict[str, Any]:
        """numpy inputs for ONNX graph inputs `names`: positional ones in order, then by name."""
        kwargs = self.kwargs or {}
        rest = names[len(self.args):]
        return {**{n: a.numpy() for n, a in zip(names, self.args)}, **{n: kwargs[n].numpy() for n in rest}}


# ---------------------------------------------------------------- torch (inductor)

class Frozen(nn.Module):
    """`torch.compile(module)` run under no_grad with inductor's freezing on, for inference.

    Freezing is applied per call, not through `torch.compile(options=...)`: in torch 2.13
    `options={"freezing": True}` compiles without freezing (checked: no `_frozen_param`
    in the output code), while `torch._inductor.config.patch(freezing=True)` around the
    call freezes, also on recompiles for new shapes. The weights are baked in at compile
    time: changing `module`'s parameters afterwards is not seen.
    """

    def __init__(self, module: nn.Module, inductor: dict[str, Any] | None = None, mode: str | None = None):
        super().__init__()
        self.module = module
        self.inductor = {"freezing": True, **(inductor or {})}
        # not a submodule: no duplicate state
        self.__dict__["_compiled"] = torch.compile(fresh_frame(module), **({"mode": mode} if mode else {}))

    def forward(self, *args, **kwargs):
        with torch.no_grad(), torch._inductor.config.patch(self.inductor):
            return self._compiled(*args, **kwargs)


def fresh_frame(module: nn.Module) -> nn.Module:
    """`module` behind a forward of its own code object. Dynamo caches compiled code per code
    object and, with nn modules inlined, guards on the parameters as inputs rather than on
    the module: two compiles of one model class (plain and frozen, or two modes) would
    otherwise share a cache entry, and the second would silently run the first's code."""
    namespace: dict = {}
    exec("def forward(self, *args, **kwargs):\n    return self.inner(*args, **kwargs)\n", namespace)
    wrapper = type("Fresh", (nn.Module,), {"forward": namespace["forward"]})()
    wrapper.inner = module
    return wrapper


# ---------------------------------------------------------------- ONNX Runtime

class OrtModule(nn.Module):
    """An ONNX Runtime session behind the model's call signature; returns torch tensors."""

    def __init__(self, onnx_bytes: bytes, names: list[str], threads: int, level: Any = None,
                 disabled_optimizers: tuple[str, ...] = ()):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: spinning threads would steal the cores from whatever
        # runs next (torch, another session) on a machine with few of them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.onnx_bytes = onnx_bytes
        self.names = names
        self.disabled_optimizers = disabled_optimizers
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(disabled_optimizers) or None)

    def forward(self, *args, **kwargs):
        outs = self.session.run(None, Example(args, kwargs).feeds(self.names))
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)


def export_onnx(model: nn.Module, example: Example, path: str) -> list[str]:
    """torch.onnx.export (dynamo exporter) with a dynamic batch dimension; the input names."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise KilnError("the ONNX exporter needs onnxscript (pip install onnxscript)") from None
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = ({k: {0: batch} for k in example.kwargs} if example.kwargs and not example.args
              else [{0: batch} for _ in example.args])
    sizes = {x.shape[0] for x in (*example.args, *(example.kwargs or {}).values()) if isinstance(x, torch.Tensor)}
    if len(sizes) != 1:
        shapes = None            # inputs without one shared batch dimension (a GNN's graph): static
    try:
        with torch.no_grad():
            prog = torch.onnx.export(model, example.args, kwargs=example.kwargs, dynamo=True,
                                     dynamic_shapes=shapes, verbose=False)
        prog.save(path)
    except Exception as exc:
        root = exc.__cause__ or exc   # the exporter's own message is a generic "step n/3 failed"
        reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(root))   # it colours its messages
        raise KilnError(f"torch.onnx.export failed: {type(root).__name__}: {reason}") from None
    import onnx

    return [i.name for i in onnx.load(path, load_external_data=False).graph.input]


def explicit_attention(model: nn.Module) -> None:
    """Switch Hugging Face submodules to "eager" (matmul, softmax, matmul) attention, in place.

    The same maths as SDPA (MiniLM's embeddings agree to 2e-7), but ONNX Runtime runs it
    faster than the exporter's decomposition of SDPA and its mask: on zoo:minilm, batch 32 x
    128, 2 threads, 505 vs 609 ms in fp32 and 282 vs 386 ms with quantize_dynamic.
    """
    for mod in model.modules():
        if callable(getattr(mod, "set_attn_implementation", None)):
            mod.set_attn_implementation("eager")


def onnx_bytes(model: nn.Module, example: Example, int8: bool) -> tuple[bytes, list[str]]:
    """The model exported to ONNX (explicit attention; `model` must be the caller's private
    copy), with `int8` passed through ONNX Runtime's quantize_dynamic: int8 weights per
    output channel, uint8 activations per tensor scaled at run time. (bytes, input names)."""
    explicit_attention(model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "model.onnx")
        names = export_onnx(model, example, fp32)
        path = fp32
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = os.path.join(tmp, "model.int8.onnx")
            # per-channel int8 weights: ORT's most accurate dynamic setting; reduce_range is only
            # needed on CPUs without VNNI (this one has it).
            quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)
        with open(path, "rb") as f:
            return f.read(), names
