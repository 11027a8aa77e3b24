"""`kiln compile`: choose a backend for a model at a batch size and write the choice down.

A compile directory holds compile.json (the source, the chosen backend, batch, precision,
threads), report.json (every candidate's latency, throughput, error and reason, plus the
roofline bound on the hardware profile and the achieved fraction of it) and, where the
backend produces a deployable file, that file: model.onnx (onnxruntime), program.pt2
(export) or model.xml + model.bin (openvino, OpenVINO IR). `load_compiled` reloads the OpenVINO
IR as written (an int8 one keeps the scales it was calibrated with) and rebuilds the other
backends from the source, so `kiln bench DIR` runs exactly what was chosen.

Backends that calibrate (openvino:dtype=int8) get CALIBRATION_SAMPLES inputs of the training
split of the source's dataset (kiln.train.evaluation.calibration_batches, seed 0); a source
without a dataset calibrates on its example inputs, and the report says which.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from kiln.analysis.report import analyze
from kiln.analysis.roofline import by_precision
from kiln.compile.auto import ORDER, Selection, at_batch, auto_candidates, select
from kiln.compile.backends import BACKENDS, Precision, build, calibrates, parse_backend, precision_of
from kiln.compile.int8 import is_fake_quantized, plan_int8
from kiln.compile.openvino import XML, load_ir
from kiln.errors import KilnError, first_line
from kiln.hardware.profiles import fraction_note
from kiln.io import atomic_dir, atomic_write_json, atomic_write_text, check_new_dir
from kiln.models.loaded import LoadedModel
from kiln.runs.artifact import load_source
from kiln.train.evaluation import calibration_batches, check_batches, evaluate_model, source_splits
from kiln.train.tasks import scored_by_own_loss

COMPILE_FILE = "compile.json"
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """What `kiln compile` measures: the candidate backends, the batch, the lowest precision a
    candidate may compute in, and the interleaved timing rounds."""

    backend: str = "auto"          # auto, or backends joined by '+', each NAME[:key=value,...]
    batch: int = 1
    precision: Precision = Precision.FP32
    rounds: int = 20

    def __post_init__(self):
        if self.batch < 1 or self.rounds < 1:
            raise KilnError(f"compile config: batch and rounds must be >= 1, got {self.batch} and {self.rounds}")
        candidates(self.backend, self.precision)   # unknown names and options fail before any work


def candidates(backend: str, precision: Precision) -> list[str]:
    """`auto`, one backend, or a comma-free list joined by '+': 'eager+onnxruntime:level=basic'."""
    names = auto_candidates(precision) if backend == "auto" else backend.split("+")
    for name in names:
        parse_backend(name)          # unknown names and options fail before any work
    if "eager" not in names:
        names = ["eager", *names]    # the baseline is always measured beside
    return names


def source_inputs(src: str, batch: int, dataset: str | None = None):
    """(Source, LoadedModel at `batch` running the source's model)."""

    source = load_source(src, dataset)
    loaded = dataclasses.replace(source.loaded, model=source.model)
    return source, at_batch(loaded, batch)


def roofline_of(loaded: LoadedModel, profile) -> dict:
    """FLOPs and bytes of one call at this batch and the roofline latency on `profile`
    (a HardwareProfile; None: no roofline), also at each precision against its own peak."""

    if profile is None:
        return {"note": "no hardware profile"}
    a = analyze(loaded, profile, measure_time=False)
    per = by_precision(a.graph, profile)
    return {"hardware": profile.name, "flops": a.flops, "bytes": a.cost.bytes, "roofline_s": a.roofline.latency_s,
            "bound": a.roofline.bound.value, "peak_flops": dict(profile.peak_flops),
            "roofline_s_by_precision": per["latency_s"], "precisions_at_fallback_peak": per["fallback"]}


def attach_roofline(report: dict, roof: dict) -> None:
    """Each measured candidate's achieved FLOP/s and fraction of the roofline bound at its own
    precision (a bf16 candidate against the bf16 peak); above 100%, the note that says why."""
    for c in report["candidates"]:
        bound = roof.get("roofline_s_by_precision", {}).get(c["precision"], roof.get("roofline_s"))
        if c.get("latency_s") and bound:
            c["achieved_flops"] = roof["flops"] / c["latency_s"]
            c["roofline_fraction"] = bound / c["latency_s"]
            if fraction_note(c["roofline_fraction"]):
                roof["note"] = fraction_note(c["roofline_fraction"])
    report["roofline"] = roof


def compile_run(src: str, config: CompileConfig = CompileConfig(), out: Path | None = None, hardware=None,
                progress: Callable[[str], None] = lambda s: None) -> tuple[dict, Selection]:
    """Measure the config's candidates on `src` and keep the fastest; `hardware` (a
    HardwareProfile or None) gives the roofline bound; `out` (optional) the directory to write."""
    prec = config.precision
    names = candidates(config.backend, prec)
    if out is not None:
        check_new_dir(out)
    source, loaded = source_inputs(src, config.batch)
    calibration, note = (), ""
    if any(calibrates(s) and ORDER.index(precision_of(s)) <= ORDER.index(prec) for s in map(parse_backend, names)):
        progress("calibration batches")
        calibration, note = calibration_inputs(source)
    sel = select(source.model, loaded, names, prec, rounds=config.rounds, progress=progress, calibration=calibration)
    report = {"src": src, "spec": source.spec, "precision": prec.value, **sel.to_dict()}
    if note:
        report["calibration"] = note
    if is_fake_quantized(source.model):
        report["quantized"] = quantized_layers(source.model, names, prec)
    progress("roofline")
    attach_roofline(report, roofline_of(loaded, hardware))
    if out is not None:
        _write(out, report, sel, source, loaded)
    return report, sel


def calibration_inputs(source) -> tuple[tuple, str]:
    """(CALIBRATION_SAMPLES inputs of the source's training split in batches, where they came
    from); no batches (the backends then calibrate on the example inputs) when the source has no
    dataset or its data does not fit the model."""
    if not source.dataset:
        return (), "example inputs (the source names no dataset)"
    try:
        splits = source_splits(source)
        batches = calibration_batches(splits, -(-CALIBRATION_SAMPLES // CALIBRATION_BATCH), CALIBRATION_BATCH, seed=0)
        check_batches(source.model.eval(), batches, f"dataset {source.dataset}")
    except KilnError as exc:
        return (), f"example inputs ({first_line(exc)})"
    samples = sum(len(next(iter(b.values()))) if isinstance(b, dict) else len(b) for b in batches)
    return tuple(batches), f"{samples} samples of {source.dataset}'s training split (seed 0)"


def quantized_layers(model, names: list[str], precision: Precision) -> dict:
    """For a kiln-quantized model: for each int8 candidate among `names` that lowers it, which
    layers run on real int8 kernels and which stay fake-quantized; one line each."""
    lowering = {}
    for name in names:
        spec = parse_backend(name)
        target = BACKENDS.get(spec.name).lowers(spec.opts())
        if precision is Precision.INT8 and target is not None:
            lowering[name] = plan_int8(model, target)
    if not lowering:
        n = len(plan_int8(model).int8)
        line = (f"fake quantization in every candidate (no candidate lowers it; --precision int8 "
                f"runs {n} of its layers on real int8 kernels)")
        return {"lines": [line], "backends": {}}
    return {"lines": [f"{name}: {plan.describe()}" for name, plan in lowering.items()],
            "backends": {name: plan.to_dict() for name, plan in lowering.items()}}


def _write(out: Path, report: dict, sel: Selection, source, loaded: LoadedModel) -> None:

    chosen = parse_backend(sel.chosen)
    meta = {"src": report["src"], "spec": report["spec"], "backend": sel.chosen, "batch": report["batch"],
            "precision": report["precision"], "threads": sel.threads}
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / COMPILE_FILE, meta)
        atomic_write_json(tmp / "report.json", report)
        fn = sel.fns[sel.chosen]
        if chosen.name == "onnxruntime":
            (tmp / "model.onnx").write_bytes(fn.onnx_bytes)
        elif chosen.name == "openvino":
            fn.save(tmp)
        elif chosen.name == "export":
            args, kwargs = tuple(loaded.example_inputs), dict(loaded.example_kwargs)
            with torch.no_grad():
                torch.export.save(torch.export.export(source.model.eval(), args, kwargs, strict=False),
                                  str(tmp / "program.pt2"))
        atomic_write_text(tmp / "README.txt", f"kiln compile of {report['src']}: backend {sel.chosen} at batch "
                                              f"{report['batch']}; reload with kiln.compile.run.load_compiled\n")


def is_compiled(path: Path) -> bool:
    return (Path(path) / COMPILE_FILE).is_file()


def load_compiled(path: str | Path, inputs: Callable[[object], LoadedModel] | None = None):
    """(the chosen backend's callable, the inputs it was built on, compile.json, the Source).
    `inputs(source)` may supply other inputs to build on (a real batch of the dataset)."""
    path = Path(path)
    try:
        meta = json.loads((path / COMPILE_FILE).read_text())
        spec = parse_backend(meta["backend"])
    except (OSError, ValueError, KeyError) as exc:
        raise KilnError(f"{path} is not a readable kiln compile directory: {exc}") from None
    source, loaded = source_inputs(meta["src"], meta["batch"] or 1)
    if inputs is not None:
        loaded = inputs(source)
    if spec.name == "openvino":
        if not (path / XML).is_file():
            raise KilnError(f"{path} has no {XML}: the OpenVINO IR of its backend {meta['backend']} is missing")
        fn = load_ir(path, int(spec.opts().get("threads", 0)) or None)
        with torch.no_grad():
            fn(*loaded.example_inputs, **loaded.example_kwargs)     # compiled now, not in the first timed call
        return fn, loaded, meta, source
    return build(spec, source.model, loaded), loaded, meta, source


class AtCompiledBatch(torch.nn.Module):
    """A compiled backend's callable as a module that runs every call at the batch it was
    compiled for: a shorter batch is padded with copies of its first sample and its outputs cut
    back, a longer one runs in pieces (a static-shape program, an inductor graph or an OpenVINO
    compile then serve a whole split unchanged)."""

    def __init__(self, fn: Callable, batch: int):
        super().__init__()
        self.fn, self.batch = fn, batch

    def forward(self, x=None, **kwargs):
        x = kwargs if x is None else x          # tasks.forward passes a dict batch as keywords
        n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        if n > self.batch:
            parts = [self({k: v[i:i + self.batch] for k, v in x.items()}) if isinstance(x, dict)
                     else self(x[i:i + self.batch]) for i in range(0, n, self.batch)]
            return torch.cat(parts)
        def pad(t):
            return torch.cat([t, t[:1].expand(self.batch - n, *t.shape[1:])]) if n < self.batch else t

        with torch.no_grad():
            out = self.fn(**{k: pad(v) for k, v in x.items()}) if isinstance(x, dict) else self.fn(pad(x))
        out = getattr(out, "logits", out)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out[:n]


def evaluate_compiled(path: str | Path) -> dict:
    """`kiln eval DIR` on a compile directory: the metric of the backend it chose (its saved file
    for OpenVINO) on the test split of the source's dataset, beside the source model's in eager."""
    fn, _, meta, source = load_compiled(path)
    if scored_by_own_loss(source.model):
        raise KilnError(f"{source.spec} is scored by its own loss, which a compiled backend (forward only) cannot run")
    splits = source_splits(source)
    batch = meta.get("batch") or 1
    if splits.task == "node-classification":
        compiled = _Whole(fn)
    else:
        compiled = AtCompiledBatch(fn, batch)
    key, value = evaluate_model(compiled, splits, batch_size=max(batch, 64))
    _, eager = evaluate_model(source.model.eval(), splits, batch_size=max(batch, 64))
    return {"run": str(path), "model": source.spec, "dataset": source.dataset, "backend": meta["backend"],
            "metric": key, "value": value, "split": "test", "eager": eager, "recorded": None, "reproduced": None}


class _Whole(torch.nn.Module):
    """A whole-graph input (node classification) as the compiled callable takes it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x=None, **kwargs):
        with torch.no_grad():
            if x is None or isinstance(x, dict):
                return self.fn(**(kwargs if x is None else x))
            return self.fn(*x) if isinstance(x, (tuple, list)) else self.fn(x)
