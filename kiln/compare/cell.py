"""One cell of the matrix: a model's base run, one optimisation's artifact made from it by
that capability's own entry point, and the same measurements of every artifact.

A cell's record holds the task metric (`kiln eval` of the artifact), the bytes of the saved
artifact, the FLOPs of one batch-1 call (kiln's graph cost, which the tests hold to
torch.utils.flop_counter), the same costs as the artifact runs (number formats and sparsity,
kiln.analysis.execution), the roofline latency, boundedness and arithmetic intensity on each
hardware profile, and the latency measured here with the backend `kiln compile` chooses.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import torch

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.execution import as_it_runs as cost_as_it_runs
from kiln.analysis.report import analyze
from kiln.analysis.roofline import roofline
from kiln.compare.config import Capability, CompareConfig, Optimization
from kiln.compile import optimize
from kiln.compile.backends import Precision
from kiln.compile.run import CompileConfig, candidates, compile_run
from kiln.errors import KilnError, first_line
from kiln.graph.capture import capture
from kiln.graph.passes import PassManager
from kiln.io import atomic_dir
from kiln.lowrank.config import parse_config as lowrank_config
from kiln.lowrank.run import lowrank_run
from kiln.models.inputs import replace_inputs
from kiln.prune.config import parse_config as prune_config
from kiln.prune.run import prune_run
from kiln.quant.config import parse_config as quant_config
from kiln.quant.run import quantize_run
from kiln.runs.artifact import WEIGHTS_FILE, load_source, save_artifact
from kiln.runs.execution import as_it_runs
from kiln.train.config import TrainConfig
from kiln.train.evaluation import calibration_batches, evaluate_model, evaluate_run, source_splits
from kiln.train.tasks import scored_by_own_loss
from kiln.train.trainer import fit

Log = Callable[[str], None]
ATTENTION_WORDS = ("attn", "attention")   # module FQNs of attention blocks (BERT, ViT, GPT, ...)
PROGRAM_FILE = "program.pt2"


def slug(name: str) -> str:
    """A file name for a model spec or an optimisation: 'zoo:cnn' -> 'zoo_cnn', '2:4' -> '2_4'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- the base run --------------------------------------------------------------------------------

def make_base(spec: str, cfg: CompareConfig, out: Path, log: Log) -> dict:
    """The model every optimisation of `spec` starts from: `kiln train` by the model's recipe
    (the zoo's own weights when it trains 0 steps), written whole or not at all. Returns what
    was done."""
    r = cfg.recipe(spec)
    if r.steps:
        model = spec if r.classes is None else f"{spec}?classes={r.classes}"
        try:
            with atomic_dir(out) as tmp:
                # epochs only bound the steps: a step is one batch, whatever an epoch holds
                fit(TrainConfig(model=model, dataset=r.dataset, out=str(tmp), epochs=r.steps, max_steps=r.steps,
                                lr=r.lr, batch_size=cfg.batch_size, warmup_fraction=0.1), progress=False)
            log(f"{spec}: trained {r.steps} steps at lr {r.lr:g}" + (f" on {r.dataset}" if r.dataset else ""))
            return {"trained_steps": r.steps, "lr": r.lr, "spec": model, "dataset": r.dataset or None,
                    **({"note": r.note} if r.note else {})}
        except KilnError as exc:   # no data here (ImageNet ships no images): the zoo's weights, said so
            note = f"not trained: {first_line(exc)}"
            log(f"{spec}: {note}")
    else:
        note = "the zoo's own weights"
    source = load_source(spec)
    save_artifact(out, source.model, spec=source.spec, dataset=source.dataset, transforms=[])
    return {"trained_steps": 0, "note": note}


# -- the optimised artifact ----------------------------------------------------------------------

def finetune_table(opt: Optimization, cfg: CompareConfig, model: str) -> dict | None:
    r = cfg.recipe(model)
    if not (opt.finetune and r.finetune_steps):
        return None
    return {"epochs": r.finetune_steps, "max_steps": r.finetune_steps, "lr": r.finetune_lr,
            "batch_size": cfg.batch_size}


def make_artifact(opt: Optimization, model: str, base: Path, out: Path, cfg: CompareConfig) -> dict:
    """Run the optimisation's capability on `model`'s base run into `out` (a kiln run directory;
    the compiler's passes: a directory holding the exported program). Returns its report."""
    ft = finetune_table(opt, cfg, model)
    table = dict(opt.table) | ({"finetune": ft} if ft else {})
    if opt.capability is Capability.QUANT:

        return quantize_run(str(base), quant_config(table, opt.name), out, calib_batches=cfg.calib_batches,
                            batch_size=cfg.batch_size, evaluate=False)["report"]
    if opt.capability is Capability.PRUNE:

        return prune_run(str(base), prune_config(table, opt.name), out, evaluate=False, progress=False)["report"]
    if opt.capability is Capability.LOWRANK:

        return lowrank_run(str(base), lowrank_config(table, opt.name), out, evaluate=False)["report"]
    return _passes(base, out)


def _passes(base: Path, out: Path) -> dict:
    """The default pass pipeline on the base model's graph (batch dimension dynamic, so the
    program evaluates on the test split), saved with torch.export."""

    source = load_source(str(base))
    loaded = _on_data(source, dataclasses.replace(source.loaded, model=source.model))
    try:
        graph = capture(loaded, dynamic_batch=True)
    except KilnError:   # inputs without a shared batch dimension (a graph's nodes and edges): as given
        graph = capture(loaded)
    result = optimize(graph)
    with atomic_dir(out) as tmp:
        torch.export.save(result.graph.program, str(tmp / PROGRAM_FILE))
    return {"passes": list(dict.fromkeys(name for name, _ in result.record)), "changed": result.modified}


def _on_data(source, loaded):
    """`loaded` with two test samples as its example inputs where the data's shape is not the
    example's (a recipe that trains at another size: MobileNetV2 at 32x32, not 224), so the
    program, which export specialises to every dimension but the batch, evaluates on the data."""
    try:
        x = calibration_batches(source_splits(source), 1, 2, 0)[0]
    except KilnError:
        return loaded
    if isinstance(x, torch.Tensor) and len(loaded.example_inputs) == 1 and not loaded.example_kwargs:
        new = {"input0": x}
        old = {"input0": loaded.example_inputs[0]}
    elif isinstance(x, dict) and not loaded.example_inputs and set(x) == set(loaded.example_kwargs):
        new, old = x, loaded.example_kwargs
    else:
        return loaded
    if all(isinstance(old[k], torch.Tensor) and old[k].shape[1:] == v.shape[1:] for k, v in new.items()):
        return loaded
    return replace_inputs(loaded, new)


# -- measuring -----------------------------------------------------------------------------------

def measure(opt: Optimization | None, base: Path, artifact: Path, profiles: dict, cfg: CompareConfig) -> dict:
    """Every figure of one cell (the baseline when `opt` is None) on every profile."""
    record, source, program = costs(opt, base, artifact, profiles)
    record = {"metric": _metric(artifact, source, program)} | record
    record["latency"] = measure_latency(opt, artifact, base, cfg) if cfg.latency else None
    return record


def costs(opt: Optimization | None, base: Path, artifact: Path, profiles: dict) -> tuple[dict, object, object]:
    """The cell's FLOPs, bytes and roofline on every profile (no evaluation, no timing), with the
    loaded source and the passes' program that the metric needs."""
    passes = opt is not None and opt.capability is Capability.PASSES
    source = load_source(str(base if passes else artifact))
    model, execution = as_it_runs(source.model, source.transforms)
    loaded = dataclasses.replace(source.loaded, model=model)
    first = next(iter(profiles.values()))
    a = analyze(loaded, first, measure_time=False, execution=execution)
    graph, program = a.graph, None
    if passes:
        # the saved program has a dynamic batch (traced at 2, for evaluation); costs are at batch 1
        program = torch.export.load(str(artifact / PROGRAM_FILE))
        graph = _costed(optimize(capture(loaded)).graph)
    record = {"flops": _flops(graph), "artifact_bytes": _artifact_bytes(artifact), "param_bytes": a.param_bytes,
              "attention_flop_share": attention_share(graph), "hardware": {}}
    for name, hw in profiles.items():
        if passes:
            r = roofline(graph, hw)[1]
            flops, nbytes, wbytes = _flops(graph), sum(n.cost.bytes for n in graph.ops), a.param_bytes
        else:
            runs = cost_as_it_runs(graph, execution, hw)
            r, flops, nbytes, wbytes = runs.roofline, runs.flops, runs.bytes, runs.weight_bytes
        record["hardware"][name] = {"roofline_s": r.latency_s, "bound": r.bound.value, "flops": flops,
                                    "bytes": nbytes, "intensity": flops / nbytes if nbytes else None,
                                    "ridge": hw.ridge(), "fallback_dtypes": list(r.fallback_dtypes)}
    record["weight_bytes"] = wbytes   # storage bits and sparsity: the same on every profile
    record["notes"] = list(execution.notes)
    return record, source, program


def _costed(graph):

    PassManager([AnnotateCost()]).run(graph)
    return graph


def _flops(graph) -> int:
    return sum(n.cost.flops for n in graph.ops)


def attention_share(graph) -> float:
    """The fraction of the FLOPs computed inside modules whose FQN names attention."""
    total = _flops(graph)
    att = sum(n.cost.flops for n in graph.ops if any(w in (n.module or "").lower() for w in ATTENTION_WORDS))
    return att / total if total else 0.0


def _artifact_bytes(artifact: Path) -> int:
    """Bytes of the saved model: the run's safetensors, or the passes' exported program."""
    path = artifact / WEIGHTS_FILE
    return (path if path.is_file() else artifact / PROGRAM_FILE).stat().st_size


def _metric(artifact: Path, source, program) -> dict:
    """`kiln eval` of the artifact (the exported program's module for the passes); None with
    the reason where the model's data does not ship here."""
    try:
        if program is None:
            ev = evaluate_run(artifact)
            return {"key": ev["metric"], "value": ev["value"]}
        if scored_by_own_loss(source.model):
            # its loss() calls self(...): the same model object with the program as its forward
            model = copy.copy(source.model)
            object.__setattr__(model, "forward", program.module())
        else:
            model = Program(program.module())
        key, value = evaluate_model(model, source_splits(source))
        return {"key": key, "value": value}
    except KilnError as exc:
        return {"key": None, "value": None, "note": first_line(exc)}


class Program(torch.nn.Module):
    """An exported program's module as evaluation calls a model: an exported module refuses
    .eval() (it is always in the mode it was exported in, eval here), so it is held, not a child."""

    def __init__(self, module):
        super().__init__()
        object.__setattr__(self, "program", module)

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)


def measure_latency(opt: Optimization | None, artifact: Path, base: Path, cfg: CompareConfig) -> dict | None:
    """Batch-1 latency here: `kiln compile --backend BACKEND` on the artifact, the fastest
    candidate kept (int8 artifacts may pick real int8 kernels). The compiler's passes are
    timed as the backends that run them (`eager:passes=1`, inductor's with passes=1) on the
    base model."""
    try:
        precision = Precision.INT8 if opt is not None and opt.name == "int8" else Precision.FP32
        if opt is not None and opt.capability is Capability.PASSES:
            names = [n for n in candidates(cfg.backend, precision) if "passes=1" in n] or ["eager:passes=1"]
            report, _ = compile_run(str(base), CompileConfig("+".join(names), 1, precision, cfg.rounds))
        else:
            names = None
            report, _ = compile_run(str(artifact), CompileConfig(cfg.backend, 1, precision, cfg.rounds))
        timed = [c for c in report["candidates"] if c.get("latency_s") and (names is None or c["backend"] in names)]
        if not timed:
            return {"backend": None, "latency_s": None, "note": "no candidate backend ran"}
        best = min(timed, key=lambda c: c["latency_s"])
        return {"backend": best["backend"], "latency_s": best["latency_s"], "note": report.get("timing_note", "")}
    except KilnError as exc:
        return {"backend": None, "latency_s": None, "note": first_line(exc)}
