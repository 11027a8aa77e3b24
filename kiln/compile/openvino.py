"""OpenVINO: the model converted to OpenVINO's graph (from torch.export) and run by its CPU plugin,
in fp32 or in int8 through NNCF's post-training quantization.

- fp32: `ov.convert_model` of the torch.export program (every dimension left dynamic), compiled
  for the CPU with `INFERENCE_PRECISION_HINT=f32`: without it OpenVINO runs fp32 models in bf16
  on CPUs with native bf16, which would leave fp32's tolerance.
- int8: `nncf.quantize` on that graph with calibration batches (kiln's, from the dataset's
  training split, when the caller has them; else the example inputs): FakeQuantize nodes on the
  inputs of convolutions and matmuls, which the CPU plugin runs as int8 kernels (VNNI here).
  Transformers are quantized with NNCF's `ModelType.TRANSFORMER` (it keeps the softmax/layer-norm
  paths float, NNCF's advice for accuracy).

`OvModule` holds the (shape-generic) ov.Model and compiles it once per input shape, so a file
saved at one batch runs at another (kiln bench on real batches). Its IR is written with
`compress_to_fp16=False` (ov.save_model's default halves fp32 weights to fp16).
openvino and nncf are imported inside the functions: importing kiln.compile stays light.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kiln.compile.int8 import is_fake_quantized
from kiln.compile.runtime import Example
from kiln.errors import KilnError, first_line

XML, BIN = "model.xml", "model.bin"
# NNCF's own default subset: its statistics stop after this many calibration samples
CALIBRATION_SAMPLES = 300


def _feeds(example: Example, names: list[str]) -> list:
    """Inputs in the converted model's order: positional arguments, then keyword ones by name."""
    kwargs = example.kwargs or {}
    rest = names[len(example.args):]
    try:
        return [a.numpy() for a in example.args] + [kwargs[n].numpy() for n in rest]
    except KeyError as exc:
        raise KilnError(f"openvino: the model has no input for {exc.args[0]!r}") from None


class OvModule(nn.Module):
    """An ov.Model behind the model's call signature, compiled for the CPU per input shape;
    returns torch tensors."""

    def __init__(self, model: Any, threads: int):
        super().__init__()
        self.ov_model = model
        self.threads = threads
        self.names = [i.get_any_name() for i in model.inputs]
        self._compiled: dict[tuple, Any] = {}

    def compiled_for(self, feeds: list) -> Any:
        shapes = tuple(tuple(f.shape) for f in feeds)
        if shapes not in self._compiled:
            import openvino as ov

            model = self.ov_model.clone()
            # static shapes: the CPU plugin plans memory and picks kernels once, not per call
            model.reshape({i: ov.PartialShape(list(s)) for i, s in zip(model.inputs, shapes)})
            config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads,
                      "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            self._compiled[shapes] = ov.Core().compile_model(model, "CPU", config)
        return self._compiled[shapes]

    def forward(self, *args, **kwargs):
        feeds = _feeds(Example(args, kwargs), self.names)
        try:
            compiled = self.compiled_for(feeds)
            result = compiled(feeds)
        except RuntimeError as exc:     # OpenVINO's first line names only its own source file
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "incompatible" in ln or "mismatch" in ln), lines[-1] if lines else "")
            raise KilnError(f"OpenVINO cannot run inputs of shapes {[list(f.shape) for f in feeds]}: {why}") from None
        outs = [torch.from_numpy(result[o].copy()) for o in compiled.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, directory: Path) -> None:
        """model.xml + model.bin, weights kept in fp32 (int8 ones stay int8)."""
        import openvino as ov

        ov.save_model(self.ov_model, str(Path(directory) / XML), compress_to_fp16=False)


def load_ir(directory: Path, threads: int | None = None) -> OvModule:
    """The OvModule of a saved model.xml/model.bin."""
    import openvino as ov

    path = Path(directory) / XML
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise KilnError(f"{path}: not a readable OpenVINO IR: {first_line(exc)}") from None
    return OvModule(model, threads or torch.get_num_threads())


def convert(model: nn.Module, example: Example) -> tuple[Any, bool]:
    """(the model as an ov.Model converted from its torch.export program, whether its batch is
    dynamic). The program is exported with a dynamic batch dimension where torch.export allows
    it: a static program's reshapes keep the example's batch as constants (MiniLM's attention
    views), and OpenVINO then refuses any other batch."""
    import openvino as ov

    kwargs = example.kwargs or {}
    tensors = [x for x in (*example.args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    program = None
    if tensors and all(x.dim() for x in tensors) and len({x.shape[0] for x in tensors}) == 1:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        shapes = ({k: {0: batch} for k in kwargs} if kwargs and not example.args else
                  tuple({0: batch} for _ in example.args) if not kwargs else None)
        # traced at a batch of 2 at least: torch.export specialises a batch of 1 to a constant
        grow = (lambda x: x.repeat(2, *([1] * (x.dim() - 1)))) if tensors[0].shape[0] == 1 else (lambda x: x)
        if shapes is not None:
            try:
                with torch.no_grad():
                    program = torch.export.export(model, tuple(grow(a) for a in example.args),
                                                  {k: grow(v) for k, v in kwargs.items()}, dynamic_shapes=shapes,
                                                  strict=False)
            except Exception:        # specialised on the batch (a batch of 1, a data-dependent view): static
                program = None
    dynamic = program is not None
    if program is None:
        with torch.no_grad():
            program = torch.export.export(model, example.args, kwargs, strict=False)
    return ov.convert_model(program), dynamic


def rebatch(calibration: Sequence[Example], batch: int) -> tuple[Example, ...]:
    """The calibration inputs cut into batches of exactly `batch` samples (a static-shape graph
    runs no other); the remainder is dropped."""
    if not calibration:
        return ()
    first = calibration[0]
    keys = list((first.kwargs or {}).keys())

    def cat(get):
        return torch.cat([get(e) for e in calibration])

    args = [cat(lambda e, i=i: e.args[i]) for i in range(len(first.args))]
    kwargs = {k: cat(lambda e, k=k: e.kwargs[k]) for k in keys}
    total = len(args[0]) if args else len(next(iter(kwargs.values())))
    return tuple(Example(tuple(a[i:i + batch] for a in args), {k: v[i:i + batch] for k, v in kwargs.items()} or None)
                 for i in range(0, total - batch + 1, batch))


def is_transformer(model: nn.Module) -> bool:
    """Whether NNCF should treat it as a transformer: it has attention modules."""
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())


def quantize(ov_model: Any, calibration: Sequence[Example], transformer: bool) -> Any:
    """NNCF post-training quantization (int8 FakeQuantize, symmetric: its PERFORMANCE preset) on
    `calibration`'s inputs."""
    import contextlib
    import io
    import logging

    import nncf

    names = [i.get_any_name() for i in ov_model.inputs]
    samples = sum(_batch_size(e) for e in calibration)
    logging.getLogger("nncf").setLevel(logging.ERROR)     # its info lines
    dataset = nncf.Dataset(list(calibration), lambda e: _feeds(e, names))
    with contextlib.redirect_stdout(io.StringIO()):       # its progress bars (rich, on stdout): kiln's own output
        return nncf.quantize(ov_model, dataset, subset_size=max(1, min(samples, CALIBRATION_SAMPLES)),
                             model_type=nncf.ModelType.TRANSFORMER if transformer else None)


def _batch_size(example: Example) -> int:
    tensors = [x for x in (*example.args, *(example.kwargs or {}).values()) if isinstance(x, torch.Tensor)]
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def build_openvino(model: nn.Module, example: Example, opts: dict) -> OvModule:
    """The `openvino` backend: fp32, or int8 (`dtype=int8`) quantized by NNCF on
    `example.calibration` (the example itself when it has none). int8 is refused for a
    kiln-quantized model: NNCF would quantize its fake-quantized layers again with its own scales
    (fp32 runs the fake-quantized model as it is)."""
    int8 = opts.get("dtype") == "int8"
    if int8 and is_fake_quantized(model):
        raise KilnError("NNCF quantizes with its own scales, not kiln's: use backend torchao or "
                        "onnxruntime:dtype=int8 for a quantized model")
    ov_model, dynamic = convert(model, example)
    if int8:
        calibration = example.calibration or (example,)
        if not dynamic and example.calibration:
            calibration = rebatch(calibration, _batch_size(example)) or (example,)
        ov_model = quantize(ov_model, calibration, is_transformer(model))
    return OvModule(ov_model, int(opts.get("threads", torch.get_num_threads())))


def int8_ops(ov_model: Any) -> dict[str, int]:
    """How many FakeQuantize nodes and int8/uint8 constants an ov.Model holds (0 and 0: none)."""
    import openvino as ov

    ops = ov_model.get_ordered_ops()
    fq = sum(op.get_type_name() == "FakeQuantize" for op in ops)
    consts = sum(op.get_type_name() == "Constant" and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8)
                 for op in ops)
    return {"fake_quantize": fq, "int8_constants": consts}
