"""The trainer: one loop for every zoo task, in one process or as one rank of DDP.

A run directory is a kiln run (kiln.runs.artifact): artifact.json (the spec, the dataset and
the transforms of the model trained: those of `init`, plus quantization for QAT),
model.safetensors (the best validation weights) and metrics.json, plus config.toml,
last.safetensors and state.pt (optimizer, schedule, epoch, history) for --resume. Nothing is
written before the model, the data and the teacher have been checked against each other; a
fresh run is built in a hidden sibling directory that takes the run's name once its first
epoch is saved, and every file is replaced atomically at the end of each epoch after that, so
an interrupted run leaves its last good checkpoint and a failed one leaves nothing changed.
Only rank 0 writes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kiln.config import load_toml, to_dict, to_toml
from kiln.data import load_dataset
from kiln.errors import Interrupted, KilnError, first_line
from kiln.io import StagedDir, atomic_write_json, atomic_write_text
from kiln.models.spec import load
from kiln.registry import Registry
from kiln.runs.artifact import WEIGHTS_FILE, default_dataset, read_artifact, rebuild, write_meta
from kiln.runs.metrics import metric_record
from kiln.runs.transforms import TransformRecord
from kiln.runs.weights import load_weights, save_weights
from kiln.train import distill, tasks
from kiln.train.checkpoint import load_state, save_state
from kiln.train.config import TrainConfig
from kiln.train.evaluation import eval_loader
from kiln.train.parallel.engine import Engine, Where

# A preparation turns the model into what a config key asks to train (`quant`: quantization-
# aware training) and returns its transform record; the capability that owns the key registers
# it, so the trainer needs no import of it.
Prepare = Callable[[nn.Module, TrainConfig, object], TransformRecord]
PREPARES: Registry[Prepare] = Registry("training preparation", plugins=("kiln.quant.run", "kiln.lowrank.lora"))
LAST_FILE = "last.safetensors"


@dataclass
class Setup:
    model: nn.Module
    splits: object         # kiln.data.base.DataSplits
    task: str
    dataset: str
    transforms: list       # [TransformRecord]: the architecture of `model`


def build(cfg: TrainConfig, resume_dir: Path | None = None) -> Setup:
    """Load the model and dataset and check, before any training, that they fit each other. A
    fresh run takes `init`'s architecture and weights and runs the preparations its config asks
    for (QAT calibrates its scales); a resumed one rebuilds its own architecture (its weights
    come from its state)."""

    if resume_dir is not None:
        meta = read_artifact(resume_dir)
        model, _ = rebuild(meta.spec, meta.transforms)
        transforms = list(meta.transforms)
    else:
        model, transforms = _initial_model(cfg)
    dataset = cfg.dataset or default_dataset(cfg.model)
    splits = load_dataset(dataset, seed=cfg.seed)
    check_fit(model, splits, cfg.model, dataset)
    if cfg.quant and resume_dir is None:
        if any(t.kind == "quant" for t in transforms):
            raise KilnError(f"init {cfg.init} is already quantized: train it without quant to run QAT from it")
        transforms.append(PREPARES.get("quant")(model, cfg, splits))
    if (cfg.lora or cfg.qlora) and resume_dir is None:
        transforms.append(PREPARES.get("lora")(model, cfg, splits))
    return Setup(model, splits, splits.task, dataset, transforms)


def _initial_model(cfg: TrainConfig) -> tuple[nn.Module, list]:
    """The spec's model, or `init`'s: a run directory's architecture and weights (pruned,
    factorised, quantized: any kiln run), or a safetensors file of the spec's weights."""
    init = Path(cfg.init) if cfg.init else None
    if init is not None and init.is_dir():
        meta = read_artifact(init)
        if meta.spec != cfg.model:
            raise KilnError(f"init {cfg.init} is a {meta.spec} run but the model is {cfg.model}")
        model, _ = rebuild(meta.spec, meta.transforms)
        load_weights(model, init / WEIGHTS_FILE)
        return model, list(meta.transforms)
    if init is not None and not init.is_file():
        raise KilnError(f"init {cfg.init} is neither a run directory nor a safetensors file")
    model = load(cfg.model).model
    if init is not None:
        load_weights(model, init)
    return model, []


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
    if not torch.is_tensor(logits):   # a transformers base model (hf-config:) answers hidden states, no logits
        raise KilnError(f"model {spec} outputs {type(logits).__name__} without logits, so it cannot train on {dataset} "
                        f"({splits.task}); give a model with a head (a py: factory, or a preset: with a causal-LM head)")
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


def _train_loader(ds, sampler: GlobalBatches, task: str) -> DataLoader:
    if task == "node-classification":   # one whole graph per step
        return eval_loader(ds, task)
    return DataLoader(ds, batch_sampler=sampler)


Hook = Callable[[nn.Module, int, int], None]


def fit(cfg: TrainConfig, resume: bool = False, dist: Dist = Dist(), progress: bool = True,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m, hooks: Sequence[Hook] = (),
        engine: Engine | None = None) -> dict:
    """Train `cfg.model` on `cfg.dataset` into `cfg.out`; returns the final metrics. Each hook is
    called as `hook(model, step, total_steps)` after every optimizer step (pruning schedules,
    mask re-application). `engine` (kiln.train.parallel) trains a sharded, split or wrapped
    copy of the model and syncs it back before each evaluation and checkpoint; by default the
    model itself is trained, through `wrap`."""
    engine = engine or Engine(Where(dist.rank, dist.world, dist.rank, dist.world), wrap)
    where = engine.where
    dist = Dist(where.rank, where.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else None
    if resume:
        _check_resumable(cfg, out)
    elif out and dist.main and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"run directory {out} already exists and is not empty: pass --resume or another --out")
    torch.manual_seed(cfg.seed)   # a user factory's init follows the seed (zoo builders fix their own)
    setup = build(cfg, resume_dir=out if resume else None)
    model, splits = setup.model, setup.splits
    step_loss = distill.loss_fn(cfg, setup.task, model, distill.load_teacher(cfg.teacher) if cfg.teacher else None)
    if cfg.teacher:
        distill.dry_run(step_loss, model, splits)
    # each rank draws its own dropout masks and noise; the data order is seeded separately
    torch.manual_seed(cfg.seed + where.data_rank)
    if setup.task == "node-classification" and where.data_world > 1:
        raise KilnError(f"dataset {setup.dataset} is one graph: it cannot be split across {where.data_world} processes")
    sampler = GlobalBatches(len(splits.train), cfg.batch_size, cfg.seed, where.data_rank, where.data_world)
    epochs_steps = len(sampler) * cfg.epochs
    total = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
    saved = _resume_model(out, model) if resume else None
    train_model, opt = engine.prepare(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "history": [], "train_time_s": 0.0, "samples": 0}
    if resume:
        state = _resume(out, saved, engine, model, train_model, opt, sched)
    run = _RunDir(out, cfg, setup, resume) if out and dist.main else None
    after_step = lambda step: [hook(model, step, total) for hook in hooks]   # noqa: E731
    metric = lambda: tasks.metric_for(setup.task, model)   # noqa: E731
    bar = _progress(progress and dist.main)
    try:
        with bar:
            for epoch in range(state["epoch"], cfg.epochs):
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
                _train_epoch(cfg, engine, train_model, step_loss, _train_loader(splits.train, sampler, setup.task),
                             sampler, epoch, opt, sched, state, bar, after_step)
                engine.sync(model, train_model)
                val = tasks.evaluate(engine.eval_model(model, train_model), setup.task,   # collective for fsdp
                                     eval_loader(splits.val, setup.task, cfg.eval_batch_size), metric())
                state["history"][-1]["val_" + metric().key] = val
                better = metric().better(val, state["best"])
                if better:
                    state["best"], state["best_epoch"] = val, epoch + 1
                state["epoch"] = epoch + 1
                opt_state = engine.checkpoint(run.path if run else None, opt, train_model)   # collective
                if run:
                    run.checkpoint(model, state, opt_state, sched, better)
                if dist.main and progress:
                    bar.console.print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {state['history'][-1]['train_loss']:.4f}  "
                                      f"val {metric().key} {val:.4f}{'  (best)' if better else ''}")
    except KeyboardInterrupt:
        if run and run.published:
            raise Interrupted(f"the last completed epoch's checkpoint in {out} is intact (use --resume)") from None
        raise Interrupted("before the first epoch was saved; nothing was written") from None
    finally:
        if run:
            run.discard()
    return _finish(cfg, setup, model, state, run, dist, metric().key, where.data_world, getattr(engine, "describe", None),
                   engine.keeps_plain)


class _RunDir:
    """Where rank 0 writes: a fresh run into a hidden sibling that takes the run's name at its
    first checkpoint, a resumed run in place; every file is replaced atomically."""

    def __init__(self, out: Path, cfg: TrainConfig, setup: Setup, resumed: bool):
        self.cfg, self.setup = cfg, setup
        self.staged = None if resumed else StagedDir(out)
        self.path = out if resumed else self.staged.path

    @property
    def published(self) -> bool:
        return self.staged is None or self.staged.published

    def checkpoint(self, model: nn.Module, state: dict, opt_state: dict, sched, better: bool) -> None:
        atomic_write_text(self.path / "config.toml", to_toml(self.cfg))
        write_meta(self.path, spec=self.cfg.model, dataset=self.setup.dataset, transforms=self.setup.transforms,
                   data_seed=self.cfg.seed)
        if better:
            save_weights(model, self.path / WEIGHTS_FILE)
        save_weights(model, self.path / LAST_FILE)
        # state.pt carries its own copy of the weights: it alone is what --resume reads, so a
        # kill between two files can never pair one epoch's weights with another's state
        save_state({**state, "model": model.state_dict(), "optimizer": opt_state,
                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}, self.path / "state.pt")
        if self.staged is not None:
            self.path = self.staged.publish()

    def discard(self) -> None:
        if self.staged is not None:
            self.staged.discard()


def _train_epoch(cfg, engine, train_model, step_loss, loader, sampler, epoch, opt, sched, state, bar, after_step) -> None:
    sampler.epoch = epoch
    train_model.train()
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    job = bar.add_task(f"epoch {epoch + 1}", total=len(loader))
    for x, y in loader:
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = engine.step(train_model, step_loss, x, y)   # forward and backward
        if cfg.grad_clip:
            engine.clip(train_model, cfg.grad_clip)
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


def _finish(cfg, setup, model, state, run: _RunDir | None, dist, metric_key, data_world=1, parallel=None,
            plain: bool = True) -> dict:
    """The best weights measured on the test split (by a rank that holds the plain model: an
    fsdp rank other than 0 holds only its shards and reports no test metric)."""
    if run and (run.path / WEIGHTS_FILE).is_file():
        load_weights(model, run.path / WEIGHTS_FILE)
    test = tasks.evaluate(model, setup.task, eval_loader(setup.splits.test, setup.task, cfg.eval_batch_size),
                          tasks.metric_for(setup.task, model)) if plain else None
    metrics = metric_record(
        metric_key, before=None, after=test, val=state["best"], model=cfg.model, source=cfg.init or cfg.model,
        dataset=setup.dataset, task=setup.task, eval_batch_size=cfg.eval_batch_size, best_epoch=state["best_epoch"],
        epochs=state["epoch"], steps=state["step"], world_size=dist.world, **({"parallel": parallel} if parallel else {}),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), train_time_s=state["train_time_s"],
        throughput_samples_s=state["samples"] * data_world / state["train_time_s"] if state["train_time_s"] else 0.0,
        history=state["history"], config=to_dict(cfg))
    if run and run.published:
        atomic_write_json(run.path / "metrics.json", metrics)
    return metrics


RESUMABLE_CHANGES = ("epochs", "max_steps", "threads", "out")


def _check_resumable(cfg: TrainConfig, out: Path | None) -> None:
    """A resumed run continues exactly only if nothing but its length changes; checked before
    anything is loaded or written."""
    if out is None or not (out / "state.pt").is_file():
        raise KilnError(f"nothing to resume in {out}: no state.pt (the run never finished an epoch)")
    read_artifact(out)   # a run of an earlier kiln is named here, with the command that redoes it
    if not (out / "config.toml").is_file():
        return
    old = to_dict(load_toml(TrainConfig, out / "config.toml"))
    for key, value in to_dict(cfg).items():
        if key not in RESUMABLE_CHANGES and old[key] != value:
            raise KilnError(f"--resume cannot change {key} ({old[key]!r} -> {value!r}); "
                            f"only {', '.join(RESUMABLE_CHANGES[:2])} may change")


def _resume_model(out: Path, model) -> dict:
    """The saved state, its weights loaded into the plain model (before any engine copies it)."""
    state = load_state(out / "state.pt")
    try:
        model.load_state_dict(state.pop("model"))
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise KilnError(f"trainer state {out / 'state.pt'} does not fit the model: {first_line(exc)}") from None
    return state


def _resume(out: Path, state: dict, engine: Engine, model, train_model, opt, sched) -> dict:
    try:
        engine.load_optimizer_state(opt, train_model, state.pop("optimizer"), model)
        sched.load_state_dict(state.pop("scheduler"))
        torch.set_rng_state(state.pop("rng"))   # dropout draws continue as if never stopped
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise KilnError(f"trainer state {out / 'state.pt'} does not fit the model: {first_line(exc)}") from None
    return state


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if enabled and not Console(stderr=True).is_terminal:
        return _PlainProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


class _PlainProgress:
    """Off a terminal (CI logs, pipes, nohup) a bar draws nothing: plain stderr lines instead,
    `epoch 2: 120/640 steps, 35 s, ETA 2m 31s`, every `every_s` seconds within an epoch."""

    def __init__(self, every_s: float = 30.0):
        from rich.console import Console

        self.console, self.every_s, self.jobs = Console(stderr=True, highlight=False), every_s, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int) -> int:
        self.jobs[len(self.jobs)] = [description, total, 0, time.monotonic(), time.monotonic()]
        return len(self.jobs) - 1

    def update(self, job: int, advance: int = 1) -> None:
        entry = self.jobs[job]
        entry[2] += advance
        now = time.monotonic()
        if now - entry[4] >= self.every_s:
            description, total, done, start, _ = entry
            eta = (now - start) / done * (total - done)
            self.console.print(f"{description}: {done}/{total} steps, {now - start:.0f} s, ETA {eta:.0f} s")
            entry[4] = now

    def remove_task(self, job: int) -> None:
        self.jobs.pop(job, None)
