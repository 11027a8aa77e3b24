"""`kiln quantize`: a model spec or a trained run, a quant config, calibration data -> a run
directory that `kiln eval` measures and `load_quantized` rebuilds exactly.

A quantized run directory holds quant.toml (the config as given), source.toml (where the
float model and the data came from), model.safetensors (float weights as transformed by
SmoothQuant/GPTQ, plus every quantizer's scales), report.json and metrics.json.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.io import atomic_write_json, atomic_write_text
from kiln.quant.apply import calibrate, quantize, report
from kiln.quant.config import QuantConfig, parse_config


def calibration_batches(splits, n: int, batch_size: int, seed: int) -> list:
    """The first `n` batches of the training split in a seeded shuffle."""
    from torch.utils.data import DataLoader

    if splits.task == "node-classification":
        return [splits.train[0][0]]
    loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = []
    for x, _ in loader:
        batches.append(x)
        if len(batches) == n:
            break
    return batches


def model_forward(model: nn.Module, x):
    from kiln.train.tasks import forward

    return forward(model, x)


def check_batches(model: nn.Module, batches: list, where: str) -> None:
    """One batch through the float model: data of the wrong shape fails here, not mid-way."""
    from kiln.errors import first_line

    try:
        with torch.no_grad():
            model_forward(model, batches[0])
    except Exception as exc:
        raise KilnError(f"{where} does not fit the model: {first_line(exc)}") from None


def prepare(model: nn.Module, config: QuantConfig, batches: list,
            forward: Callable = model_forward) -> dict:
    """SmoothQuant (if configured), GPTQ (if configured), wrap the selected modules, then
    calibrate the activation quantizers on `batches`. Returns what the algorithms reported."""
    done: dict = {}
    if config.smoothquant is not None:
        from kiln.quant.smoothquant import smooth

        from kiln.quant.smoothquant import Unfoldable

        # fold into LayerNorms where the graph allows; where a norm's output also feeds a
        # residual add (post-LN BERT) the Linears after it scale their own input
        done["smoothquant"] = smooth(model, batches, forward, alpha=config.smoothquant.alpha,
                                     unfoldable=Unfoldable.SCALE_NORM_INPUT)
    gptq_scales = None
    if config.gptq is not None:
        from kiln.quant.gptq import gptq_for_config

        done["gptq"], gptq_scales = gptq_for_config(model, config, batches, forward)
    quantize(model, config)
    if gptq_scales:
        _adopt_gptq_scales(model, gptq_scales)
    done["calibration_batches"] = calibrate(model, batches, forward)
    return done


def _adopt_gptq_scales(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """GPTQ chose each group's scale; the weight quantizer keeps it, so the GPTQ'd weights sit
    exactly on its grid and re-quantizing them changes nothing."""
    from kiln.quant.modules import QuantOp

    for name, m in model.named_modules():
        if isinstance(m, QuantOp) and name in scales and m.weight_q is not None:
            m.weight_q._store(*scales[name])


def _splits(dataset: str, seed: int):
    from kiln.data import load_dataset

    return load_dataset(dataset, seed=seed)


def evaluate_model(model: nn.Module, splits, split: str = "test", batch_size: int = 256) -> tuple[str, float]:
    from kiln.train import tasks
    from kiln.train.trainer import _loader
    from kiln.train.config import TrainConfig

    cfg = TrainConfig(model="-", eval_batch_size=batch_size)
    metric = tasks.metric_for(splits.task, model)
    return metric.key, tasks.evaluate(model, splits.task, _loader(getattr(splits, split), cfg, task=splits.task), metric)


def quantize_run(src: str, config_path: Path, out: Path | None, dataset: str | None = None,
                 calib_batches: int = 16, batch_size: int = 32, seed: int = 0, evaluate: bool = True,
                 log: Callable[[str], None] = lambda s: None, fp32_metric: float | None = None) -> dict:
    """The whole command: load, quantize, calibrate, measure, write the run directory.
    `fp32_metric`, when the caller already measured the float model, skips measuring it again."""
    from kiln.config import read_toml
    from kiln.train.checkpoint import save_weights

    if out is not None and out.is_dir() and any(out.iterdir()):
        raise KilnError(f"output directory {out} already exists and is not empty")
    table = read_toml(config_path)
    config = parse_config(table, str(config_path))
    if calib_batches < 1:
        raise KilnError(f"--calib-batches must be >= 1, got {calib_batches}")
    source = _source(src, dataset)
    log(f"model {source.spec}, data {source.dataset}")
    splits = _splits(source.dataset, seed)
    batches = calibration_batches(splits, calib_batches, batch_size, seed)
    check_batches(source.model, batches, f"calibration data {source.dataset}")
    reference = copy.deepcopy(source.model)
    model = source.model
    done = prepare(model, config, batches)
    log(f"calibrated on {done['calibration_batches']} batches of {batch_size}")
    rep = report(reference, model, lambda m: model_forward(m, batches[0]))
    rep["algorithms"] = {k: v for k, v in done.items() if k != "calibration_batches"}
    metrics = {"model": source.spec, "source": src, "dataset": source.dataset, "split": "test",
               "avg_weight_bits": rep["avg_weight_bits"], "model_bytes": rep["model_bytes"],
               "fp32_bytes": rep["fp32_bytes"]}
    if evaluate:
        key, q = evaluate_model(model, splits)
        fp = fp32_metric if fp32_metric is not None else evaluate_model(reference, splits)[1]
        metrics |= {"metric": key, key: q, f"fp32_{key}": fp}
        log(f"test {key}: fp32 {fp:.4f}, quantized {q:.4f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "quant.toml", Path(config_path).read_text())
        atomic_write_text(out / "source.toml", _source_toml(src, source, calib_batches, batch_size, seed))
        save_weights(model, out / "model.safetensors")
        atomic_write_json(out / "report.json", rep)
        atomic_write_json(out / "metrics.json", metrics)
    return {"metrics": metrics, "report": rep, "model": model}


def _source(src: str, dataset: str | None):
    from kiln.models.artifact import load_source

    source = load_source(src, dataset)
    if any(t.get("kind") == "quant" for t in source.transforms):
        raise KilnError(f"{src} is already quantized: evaluate it with `kiln eval`")
    if not source.dataset:
        raise KilnError(f"{src} has no default dataset: pass --calib-dataset (see `kiln datasets`)")
    return source


def _source_toml(src: str, source, calib_batches: int, batch_size: int, seed: int) -> str:
    return (f"src = {json.dumps(src)}\nspec = {json.dumps(source.spec)}\ndataset = {json.dumps(source.dataset)}\n"
            f"calib_batches = {calib_batches}\nbatch_size = {batch_size}\nseed = {seed}\n"
            f"transforms = {json.dumps(json.dumps(source.transforms))}\n")


def is_quantized_run(run_dir: Path) -> bool:
    return (run_dir / "source.toml").is_file() and (run_dir / "quant.toml").is_file()


def load_quantized(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a quantized run's model: the float model from its source, the same wrappers,
    then every saved tensor (transformed weights and scales); (model, source table)."""
    from kiln.config import read_toml
    from kiln.train.checkpoint import load_weights

    run = Path(run_dir)
    if not is_quantized_run(run):
        raise KilnError(f"{run} is not a quantized run directory: no source.toml/quant.toml")
    src = read_toml(run / "source.toml")
    config = parse_config(read_toml(run / "quant.toml"), str(run / "quant.toml"))
    from kiln.models.artifact import rebuild

    # the source's architecture (a pruned or factorised artifact's, too); every weight comes
    # from model.safetensors below
    model, _ = rebuild(src["spec"], json.loads(src.get("transforms", "[]")))
    if config.smoothquant is not None:
        _restore_smoothing(model, run / "model.safetensors")
    quantize(model, config)
    load_weights(model, run / "model.safetensors")
    return model.eval(), src


def _restore_smoothing(model: nn.Module, weights: Path) -> None:
    """Put back the input-scaling Linears SmoothQuant made (their scales load with the rest)."""
    from safetensors import safe_open

    from kiln.quant.smoothquant import SmoothedLinear

    try:
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
    except Exception:
        return                          # load_weights below names the problem
    for key in keys:
        if key.endswith(".module.inv_scale"):
            fqn = key[: -len(".module.inv_scale")]
            parent, _, child = fqn.rpartition(".")
            linear = model.get_submodule(fqn)
            setattr(model.get_submodule(parent), child, SmoothedLinear(linear, torch.ones(linear.in_features)))


def evaluate_quantized(run_dir: str | Path) -> dict:
    model, src = load_quantized(run_dir)
    splits = _splits(src["dataset"], int(src.get("seed", 0)))
    key, value = evaluate_model(model, splits)
    return {"run": str(run_dir), "model": src["spec"], "dataset": src["dataset"], "metric": key,
            key: value, "split": "test"}
