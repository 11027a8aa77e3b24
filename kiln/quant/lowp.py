"""Real int8 inference on CPU: every nn.Linear runs as an int8 x int8 -> int32 matmul.

Unlike kiln's other quantizers (fake quantization: round, then compute in fp32), these
backends store the weights as 8-bit integers and run integer kernels, so they are faster
and smaller, not just a model of the error. One verb, `to_int8(model, backend, ...)`, and
one registry of backends (`BACKENDS`), one config (`LowpConfig`):

- "torchao" (kiln's path): torchao's `Int8DynamicActivationInt8WeightConfig`, int8 weights
  per output channel and int8 activations per token, scaled at run time (symmetric), then
  torch.compile (inductor) with freezing. Freezing is what makes it fast: it turns the
  weights into constants, so inductor's SmoothQuant pattern rewrites
  `_int_mm -> * x_scale -> * w_scale` into oneDNN's `qlinear_pointwise` on a prepacked
  weight (VNNI int8 dot products here), and fuses the per-token quantization into the
  preceding elementwise kernel. Without freezing inductor calls plain `aten._int_mm`.
  Optionally SmoothQuant first (`LowpConfig.smoothquant_alpha`, calibrated): same kernels,
  the activation pre-scale fuses into the quantization. Asymmetric activations would be
  more accurate still but miss the oneDNN rewrite (on MiniLM 250 vs 154 ms per batch).
- "torch.ao": `torch.ao.quantization.quantize_dynamic` (qint8 Linear, fbgemm, eager):
  per-tensor weights, per-tensor dynamic activations. Deprecated upstream; kept as the
  classic peer.
- "ort": export to ONNX, ONNX Runtime's `quantize_dynamic` (int8 per-channel weights,
  dynamic uint8 activations per tensor), run by an InferenceSession.

`to_fp32(model, runtime)` builds the fp32 peers ("eager", "inductor", "ort") the same way,
so a benchmark compares like with like. torchao and onnxruntime are imported inside the
functions: importing this module stays light.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from kiln.errors import KilnError, first_line
from kiln.registry import Registry


@dataclass(frozen=True)
class Example:
    """Inputs the model runs on: `model(*args, **kwargs)`; used to compile, export and warm up."""

    args: tuple = ()
    kwargs: dict | None = None

    def call(self, fn: Callable) -> Any:
        with torch.no_grad():
            return fn(*self.args, **(self.kwargs or {}))

    def feeds(self, names: list[str]) -> dict[str, Any]:
        """numpy inputs for ONNX graph inputs `names`: positional ones in order, then by name."""
        kwargs = self.kwargs or {}
        rest = names[len(self.args):]
        return {**{n: a.numpy() for n, a in zip(names, self.args)}, **{n: kwargs[n].numpy() for n in rest}}


@dataclass(frozen=True)
class LowpConfig:
    """Which backend builds the model, and its knobs.

    threads: ONNX Runtime's intra-op threads (torch uses torch.get_num_threads()).
    smoothquant_alpha: "torchao" only; migrate activation outliers into the weights first
    (SmoothQuant, Xiao et al. 2022, s_j = max|X_j|^a / max|W_j|^(1-a), torchao's prototype),
    calibrated on `calibration` batches. None: no smoothing.
    """

    backend: str = "torchao"
    threads: int = 2
    smoothquant_alpha: float | None = None

    def __post_init__(self):
        if self.threads < 1:
            raise KilnError(f"{self.backend}: threads must be >= 1, got {self.threads}")
        if self.smoothquant_alpha is not None:
            if self.backend != "torchao":
                raise KilnError(f"{self.backend}: smoothquant_alpha is only for backend torchao")
            if not 0.0 < self.smoothquant_alpha <= 1.0:
                raise KilnError(f"torchao: smoothquant_alpha must be in (0, 1], got {self.smoothquant_alpha}")


Builder = Callable[[nn.Module, Example, LowpConfig, list[Example]], nn.Module]
BACKENDS: Registry[Builder] = Registry("int8 backend")
FP32: Registry[Builder] = Registry("fp32 runtime")


def to_int8(model: nn.Module, config: LowpConfig | str = "torchao", example_args: tuple = (),
            example_kwargs: dict | None = None, calibration: Sequence[Any] = ()) -> nn.Module:
    """An inference-only copy of `model` whose Linears compute in int8 on the CPU.

    `config` is a LowpConfig or just a backend name. `example_args`/`example_kwargs` are
    inputs it runs on (to compile, export, warm up); `calibration` holds batches for
    SmoothQuant, each a dict of keyword inputs, a tuple of positional ones or one tensor.
    The caller's model is left untouched. An unknown or missing backend, or a failed
    export or compile, is a KilnError naming the backend.
    """
    config = LowpConfig(config) if isinstance(config, str) else config
    build = BACKENDS.get(config.backend)
    batches = [_as_example(b) for b in calibration]
    if config.smoothquant_alpha is not None and not batches:
        raise KilnError("torchao: smoothquant_alpha needs calibration batches")
    return _built(config, build, model, Example(example_args, example_kwargs), batches)


def to_fp32(model: nn.Module, runtime: str = "eager", example_args: tuple = (),
            example_kwargs: dict | None = None, threads: int = 2) -> nn.Module:
    """The fp32 peer of `to_int8`: "eager", "inductor" (torch.compile, freezing) or "ort"."""
    build = FP32.get(runtime)
    return _built(LowpConfig(runtime, threads), build, model, Example(example_args, example_kwargs), [])


def _as_example(batch: Any) -> Example:
    if isinstance(batch, dict):
        return Example(kwargs=batch)
    return Example(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))


def _built(config: LowpConfig, build: Builder, model: nn.Module, example: Example,
           calibration: list[Example]) -> nn.Module:
    name = config.backend
    source = copy.deepcopy(model).eval()
    try:
        out = build(source, example, config, calibration)
        example.call(out)   # compile / create the session now, so failures surface here
    except KilnError:
        raise
    except ImportError as exc:
        raise KilnError(f"{name}: a package it needs is not installed ({first_line(exc)})") from None
    except Exception as exc:
        raise KilnError(f"{name}: {type(exc).__name__}: {first_line(exc)}") from None
    return out


# ---------------------------------------------------------------- torch (inductor) runtimes

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


@FP32.register("eager")
def _fp32_eager(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    return model


@FP32.register("inductor")
def _fp32_inductor(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    return Frozen(model)


@BACKENDS.register("torchao")
def _torchao(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise KilnError("torchao: torchao is not installed (pip install torchao==0.18.0)") from None
    # set_inductor_config=False: quantize_ would otherwise change process-wide inductor
    # settings (coordinate-descent tuning...) for every later compile in the process.
    base = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if config.smoothquant_alpha is None:
        quantize_(model, base)
    else:
        from torchao.prototype.smoothquant import SmoothQuantConfig

        quantize_(model, SmoothQuantConfig(base, step="prepare", alpha=config.smoothquant_alpha))
        for batch in calibration:
            batch.call(model)          # observers record each Linear's per-channel max|X|
        quantize_(model, SmoothQuantConfig(base, step="convert", alpha=config.smoothquant_alpha))
    # A lower bar (default 50 on CPU) for keeping an elementwise result instead of recomputing
    # it: each int8 linear reads its input twice (per-token max, then quantize); with 16 the
    # dequantize + bias before it is kept in a row buffer (GELU's erf is still computed twice).
    # 163 vs 175 ms per batch (two copies of each, interleaved, 24 rounds; zoo:minilm 32 x 128,
    # 2 threads); fp32 gains nothing.
    return Frozen(model, {"realize_opcount_threshold": 16})


@BACKENDS.register("torch.ao")
def _torch_ao(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # its deprecation notice, once per call
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------- ONNX Runtime

class OrtModule(nn.Module):
    """An ONNX Runtime session behind the model's call signature; returns torch tensors."""

    def __init__(self, onnx_bytes: bytes, names: list[str], threads: int, level: Any = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise KilnError("ort: onnxruntime is not installed (pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: spinning threads would steal the cores from whatever
        # runs next (torch, another session) on a machine with few of them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.onnx_bytes = onnx_bytes
        self.names = names
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])

    def forward(self, *args, **kwargs):
        outs = self.session.run(None, Example(args, kwargs).feeds(self.names))
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)


def export_onnx(model: nn.Module, example: Example, path: str) -> list[str]:
    """torch.onnx.export (dynamo exporter) with a dynamic batch dimension; the input names."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise KilnError("ort: the ONNX exporter needs onnxscript (pip install onnxscript)") from None
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
        raise KilnError(f"ort: torch.onnx.export failed: {type(root).__name__}: {reason}") from None
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


def _ort(model: nn.Module, example: Example, threads: int, quantize: bool) -> nn.Module:
    explicit_attention(model)   # `model` is _built's private copy
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "model.onnx")
        names = export_onnx(model, example, fp32)
        path = fp32
        if quantize:
            try:
                from onnxruntime.quantization import QuantType, quantize_dynamic
            except ImportError:
                raise KilnError("ort: onnxruntime is not installed (pip install onnxruntime)") from None
            path = os.path.join(tmp, "model.int8.onnx")
            # per-channel int8 weights: ORT's most accurate dynamic setting; reduce_range is only
            # needed on CPUs without VNNI (this one has it).
            quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)
        with open(path, "rb") as f:
            return OrtModule(f.read(), names, threads)


@FP32.register("ort")
def _fp32_ort(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    return _ort(model, example, config.threads, quantize=False)


@BACKENDS.register("ort")
def _int8_ort(model: nn.Module, example: Example, config: LowpConfig, calibration: list[Example]) -> nn.Module:
    return _ort(model, example, config.threads, quantize=True)


# ---------------------------------------------------------------- inspection

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
