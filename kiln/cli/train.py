"""`kiln train`, `kiln eval` and `kiln datasets`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import check_fits, console, user_errors, validate, write_json

OVERRIDES = ("dataset", "epochs", "lr", "batch_size", "seed", "optimizer", "weight_decay", "schedule",
             "warmup_fraction", "grad_clip", "bf16", "label_smoothing", "max_steps", "threads", "init", "quant",
             "calib_batches", "teacher", "distill_alpha", "distill_temperature", "lora", "qlora")


def _config(spec, config, out, given: dict):
    from kiln.config import from_dict, read_toml
    from kiln.errors import KilnError
    from kiln.train.config import TrainConfig

    data = read_toml(config) if config else {}
    data |= {k: v for k, v in given.items() if v is not None}
    if spec:
        data["model"] = spec
    if out:
        data["out"] = str(out)
    if "model" not in data:
        raise KilnError("no model: give a SPEC or `model = ...` in --config")
    return from_dict(TrainConfig, data, str(config) if config else "train options")


def _parallel(modes: str, mesh, reshard, schedule, microbatches, split, stages_per_rank, checkpoint, sp):
    """The parallel plan the flags ask for; None for plain data parallel with default options."""
    from kiln.errors import KilnError
    from kiln.train.parallel.config import ParallelConfig, PipeSchedule, parse_mesh, parse_modes

    try:
        schedule = PipeSchedule(schedule)
    except ValueError:
        raise KilnError(f"--pp-schedule {schedule!r}: accepted: {', '.join(PipeSchedule)}") from None
    plan = ParallelConfig(modes=parse_modes(modes), mesh=parse_mesh(mesh) if mesh else (),
                          reshard_after_forward=reshard, schedule=schedule, microbatches=microbatches,
                          split=tuple(s.strip() for s in split.split(",")) if split else (),
                          stages_per_rank=stages_per_rank, checkpoint_activations=checkpoint, sequence_parallel=sp)
    return None if plan == ParallelConfig() else plan


@user_errors
def train(
    spec: Optional[str] = typer.Argument(None, help="Model spec, e.g. zoo:cnn (or `model` in --config)."),
    config: Optional[Path] = typer.Option(None, help="TOML file with TrainConfig keys; flags override it."),
    out: Optional[Path] = typer.Option(None, help="Run directory, e.g. runs/cnn-mnist."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    dataset: Optional[str] = typer.Option(None, help="Dataset spec (`kiln datasets`); default: the model's."),
    epochs: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    optimizer: Optional[str] = typer.Option(None, help="adamw or sgd"),
    weight_decay: Optional[float] = typer.Option(None),
    schedule: Optional[str] = typer.Option(None, help="cosine, constant, linear or onecycle"),
    warmup_fraction: Optional[float] = typer.Option(None),
    grad_clip: Optional[float] = typer.Option(None, help="Max global gradient norm (0 = off)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast."),
    label_smoothing: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None), threads: Optional[int] = typer.Option(None),
    init: Optional[str] = typer.Option(None, help="Start from this run directory's model (any kiln run; a quantized one trains QAT)."),
    quant: Optional[str] = typer.Option(None, help="Quantization-aware training with this quant config (TOML)."),
    calib_batches: Optional[int] = typer.Option(None, help="QAT: batches that set activation scales first."),
    teacher: Optional[str] = typer.Option(None, help="Distil from this model (spec, run or artifact directory)."),
    distill_alpha: Optional[float] = typer.Option(None, help="Weight of the distillation term (default 0.5)."),
    distill_temperature: Optional[float] = typer.Option(None, help="Softmax temperature of distillation (default 2)."),
    lora: Optional[str] = typer.Option(None, help="LoRA adapters on a frozen base: r=8,alpha=16[,dropout=0.05,"
                                       "targets=all-linear|query+value,bias=none|lora_only|all,rslora=1,train=head]."),
    qlora: Optional[bool] = typer.Option(None, "--qlora/--no-qlora", help="LoRA on NF4 base weights (QLoRA; --lora sets the adapters)."),
    nproc: int = typer.Option(1, help="Processes on this machine (torchrun; gloo on CPU)."),
    nnodes: int = typer.Option(1), node_rank: int = typer.Option(0),
    rdzv_endpoint: str = typer.Option("", help="host:port of the rendezvous for several machines."),
    parallel: str = typer.Option("ddp", help="ddp, zero1, fsdp, hsdp, tp, pp, or a pair on a 2-D mesh: fsdp,tp, ddp,tp or ddp,pp."),
    mesh: Optional[str] = typer.Option(None, help="Processes per mode, outermost first, e.g. 2x2 (2-D plans)."),
    reshard_after_forward: bool = typer.Option(True, "--reshard-after-forward/--no-reshard-after-forward",
                                               help="fsdp: free gathered weights after forward (ZeRO-3) or keep them (ZeRO-2-like)."),
    pp_schedule: str = typer.Option("1f1b", help="pp: gpipe, 1f1b, interleaved-1f1b or zero-bubble."),
    microbatches: int = typer.Option(0, help="pp: micro-batches per step (0: twice the stages)."),
    pp_split: Optional[str] = typer.Option(None, help="pp: comma-separated modules where stages begin (default: balanced by FLOPs)."),
    stages_per_rank: int = typer.Option(1, help="pp: stages per rank for the looped schedules (default 2 there)."),
    checkpoint_activations: bool = typer.Option(False, help="Recompute each block's activations in backward."),
    sequence_parallel: bool = typer.Option(False, help="tp: shard norms and residuals along the sequence."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the final metrics here."),
) -> None:
    """Train a model on a dataset, with validation each epoch and best/last checkpoints."""
    from kiln.train.trainer import fit

    validate(positive={"--nproc": nproc, "--nnodes": nnodes, "--stages-per-rank": stages_per_rank},
             non_negative={"--node-rank": node_rank, "--microbatches": microbatches},
             new_dirs=[None if resume else out], json_path=json_path)
    plan = _parallel(parallel, mesh, reshard_after_forward, pp_schedule, microbatches, pp_split, stages_per_rank,
                     checkpoint_activations, sequence_parallel)
    if resume and out and (out / "config.toml").is_file() and not config:
        config = out / "config.toml"
    local = dict(locals())
    cfg = _config(spec, config, out, {k: local[k] for k in OVERRIDES})
    # what TrainConfig leaves open, from flags and --config alike
    validate(non_negative={"threads": cfg.threads}, positive={"eval_batch_size": cfg.eval_batch_size},
             new_dirs=[None if resume or not cfg.out else Path(cfg.out)], json_path=json_path)
    check_fits(cfg.model, cfg.dataset, cfg.teacher)
    if cfg.lora or cfg.qlora:
        from kiln.lowrank.lora import parse

        parse(cfg.lora, cfg.qlora)   # a bad --lora is one line before any model loads
    if nproc > 1 or nnodes > 1 or plan is not None:
        from kiln.train.distributed import launch
        from kiln.train.parallel.config import ParallelConfig

        launch(cfg, nproc, resume, nnodes, node_rank, rdzv_endpoint, plan or ParallelConfig())
        if node_rank > 0:   # global rank 0, on node 0, writes the run
            console.print(f"node {node_rank} finished; node 0 wrote the run in its --out")
            return
        metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
    else:
        metrics = fit(cfg, resume=resume)
    key = metrics["metric"]
    console.print(f"test {key}: {metrics['after']:.4f}  (best val {metrics['val']:.4f} at epoch {metrics['best_epoch']}; "
                  f"{metrics['throughput_samples_s']:.0f} samples/s)")
    if metrics.get("trainable_params", metrics["params"]) < metrics["params"]:
        console.print(f"trained {metrics['trainable_params']:,} of {metrics['params']:,} parameters "
                      f"({100 * metrics['trainable_params'] / metrics['params']:.2f}%)")
    if cfg.out:
        console.print(f"run: {cfg.out}")
    if json_path:
        write_json(json_path, metrics)


@user_errors
def merge(
    run_dir: Path = typer.Argument(..., help="A `kiln train --lora/--qlora` run."),
    out: Path = typer.Option(..., help="Run directory of the merged model (plain Linear layers)."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Fold a LoRA run's adapters into its base weights: a plain model every command takes."""
    from kiln.lowrank.lora import merge_run

    validate(new_dirs=[out], json_path=json_path)
    result = merge_run(run_dir, out)
    change = result["max_abs_output_change"]
    console.print(f"merged {result['adapters']} adapters of {run_dir} into {out}"
                  + (f" (largest output change on the example input: {change:.2e})" if change is not None else ""))
    if json_path:
        write_json(json_path, result)


@user_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by any kiln command "
                                             "(train, quantize, prune, compile, ...)."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Reload any kiln run directory and measure its metric on the test split again; a `kiln
    compile` directory runs on the backend it chose, beside its source model in eager."""
    from kiln.compile.run import evaluate_compiled, is_compiled
    from kiln.train.evaluation import evaluate_run

    validate(json_path=json_path)
    result = evaluate_compiled(run_dir) if is_compiled(run_dir) else evaluate_run(run_dir)
    recorded = result["recorded"]
    console.print(f"{result['model']} on {result['dataset']} (test): {result['metric']} {result['value']:.6f}"
                  + (f" on {result['backend']}, eager {result['eager']:.6f}" if "backend" in result else "")
                  + (f"  recorded {recorded:.6f}  {'reproduced' if result['reproduced'] else 'DIFFERS'}"
                     if recorded is not None else ""))
    if json_path:
        write_json(json_path, result)


@user_errors
def datasets(json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """List the datasets (real offline data where it exists)."""
    from kiln.data import dataset_entries

    validate(json_path=json_path)
    rows = [{"name": e.name, "task": e.task, "description": e.description, "source": e.source,
             "options": e.options} for e in dataset_entries()]
    table = Table(title="kiln datasets")
    for col in ("name", "task", "options", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["task"], ", ".join(f"{k}={v}" for k, v in r["options"].items()), r["source"])
    console.print(table)
    if json_path:
        write_json(json_path, {"datasets": rows})
