"""Backends: the ways kiln can run a model, each built the same way and measured side by side.

A backend is named like `inductor` or `inductor:mode=max-autotune-no-cudagraphs,freezing=1`
(name, then options). Every backend takes `passes=1`, which first runs kiln's graph passes
(kiln.compile.default_passes; channels-last when the graph has 2-D convolutions) and hands the
optimised graph to the backend instead of the model. One registry (`BACKENDS`) holds them:

- eager: the model as is (the baseline). `dtype=bf16` runs it under bfloat16 autocast.
- export: torch.export, saved to a .pt2 file and loaded back, run as its module.
- inductor: torch.compile; `mode` (default, max-autotune-no-cudagraphs), `freezing=1`
  (weights become constants: oneDNN prepacking, constant folding), `dtype=bf16`.
- onnxruntime: ONNX export (dynamo) and an InferenceSession; `level` (basic, extended, all:
  ORT's default), `threads` (intra-op; default torch's thread count) and `dtype=int8`:
  ONNX Runtime's quantize_dynamic (its own int8 scales) for a float model, QDQ with kiln's
  scales for a kiln-quantized one (kiln.compile.int8).
- torchao: real int8 Linears compiled with freezing into oneDNN int8 kernels
  (kiln.compile.int8): a kiln-quantized model's integer layers with kiln's own scales, or every
  Linear of a float model with per-channel weights and per-token activations.
- torch.ao: torch.ao's quantize_dynamic (qint8 Linears, eager), the classic int8 peer.
- openvino: ov.convert_model of the torch.export program on OpenVINO's CPU plugin; `threads`,
  and `dtype=int8`: NNCF's post-training quantization calibrated on the caller's calibration
  batches (kiln.compile.openvino).

An option whose value names it may be given bare: `openvino:int8` is `openvino:dtype=int8`.

For a kiln-quantized (fake-quantized) model, "eager" is the fake-quantized model, and every
backend is checked against it.

Each has a precision, and so a tolerance against eager (`TOLERANCE`): a candidate whose
outputs are further from eager's is rejected with its error in the report.
"""
from __future__ import annotations

import copy
import enum
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kiln.compile import default_passes, optimize
from kiln.compile.int8 import ORT_QDQ, TORCHAO, Int8Target, build_torch_ao, build_torchao, is_fake_quantized, lower_int8
from kiln.compile.openvino import build_openvino
from kiln.compile.runtime import Example, Frozen, OrtModule, fresh_frame, onnx_bytes
from kiln.errors import KilnError, first_line
from kiln.graph.capture import capture
from kiln.models.loaded import LoadedModel
from kiln.registry import Registry


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


# max |out - eager| / max |eager| over the outputs (kiln.compile.verify.relative_error).
# fp32: reassociated sums and fused kernels stay around 1e-6, so 1e-4 leaves room and still
# catches a wrong kernel; bf16 keeps 8 mantissa bits (2^-8 = 4e-3 per rounding, a few percent
# after a deep network); int8 per-token/per-channel rounding lands near 1e-2 on MiniLM.
TOLERANCE = {Precision.FP32: 1e-4, Precision.BF16: 5e-2, Precision.INT8: 1e-1}


@dataclass(frozen=True)
class BackendSpec:
    """`name:key=value,...` parsed: which backend, with which options."""
    name: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.options) if self.options else "")

    def opts(self) -> dict[str, str]:
        return dict(self.options)


@dataclass(frozen=True)
class Backend:
    build: Callable[[nn.Module, Example, dict], Callable]
    options: dict[str, tuple[str, ...]]          # option -> allowed values ("*" = any integer)
    precision: Callable[[dict], Precision] = lambda o: Precision.BF16 if o.get("dtype") == "bf16" else Precision.FP32
    requires: str = ""                           # the Python package it needs
    doc: str = ""
    # the int8 kernels it runs a kiln-quantized model's integer layers on (None: it does not)
    lowers: Callable[[dict], Int8Target | None] = lambda o: None
    # whether it calibrates on data (the caller's calibration batches) with these options
    calibrates: Callable[[dict], bool] = lambda o: False


BACKENDS: Registry[Backend] = Registry("backend")
COMMON = {"passes": ("0", "1")}


def parse_backend(text: str) -> BackendSpec:
    """'inductor:mode=default,freezing=1' -> BackendSpec; unknown names, options or values are
    one-line errors naming what is accepted."""
    name, _, rest = text.strip().partition(":")
    backend = BACKENDS.get(name)
    allowed = {**COMMON, **backend.options}
    options = []
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        named = [k for k, v in allowed.items() if item in v]
        if not sep and len(named) == 1:        # a bare value that names its option: 'int8'
            key, sep, value = named[0], "=", item
        if not sep or key not in allowed:
            raise KilnError(f"backend {name}: unknown option {item!r}; options: "
                            f"{', '.join(f'{k}=' + '|'.join(v) for k, v in allowed.items())}")
        if allowed[key] != ("*",) and value not in allowed[key]:
            raise KilnError(f"backend {name}: {key} must be one of {', '.join(allowed[key])}, got {value!r}")
        if allowed[key] == ("*",) and not (value.isdigit() and int(value) >= 1):
            raise KilnError(f"backend {name}: {key} must be a positive integer, got {value!r}")
        options.append((key, value))
    return BackendSpec(name, tuple(sorted(options)))


def precision_of(spec: BackendSpec) -> Precision:
    return BACKENDS.get(spec.name).precision(spec.opts())


def missing_package(spec: BackendSpec) -> str | None:
    """The package a backend needs and this Python lacks, or None."""
    import importlib.util

    need = BACKENDS.get(spec.name).requires
    return need if need and importlib.util.find_spec(need) is None else None


def calibrates(spec: BackendSpec) -> bool:
    """Whether the backend, with these options, calibrates on data."""
    return BACKENDS.get(spec.name).calibrates(spec.opts())


def build(spec: BackendSpec, model: nn.Module, loaded: LoadedModel, calibration: tuple = ()) -> Callable:
    """A callable running `model` on `loaded`'s inputs through `spec`; built and run once, so
    an export or compile failure surfaces here as a KilnError naming the backend.
    `calibration`: input batches (each a tensor or a dict of keyword inputs) for backends that
    calibrate (none given: they calibrate on `loaded`'s example inputs)."""
    backend = BACKENDS.get(spec.name)
    if need := missing_package(spec):
        raise KilnError(f"{spec.label}: {need} is not installed")
    opts = spec.opts()
    batches = tuple(Example((), dict(b)) if isinstance(b, dict) else Example(tuple(b) if isinstance(b, (tuple, list))
                                                                             else (b,)) for b in calibration)
    example = Example(tuple(loaded.example_inputs), dict(loaded.example_kwargs) or None, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # deep-copying torch's pytree specs warns
        source = copy.deepcopy(model).eval()
    try:
        if opts.get("passes") == "1":
            source = optimised_module(source, loaded)
        fn = backend.build(source, example, opts)
        example.call(fn)
    except KilnError as exc:
        raise KilnError(f"{spec.label}: {exc}") from None
    except Exception as exc:
        raise KilnError(f"{spec.label}: {type(exc).__name__}: {first_line(exc)}") from None
    return fn


def optimised_module(model: nn.Module, loaded: LoadedModel) -> nn.Module:
    """kiln's default graph passes on the captured model, as a runnable module."""
    import dataclasses


    graph = capture(dataclasses.replace(loaded, model=model))
    has_conv2d = any(n.op in ("conv2d", "convolution") and len(n.shape) == 4 for n in graph.ops)
    return optimize(graph, default_passes(channels_last=has_conv2d)).graph.module()


class _Autocast:
    """Run `fn` under no_grad and CPU bfloat16 autocast."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.fn(*args, **kwargs)


def _no_grad(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return run


def _dtype(fn: Callable, opts: dict) -> Callable:
    return _Autocast(fn) if opts.get("dtype") == "bf16" else _no_grad(fn)


BACKENDS.register("eager")(Backend(
    build=lambda model, example, opts: _dtype(model, opts), options={"dtype": ("fp32", "bf16")},
    doc="the model as is"))


def _export_build(model: nn.Module, example: Example, opts: dict) -> Callable:
    with torch.no_grad():
        program = torch.export.export(model, example.args, example.kwargs or {}, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.pt2")
        torch.export.save(program, path)
        loaded = torch.export.load(path)
    return _no_grad(loaded.module())


BACKENDS.register("export")(Backend(build=_export_build, options={}, doc="torch.export, saved and reloaded"))


def _inductor_build(model: nn.Module, example: Example, opts: dict) -> Callable:
    mode = opts.get("mode", "default")
    kwargs = {} if mode == "default" else {"mode": mode}
    if opts.get("freezing") == "1":
        fn = Frozen(model, mode=kwargs.get("mode"))
    else:
        fn = torch.compile(fresh_frame(model), **kwargs)
    return _dtype(fn, opts)


BACKENDS.register("inductor")(Backend(
    build=_inductor_build,
    options={"mode": ("default", "max-autotune-no-cudagraphs"), "freezing": ("0", "1"), "dtype": ("fp32", "bf16")},
    doc="torch.compile (inductor)"))


def _ort_build(model: nn.Module, example: Example, opts: dict) -> Callable:
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    int8, disabled = opts.get("dtype") == "int8", ()
    if int8 and is_fake_quantized(model):     # QDQ with kiln's scales, not ORT's own quantize_dynamic
        model, int8 = lower_int8(model, example, ORT_QDQ), False
        # on a 2-D input ORT first fuses MatMul + Add into a float Gemm, which its QDQ fusion
        # then leaves in float; without it each QDQ matmul becomes MatMulIntegerToFloat
        disabled = ("MatMulAddFusion",)
    data, names = onnx_bytes(model, example, int8)
    threads = int(opts.get("threads", torch.get_num_threads()))
    return OrtModule(data, names, threads, level=levels[opts.get("level", "all")], disabled_optimizers=disabled)


def _int8_if(opts: dict) -> Precision:
    return Precision.INT8 if opts.get("dtype") == "int8" else Precision.FP32


BACKENDS.register("onnxruntime")(Backend(
    build=_ort_build, options={"level": ("basic", "extended", "all"), "threads": ("*",), "dtype": ("fp32", "int8")},
    precision=_int8_if, requires="onnxruntime", doc="ONNX export + ONNX Runtime",
    lowers=lambda o: ORT_QDQ if o.get("dtype") == "int8" else None))

BACKENDS.register("torchao")(Backend(
    build=build_torchao, options={}, precision=lambda o: Precision.INT8, requires="torchao",
    doc="real int8 Linears (torchao Int8Tensor, inductor freezing, oneDNN)", lowers=lambda o: TORCHAO))

BACKENDS.register("torch.ao")(Backend(
    build=build_torch_ao, options={}, precision=lambda o: Precision.INT8,
    doc="torch.ao quantize_dynamic (qint8 Linears, eager)"))

BACKENDS.register("openvino")(Backend(
    build=build_openvino, options={"threads": ("*",), "dtype": ("fp32", "int8")}, precision=_int8_if,
    requires="openvino", doc="torch.export + OpenVINO CPU plugin; int8 by NNCF post-training quantization",
    calibrates=lambda o: o.get("dtype") == "int8"))
