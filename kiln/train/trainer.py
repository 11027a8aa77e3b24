"""The trainer: one loop for every zoo task, in one process or as one rank of DDP.

A run directory holds config.toml, metrics.json, best.safetensors, last.safetensors and
state.pt (optimizer, schedule, epoch, history) for --resume. Every file is written
atomically at the end of an epoch, so an interrupted run leaves its last good checkpoint.
Only rank 0 writes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kiln.config import to_dict, to_toml
from kiln.errors import KilnError, first_line
from kiln.io import atomic_write_json, atomic_write_text
from kiln.train import distill, tasks
from kiln.train.checkpoint import load_state, load_weights, save_state, save_weights
from kiln.train.config import TrainConfig


@dataclass
class Setup:
    model: nn.Module
    splits: object         # kiln.data.base.DataSplits
    task: str
    dataset: str


def build(cfg: TrainConfig, fresh: bool = True, run_dir: Path | None = None) -> Setup:
    """Load the model and dataset and check, before any training, that they fit each other.
    A fresh run also takes `init`'s weights and calibrates `quant`'s activation scales; a
    resumed or re-evaluated one gets both from its own checkpoint."""
    from kiln.data import load_dataset

    model, _, _ = _float_architecture(cfg)
    dataset = cfg.dataset or default_dataset(cfg.model)
    splits = load_dataset(dataset, seed=cfg.seed)
    check_fit(model, splits, cfg.model, dataset)
    if cfg.init and fresh:
        load_weights(model, _init_weights(cfg.init))
    if cfg.quant:
        _quantize_for_training(model, cfg, splits, quant_file(cfg, run_dir), calibrate=fresh)
    return Setup(model, splits, splits.task, dataset)


def _float_architecture(cfg: TrainConfig):
    """The spec's model, or, when `init` is an artifact (a pruned or factorised model), the
    artifact's architecture; (model, LoadedModel, transforms). Weights are not loaded."""
    from kiln.models.artifact import is_artifact, read_artifact, rebuild
    from kiln.models.spec import load

    if cfg.init and is_artifact(Path(cfg.init)):
        meta = read_artifact(cfg.init)
        if meta["spec"] != cfg.model:
            raise KilnError(f"init {cfg.init} is a {meta['spec']} artifact but the model is {cfg.model}")
        model, loaded = rebuild(meta["spec"], meta["transforms"])
        return model, loaded, list(meta["transforms"])
    loaded = load(cfg.model)
    return loaded.model, loaded, []


def architecture(cfg: TrainConfig, run_dir: Path | None = None):
    """A run's model as trained (artifact architecture, quantizers), without data or weights."""
    model, loaded, transforms = _float_architecture(cfg)
    if cfg.quant:
        from kiln.config import read_toml
        from kiln.quant.apply import quantize
        from kiln.quant.config import parse_config

        path = quant_file(cfg, run_dir)
        quantize(model, parse_config(read_toml(path), str(path)))
        transforms = transforms + [{"kind": "quant", "config": str(path)}]
    return model, loaded, transforms


def _init_weights(init: str) -> Path:
    from kiln.models.artifact import is_artifact

    path = Path(init)
    if path.is_dir():
        return path / ("model.safetensors" if is_artifact(path) else "best.safetensors")
    if path.is_file():
        return path
    raise KilnError(f"init {init} is neither a run directory nor a safetensors file")


def quant_file(cfg: TrainConfig, run_dir: Path | None) -> Path:
    """A run keeps its own copy of the quant config as quant.toml and refers to it by that name."""
    if run_dir is not None and cfg.quant == "quant.toml" and (run_dir / "quant.toml").is_file():
        return run_dir / "quant.toml"
    return Path(cfg.quant)


def _quantize_for_training(model: nn.Module, cfg: TrainConfig, splits, path: Path, calibrate: bool) -> None:
    from kiln.config import read_toml
    from kiln.quant.apply import quantize
    from kiln.quant.config import parse_config
    from kiln.quant.run import calibration_batches, prepare

    config = parse_config(read_toml(path), str(path))
    if not calibrate:
        quantize(model, config)
        return
    if config.gptq is not None:
        raise KilnError(f"{path}: gptq is post-training rounding; it does not combine with quantization-aware training")
    prepare(model, config, calibration_batches(splits, cfg.calib_batches, cfg.batch_size, cfg.seed))


def default_dataset(spec: str) -> str:
    if spec.startswith("zoo:"):
        from kiln.models.zoo import ZOO, _load_families

        _load_families()
        return ZOO.get(spec[4:].partition("?")[0]).dataset
    raise KilnError(f"{spec} has no default dataset: pass --dataset (see `kiln datasets`)")


def check_fit(model: nn.Module, splits, spec: str, dataset: str) -> None:
    """One real batch through the model: shape, class count and task must agree."""
    if splits.task == "node-classification":
        x, y = splits.train[0]
    else:
        x, y = next(iter(DataLoader(splits.train, batch_size=2)))
    try:
        with torch.no_grad():
            if hasattr(model, "loss"):
                model.loss(x, y)
                return
            logits = tasks.forward(model, x)
    except Exception as exc:
        raise KilnError(f"dataset {dataset} does not fit model {spec}: {type(exc).__name__}: {first_line(exc)}") from None
    if splits.task in ("classification", "node-classification"):
        if logits.shape[:-1] != y.shape:
            raise KilnError(f"dataset {dataset} ({splits.task}, targets {tuple(y.shape)}) does not fit model {spec} "
                            f"(outputs {tuple(logits.shape)})")
        if splits.num_classes and logits.shape[-1] != splits.num_classes:
            raise KilnError(f"dataset {dataset} has {splits.num_classes} classes but model {spec} predicts {logits.shape[-1]}")
    elif splits.task == "language-modeling":
        vocab = splits.info.get("vocab_size", 0)
        if logits.shape[:-1] != y.shape or logits.shape[-1] < vocab:
            raise KilnError(f"dataset {dataset} (vocab {vocab}, targets {tuple(y.shape)}) does not fit model {spec} "
                            f"(logits {tuple(logits.shape)})")
    else:
        raise KilnError(f"dataset {dataset} is a {splits.task} task but model {spec} has no loss(x, y) for it")


class GlobalBatches(Sampler):
    """Seeded shuffled global batches; rank r of w takes the r-th slice of each global batch,
    so w processes see exactly the samples one process sees, step for step."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        if batch % world:
            raise KilnError(f"batch_size {batch} must be divisible by the number of processes {world}")
        self.n, self.batch, self.seed, self.rank, self.world, self.epoch = n, batch, seed, rank, world, 0
        self.steps = max(1, n // batch) if n >= batch else 1

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
        size = min(self.batch, self.n)
        for k in range(self.steps):
            chunk = order[k * size:(k + 1) * size]
            share = len(chunk) // self.world
            yield chunk[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return self.steps


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        if cfg.schedule == "onecycle":
            return min(1.0, 10 * progress + 0.1) if progress < 0.1 else 0.5 * (1 + math.cos(math.pi * (progress - 0.1) / 0.9))
        return 1.0

    return factor


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a data-parallel job (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _whole(samples):
    """A node-classification sample is a whole graph: no batch dimension is added."""
    return samples[0]


def _loader(ds, cfg: TrainConfig, sampler: GlobalBatches | None = None, task: str = "") -> DataLoader:
    if task == "node-classification":
        return DataLoader(ds, batch_size=1, shuffle=False, collate_fn=_whole)
    if sampler is None:   # evaluation: fixed order, whole split
        return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False)
    return DataLoader(ds, batch_sampler=sampler)


Hook = Callable[[nn.Module, int, int], None]


def fit(cfg: TrainConfig, resume: bool = False, dist: Dist = Dist(), progress: bool = True,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m, hooks: Sequence[Hook] = ()) -> dict:
    """Train `cfg.model` on `cfg.dataset` into `cfg.out`; returns the final metrics. Each hook is
    called as `hook(model, step, total_steps)` after every optimizer step (pruning schedules,
    mask re-application)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else None
    if out and dist.main and not resume and out.is_dir() and any(out.iterdir()):
        raise KilnError(f"run directory {out} already exists and is not empty: pass --resume or another --out")
    torch.manual_seed(cfg.seed)   # a user factory's init follows the seed (zoo builders fix their own)
    quant_text = None
    if cfg.quant and not resume:
        if not Path(cfg.quant).is_file():
            raise KilnError(f"quant config {cfg.quant} does not exist")
        quant_text = Path(cfg.quant).read_text()
    setup = build(cfg, fresh=not resume, run_dir=out)
    if cfg.quant and out:
        cfg = replace(cfg, quant="quant.toml")
    model, splits = setup.model, setup.splits
    step_loss = distill.loss_fn(cfg, setup.task, model, distill.load_teacher(cfg.teacher) if cfg.teacher else None)
    # each rank draws its own dropout masks and noise; the data order is seeded separately
    torch.manual_seed(cfg.seed + dist.rank)
    if setup.task == "node-classification" and dist.world > 1:
        raise KilnError(f"dataset {setup.dataset} is one graph: it cannot be split across {dist.world} processes")
    sampler = GlobalBatches(len(splits.train), cfg.batch_size, cfg.seed, dist.rank, dist.world)
    epochs_steps = len(sampler) * cfg.epochs
    total = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "history": [], "train_time_s": 0.0, "samples": 0}
    if resume:
        state = _resume(out, model, opt, sched)
    if out and dist.main and resume:
        _check_resume_config(cfg, out)
    if out and dist.main:
        if quant_text is not None:
            atomic_write_text(out / "quant.toml", quant_text)
        atomic_write_text(out / "config.toml", to_toml(cfg))
    train_model = wrap(tasks.LossForward(model) if hasattr(model, "loss") else model)
    after_step = lambda step: [hook(model, step, total) for hook in hooks]   # noqa: E731
    metric_key = tasks.metric_for(setup.task, model).key
    bar = _progress(progress and dist.main)
    try:
        with bar:
            for epoch in range(state["epoch"], cfg.epochs):
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
                _train_epoch(cfg, train_model, step_loss, _loader(splits.train, cfg, sampler, setup.task),
                             sampler, epoch, opt, sched, state, bar, after_step)
                val = tasks.evaluate(model, setup.task, _loader(splits.val, cfg, task=setup.task), tasks.metric_for(setup.task, model))
                state["history"][-1]["val_" + metric_key] = val
                better = tasks.metric_for(setup.task, model).better(val, state["best"])
                if better:
                    state["best"], state["best_epoch"] = val, epoch + 1
                state["epoch"] = epoch + 1
                if out and dist.main:
                    if better:
                        save_weights(model, out / "best.safetensors")
                    save_weights(model, out / "last.safetensors")
                    # state.pt carries its own copy of the weights: it alone is what --resume reads,
                    # so a kill between two files can never pair one epoch's weights with another's state
                    save_state({**state, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}, out / "state.pt")
                if dist.main and progress:
                    bar.console.print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {state['history'][-1]['train_loss']:.4f}  "
                                      f"val {metric_key} {val:.4f}{'  (best)' if better else ''}")
    except KeyboardInterrupt:
        raise KilnError(f"interrupted; the last completed epoch's checkpoint in {out} is intact (use --resume)") from None
    return _finish(cfg, setup, model, state, out, dist, metric_key)


def _train_epoch(cfg, train_model, step_loss, loader, sampler, epoch, opt, sched, state, bar, after_step) -> None:
    sampler.epoch = epoch
    train_model.train()
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    job = bar.add_task(f"epoch {epoch + 1}", total=len(loader))
    for x, y in loader:
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = step_loss(train_model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        state["step"] += 1
        after_step(state["step"])
        n = tasks.batch_size(x)
        seen += n
        loss_sum += loss.item() * n
        bar.update(job, advance=1)
    bar.remove_task(job)
    elapsed = time.perf_counter() - t0
    state["train_time_s"] += elapsed
    state["samples"] += seen
    state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                             "samples_per_s": seen / elapsed if elapsed else 0.0})


def _finish(cfg, setup, model, state, out, dist, metric_key) -> dict:
    if out and (out / "best.safetensors").is_file():
        load_weights(model, out / "best.safetensors")
    test = tasks.evaluate(model, setup.task, _loader(setup.splits.test, cfg, task=setup.task), tasks.metric_for(setup.task, model))
    metrics = {
        "model": cfg.model, "dataset": setup.dataset, "task": setup.task, "metric": metric_key,
        metric_key: test, "split": "test", "val_" + metric_key: state["best"], "best_epoch": state["best_epoch"],
        "epochs": state["epoch"], "steps": state["step"], "world_size": dist.world,
        "params": sum(p.numel() for p in model.parameters()),
        "train_time_s": state["train_time_s"],
        "throughput_samples_s": state["samples"] * dist.world / state["train_time_s"] if state["train_time_s"] else 0.0,
        "history": state["history"], "config": to_dict(cfg),
    }
    if out and dist.main:
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


RESUMABLE_CHANGES = ("epochs", "max_steps", "threads", "out")


def _check_resume_config(cfg: TrainConfig, out: Path) -> None:
    """A resumed run continues exactly only if nothing but its length changes."""
    from kiln.config import load_toml

    if not (out / "config.toml").is_file():
        return
    old = to_dict(load_toml(TrainConfig, out / "config.toml"))
    for key, value in to_dict(cfg).items():
        if key not in RESUMABLE_CHANGES and old[key] != value:
            raise KilnError(f"--resume cannot change {key} ({old[key]!r} -> {value!r}); "
                            f"only {', '.join(RESUMABLE_CHANGES[:2])} may change")


def _resume(out: Path | None, model, opt, sched) -> dict:
    if out is None or not (out / "state.pt").is_file():
        raise KilnError(f"nothing to resume in {out}: no state.pt (the run never finished an epoch)")
    state = load_state(out / "state.pt")
    try:
        model.load_state_dict(state.pop("model"))
    except (KeyError, RuntimeError) as exc:
        raise KilnError(f"trainer state {out / 'state.pt'} does not fit the model: {first_line(exc)}") from None
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(state.pop("rng"))   # dropout draws continue as if never stopped
    return state


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


def evaluate_run(run_dir: str | Path) -> dict:
    """Reload a run's config and best weights and measure its metric on the test split again."""
    from kiln.config import load_toml

    run = Path(run_dir)
    if not run.is_dir():
        raise KilnError(f"run directory {run} does not exist")
    from kiln.quant.run import evaluate_quantized, is_quantized_run

    if is_quantized_run(run):
        return evaluate_quantized(run)
    from kiln.models.artifact import is_artifact

    if is_artifact(run):
        return _evaluate_artifact(run)
    if not (run / "config.toml").is_file():
        raise KilnError(f"{run} is not a kiln run directory: no config.toml")
    cfg = load_toml(TrainConfig, run / "config.toml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = build(cfg, fresh=False, run_dir=run)
    load_weights(setup.model, run / "best.safetensors")
    metric = tasks.metric_for(setup.task, setup.model)
    value = tasks.evaluate(setup.model, setup.task, _loader(setup.splits.test, cfg, task=setup.task), metric)
    return {"run": str(run), "model": cfg.model, "dataset": setup.dataset, "metric": metric.key,
            metric.key: value, "split": "test"}


def _evaluate_artifact(run: Path) -> dict:
    from kiln.data import load_dataset
    from kiln.models.artifact import load_artifact
    from kiln.quant.run import evaluate_model

    src = load_artifact(run)
    if not src.dataset:
        raise KilnError(f"artifact {run} names no dataset to evaluate on")
    key, value = evaluate_model(src.model, load_dataset(src.dataset, seed=0))
    return {"run": str(run), "model": src.spec, "dataset": src.dataset, "metric": key, key: value, "split": "test"}

