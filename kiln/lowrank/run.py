"""`kiln lowrank`: a model (spec, run or artifact), a low-rank config -> an artifact directory
with the factorised model, a per-layer report (ranks, parameters and FLOPs before and after)
and measured latency of the dense and factorised models side by side.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kiln.errors import KilnError
from kiln.lowrank.apply import Decision, factorize, module_flops, module_inputs
from kiln.lowrank.config import LowRankConfig, parse_config, to_table
from kiln.timing import TimingConfig, measure

Log = Callable[[str], None]


def batched(inputs: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """Example inputs (batch 1) repeated to `batch` rows."""
    def rep(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            return x.repeat(batch, *([1] * (x.dim() - 1)))
        return x
    return tuple(rep(x) for x in inputs), {k: rep(v) for k, v in kwargs.items()}


def model_flops(model: nn.Module, inputs: tuple, kwargs: dict) -> int:
    from kiln.analysis.flops import sdpa_custom_mapping

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


def lowrank_run(src: str, config_path: Path, out: Path, dataset: str | None = None, evaluate: bool = True,
                log: Log = lambda s: None) -> dict:
    """The whole command: load, factorise, (fine-tune), measure, write the artifact."""
    from kiln.config import read_toml
    from kiln.io import check_new_dir
    from kiln.models.artifact import save_artifact

    check_new_dir(out)
    config = parse_config(read_toml(config_path), str(config_path))
    source = float_source(src, dataset, need_data=evaluate or config.finetune is not None)
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
    metrics = {"model": source.spec, "source": src, "dataset": source.dataset, "split": "test"}
    splits = _splits(source.dataset, config.seed) if evaluate or config.finetune is not None else None
    if evaluate:
        metrics |= _accuracy(dense, splits, "dense") | _accuracy(model, splits, "factorized")
        log(f"test {metrics['metric']}: dense {metrics['dense_' + metrics['metric']]:.4f}, "
            f"factorized {metrics['factorized_' + metrics['metric']]:.4f}")
    transforms = list(source.transforms) + [record]
    if config.finetune is not None:
        metrics["finetune"] = finetune(model, source, transforms, config.finetune, out, log)
        if evaluate:
            metrics |= _accuracy(model, splits, "finetuned")
            log(f"test {metrics['metric']} after fine-tuning: {metrics['finetuned_' + metrics['metric']]:.4f}")
    if evaluate:
        key = metrics["metric"]
        metrics[key] = metrics["finetuned_" + key] if config.finetune is not None else metrics["factorized_" + key]
    report["latency"] = latency(dense, model.eval(), inputs, kwargs, config)
    save_artifact(out, model, spec=source.spec, dataset=source.dataset, transforms=transforms,
                  report=report, metrics=metrics)
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


def finetune(model: nn.Module, source, transforms: list[dict], table: dict, out: Path, log: Log) -> dict:
    """Train the factorised architecture from its current weights with kiln's trainer (and the
    source as teacher when `distill`); the best validation weights are loaded into `model`."""
    from kiln.config import from_dict
    from kiln.models.artifact import save_artifact
    from kiln.train.checkpoint import load_weights
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    ft = dict(table)
    distill = ft.pop("distill", False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.ft-", dir=out.parent) as tmp:
        init = save_artifact(Path(tmp) / "init", model, spec=source.spec, dataset=source.dataset, transforms=transforms)
        cfg = from_dict(TrainConfig, ft | {"model": source.spec, "dataset": source.dataset, "out": str(Path(tmp) / "train"),
                                           "init": str(init), "teacher": source.src if distill else ""}, "finetune")
        log(f"fine-tuning: {cfg.epochs} epochs{f', at most {cfg.max_steps} steps' if cfg.max_steps else ''}"
            f"{', distilled from ' + source.src if distill else ''}")
        result = fit(cfg)
        load_weights(model, Path(tmp) / "train" / "best.safetensors")
    keep = ("epochs", "steps", "best_epoch", "train_time_s", "metric", "val_" + result["metric"])
    return {k: result[k] for k in keep if k in result} | {"distill": distill, "config": dict(table)}


def _accuracy(model: nn.Module, splits, prefix: str) -> dict:
    from kiln.quant.run import evaluate_model

    key, value = evaluate_model(model, splits)
    return {"metric": key, f"{prefix}_{key}": value}


def _splits(dataset: str, seed: int):
    from kiln.data import load_dataset

    return load_dataset(dataset, seed=seed)


def float_source(src: str, dataset: str | None, need_data: bool):
    """A model source that is not quantized (and has a dataset when `need_data`)."""
    from kiln.models.artifact import load_source

    source = load_source(src, dataset)
    if any(t.get("kind") == "quant" for t in source.transforms):
        raise KilnError(f"{src} is quantized: factorise the float model, then quantize the artifact")
    if need_data and not source.dataset:
        raise KilnError(f"{src} has no default dataset: pass --dataset (see `kiln datasets`)")
    return source
