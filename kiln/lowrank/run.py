"""`kiln lowrank`: a model (spec or run directory), a low-rank config -> a run directory
with the factorised model, a per-layer report (ranks, parameters and FLOPs before and after)
and measured latency of the dense and factorised models side by side.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kiln.analysis.flops import sdpa_custom_mapping
from kiln.errors import KilnError
from kiln.io import check_new_dir
from kiln.lowrank.apply import Decision, factorize, module_flops, module_inputs
from kiln.lowrank.config import LowRankConfig, to_table
from kiln.runs.artifact import load_source, require_float, save_source
from kiln.runs.metrics import metric_record
from kiln.runs.transforms import TransformRecord
from kiln.timing import TimingConfig, measure
from kiln.train.evaluation import evaluate_model, source_splits
from kiln.train.finetune import finetune

Log = Callable[[str], None]


def batched(inputs: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """Example inputs (batch 1) repeated to `batch` rows."""
    def rep(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            return x.repeat(batch, *([1] * (x.dim() - 1)))
        return x
    return tuple(rep(x) for x in inputs), {k: rep(v) for k, v in kwargs.items()}


def model_flops(model: nn.Module, inputs: tuple, kwargs: dict) -> int:

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_custom_mapping()) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops()


def layer_rows(dense: nn.Module, low: nn.Module, decisions: list[Decision], run) -> list[dict]:
    """Per module: ranks, parameters and FLOPs (one example sample) before and after."""
    done = [d.fqn for d in decisions if d.ranks is not None]
    before, after = module_inputs(dense, done, run), module_inputs(low, done, run)
    rows = []
    for d in decisions:
        row = asdict(d) | {"ranks": list(d.ranks) if d.ranks else None}
        if d.ranks is not None and d.fqn in before:
            row["flops_before"] = module_flops(dense.get_submodule(d.fqn), before[d.fqn])
            row["flops_after"] = module_flops(low.get_submodule(d.fqn), after[d.fqn])
        rows.append(row)
    return rows


def lowrank_run(src: str, config: LowRankConfig, out: Path, dataset: str | None = None, evaluate: bool = True,
                log: Log = lambda s: None) -> dict:
    """The whole command: load, factorise, (fine-tune), measure, write the run directory."""
    check_new_dir(out)
    source = require_float(load_source(src, dataset), "lowrank")
    splits = source_splits(source) if evaluate or config.finetune is not None else None
    log(f"model {source.spec}, data {source.dataset or '-'}")
    dense = copy.deepcopy(source.model).eval()
    model, decisions, record = factorize(source.model, config.plan(source.model))
    if not record["modules"]:
        why = next((f"{d.fqn}: {d.reason}" for d in decisions if d.reason), "no module matched the targets")
        raise KilnError(f"{src}: nothing to factorise ({why})")
    model.eval()
    inputs, kwargs = tuple(source.example_inputs), dict(source.example_kwargs)
    report = _report(dense, model, decisions, inputs, kwargs, config)
    log(f"factorised {len(record['modules'])} modules: {report['params_before']:,} -> {report['params_after']:,} parameters")
    record = TransformRecord.from_flat(record)
    if evaluate:
        (key, before), after = evaluate_model(dense, splits), evaluate_model(model, splits)[1]
        log(f"test {key}: dense {before:.4f}, factorized {after:.4f}")
    history = None
    if config.finetune is not None:
        history = finetune(model, source, [*source.transforms, record], config.finetune, log=log)
    metrics = {}
    if evaluate:
        tuned = evaluate_model(model, splits)[1] if config.finetune is not None else None
        if tuned is not None:
            log(f"test {key} after fine-tuning: {tuned:.4f}")
        metrics = metric_record(key, before=before, after=after, after_finetune=tuned)
    metrics |= {"model": source.spec, "source": src, "dataset": source.dataset} | \
        ({"finetune": history} if history is not None else {})
    report["latency"] = latency(dense, model.eval(), inputs, kwargs, config)
    save_source(out, source, model, record, report=report, metrics=metrics)
    return {"report": report, "metrics": metrics, "model": model}


def _report(dense, model, decisions, inputs, kwargs, config: LowRankConfig) -> dict:
    run = lambda m: m(*inputs, **kwargs)   # noqa: E731
    return {
        "layers": layer_rows(dense, model, decisions, run),
        "params_before": sum(p.numel() for p in dense.parameters()),
        "params_after": sum(p.numel() for p in model.parameters()),
        "flops_before": model_flops(dense, inputs, kwargs), "flops_after": model_flops(model, inputs, kwargs),
        "flops_per": "example input (batch 1)", "config": to_table(config),
    }


def latency(dense: nn.Module, low: nn.Module, inputs: tuple, kwargs: dict, config: LowRankConfig) -> dict:
    """Dense and factorised models timed interleaved in one kiln.timing call."""
    x, kw = batched(inputs, kwargs, config.latency_batch)
    m = measure({"dense": lambda: dense(*x, **kw), "lowrank": lambda: low(*x, **kw)},
                TimingConfig(rounds=config.latency_repeats))
    return {"batch": config.latency_batch, "threads": m.threads, "repeats": m.rounds,
            "dense_s": m["dense"].median, "lowrank_s": m["lowrank"].median, "speedup": m.speedup("dense", "lowrank"),
            "dense": m["dense"].to_dict(), "lowrank": m["lowrank"].to_dict(), "timing_note": m.note()}
