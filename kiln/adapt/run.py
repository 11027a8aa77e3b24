"""`kiln early-exit`: attach exit heads, train them with kiln's trainer, then sweep the exit
threshold: accuracy against exact average FLOPs per sample, and measured latency."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from kiln.adapt.config import EarlyExitConfig
from kiln.adapt.early_exit import EarlyExit, heads_for, probe
from kiln.adapt.restore import record_of
from kiln.adapt.sweep import ExitFlops, Point, choose, exit_flops, exits_taken, point, thresholds
from kiln.errors import KilnError
from kiln.io import check_new_dir
from kiln.runs.artifact import load_source, require_float, save_source
from kiln.runs.metrics import metric_record
from kiln.runs.transforms import TransformRecord
from kiln.timing import TimingConfig, measure
from kiln.train.evaluation import source_splits
from kiln.train.finetune import finetune

Log = Callable[[str], None]


def _call(fn, x):
    return fn(**x) if isinstance(x, dict) else fn(x)


@torch.no_grad()
def collect(model: EarlyExit, split, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits (exits + 1, N, classes) and the labels (N,) over a split."""
    from rich.progress import Progress

    model.eval()
    outs, labels = [], []
    loader = DataLoader(split, batch_size=batch_size)
    with Progress(transient=True) as bar:
        job = bar.add_task("all exits", total=len(loader))
        for x, y in loader:
            outs.append(torch.stack([z.float() for z in _call(model.all_exits, x)]))
            labels.append(y)
            bar.update(job, advance=1)
    return torch.cat(outs, 1), torch.cat(labels)


def curve(logits, labels, model: EarlyExit, grid: list[float], per_exit) -> list[Point]:
    scores = model.criterion.score(logits[:-1]).T          # (N, exits)
    return [point(logits, labels, scores, model.criterion, t, per_exit) for t in grid]


def early_exit_run(src: str, cfg: EarlyExitConfig, out: Path, dataset: str | None = None,
                   log: Log = lambda s: None) -> dict:
    """The whole command: probe, attach, train the heads, sweep, time, write the artifact."""
    check_new_dir(out)
    source = require_float(load_source(src, dataset), "early-exit")
    if not source.dataset:
        raise KilnError(f"{src} has no default dataset: pass --dataset (see `kiln datasets`)")
    args, kwargs = tuple(source.example_inputs), dict(source.example_kwargs)
    params_before = sum(p.numel() for p in source.model.parameters())
    exits, shapes, classes = probe(source.model.eval(), list(cfg.exits), args, kwargs)
    torch.manual_seed(cfg.seed)
    model = EarlyExit(source.model, exits, heads_for(shapes, classes, cfg.head_pool, cfg.head_hidden),
                      cfg.criterion, None, list(cfg.weights) or None, cfg.freeze_backbone)
    log(f"model {source.spec}, data {source.dataset}; exits after {', '.join(exits)}")
    untrained = TransformRecord.from_flat(record_of(model, shapes, classes, cfg.head_pool, cfg.head_hidden))
    trained = finetune(model, source, [*source.transforms, untrained], cfg.train, log=log)
    report = sweep_and_time(model, source, cfg, shapes, log)
    report |= {"params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
               "train": trained}
    # the dense model is the backbone's final exit: the heads train, the backbone is measured as it was
    metrics = metric_record("accuracy", before=report["dense"]["accuracy"], after=report["chosen"]["accuracy"],
                            model=source.spec, source=src, dataset=source.dataset, avg_flops=report["chosen"]["avg_flops"],
                            dense_flops=report["dense"]["flops"], threshold=model.threshold)
    record = TransformRecord.from_flat(record_of(model, shapes, classes, cfg.head_pool, cfg.head_hidden))
    save_source(out, source, model, record, report=report, metrics=metrics)
    return {"report": report, "metrics": metrics, "model": model}


def sweep_and_time(model: EarlyExit, source, cfg: EarlyExitConfig, shapes: list[tuple], log: Log = lambda s: None) -> dict:
    """Every exit's logits on validation and test, the threshold (the config's, or chosen on
    validation), the test curve and batch-1 latency; sets `model.threshold`."""
    args, kwargs = tuple(source.example_inputs), dict(source.example_kwargs)
    splits = source_splits(source)
    flops = exit_flops(model, args, kwargs)
    val, test = collect(model, splits.val), collect(model, splits.test)
    grid = thresholds(model.criterion.score(val[0][:-1]), model.criterion, cfg.sweep_points)
    dense_val = float((val[0][-1].argmax(-1) == val[1]).double().mean())
    model.threshold = cfg.threshold if cfg.threshold is not None else \
        choose(curve(*val, model, grid, flops.per_exit), cfg.max_drop, cfg.select, dense_val).threshold
    report = _report(model, cfg, flops, test, grid, model.threshold, shapes)
    report["threshold_from"] = "config" if cfg.threshold is not None else \
        f"validation ({cfg.select}, max_drop {cfg.max_drop})"
    report["dense_val_accuracy"] = dense_val
    report["latency"] = latency(model, splits.test, cfg, test)
    chosen = report["chosen"]
    log(f"threshold {model.threshold:.4g}: test accuracy {chosen['accuracy']:.4f} (final exit "
        f"{report['dense']['accuracy']:.4f}), {chosen['flops_saved']:.1%} fewer FLOPs per sample")
    return report


def _report(model: EarlyExit, cfg: EarlyExitConfig, flops: ExitFlops, test, grid, threshold, shapes) -> dict:
    logits, labels = test
    accs = (logits.argmax(-1) == labels[None]).double().mean(1).tolist()
    points = curve(logits, labels, model, sorted(set(grid) | {threshold}), flops.per_exit)
    chosen = next(p for p in points if p.threshold == threshold)
    rows = [{"exit": f, "shape": list(s), "head_params": sum(p.numel() for p in h.parameters()),
             "flops": flops.per_exit[k], "test_accuracy": accs[k]}
            for k, (f, s, h) in enumerate(zip(model.exits, shapes, model.heads))]
    rows.append({"exit": "final", "shape": None, "head_params": 0, "flops": flops.per_exit[-1], "test_accuracy": accs[-1]})
    return {
        "exits": rows, "criterion": model.criterion_name, "threshold": threshold,
        "flops_per": "sample (the example input, batch 1)",
        "dense": {"accuracy": accs[-1], "flops": flops.backbone},
        "chosen": asdict(chosen) | {"flops_saved": 1 - chosen.avg_flops / flops.backbone},
        "curve": [asdict(p) | {"flops_saved": 1 - p.avg_flops / flops.backbone} for p in points],
        "config": asdict(cfg),
    }


def latency(model: EarlyExit, split, cfg: EarlyExitConfig, test) -> dict:
    """Seconds per sample over the first test samples one at a time (batch 1), the backbone
    alone and with early exit, interleaved in one kiln.timing call (a single figure taken in
    one process read 2.00x where a fresh process read 1.06x); and the share of samples whose
    exit matches the sweep's (batched) choice."""
    samples = [x for (x, _), _ in zip(DataLoader(split, batch_size=1), range(cfg.latency_samples))]
    model.eval()
    taken = []

    def early():
        taken.clear()
        for x in samples:
            _call(model, x)
            taken.append(int(model.last_exits[0]))

    m = measure({"dense": lambda: [_call(model.backbone, x) for x in samples], "early_exit": early},
                TimingConfig(rounds=cfg.latency_repeats, warmup=1))
    dense, fast = m["dense"].per(len(samples)), m["early_exit"].per(len(samples))
    logits = test[0][:, :len(samples)]
    expected = exits_taken(model.criterion.score(logits[:-1]).T, model.criterion, model.threshold).tolist()
    return {"batch": 1, "samples": len(samples), "threads": m.threads, "repeats": m.rounds,
            "dense_s": dense.median, "early_exit_s": fast.median, "speedup": m.speedup("dense", "early_exit"),
            "dense": dense.to_dict(), "early_exit": fast.to_dict(), "timing_note": m.note(),
            "exit_agreement": sum(a == b for a, b in zip(taken, expected)) / len(samples)}
