"""`kiln quantize`: any model source, a quant config, calibration data -> a kiln run directory
(kiln.runs.artifact) whose last transform is quantization.

The quant record holds the config as a table and the Linears SmoothQuant gave an input scale;
model.safetensors holds the float weights as SmoothQuant/GPTQ left them and every quantizer's
scales, so restoring the record and loading the weights gives the quantized model bit for bit.
Quantization-aware training (`kiln train --quant`) is registered here too, as a preparation the
trainer runs without importing quantization.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kiln.config import read_toml
from kiln.errors import KilnError
from kiln.io import check_new_dir
from kiln.models.linear import as_torch_linears
from kiln.quant.apply import KIND, calibrate, quant_record, quantize, report
from kiln.quant.config import QuantConfig, parse_config
from kiln.quant.gptq import gptq_for_config
from kiln.quant.modules import QuantOp
from kiln.quant.smoothquant import Unfoldable, smooth
from kiln.runs.artifact import load_source, save_source
from kiln.runs.metrics import metric_record
from kiln.train.config import TrainConfig
from kiln.train.evaluation import calibration_batches, check_batches, evaluate_model, source_splits
from kiln.train.tasks import forward as model_forward, scored_by_own_loss
from kiln.train.trainer import PREPARES


def prepare(model: nn.Module, config: QuantConfig, batches: list,
            forward: Callable = model_forward) -> dict:
    """SmoothQuant (if configured), GPTQ (if configured), wrap the selected modules, then
    calibrate the activation quantizers on `batches`. Returns what the algorithms reported."""
    done: dict = {}
    as_torch_linears(model)   # SmoothQuant and GPTQ find the Linears quantize() will wrap
    if config.smoothquant is not None:

        # fold into LayerNorms where the graph allows; where a norm's output also feeds a
        # residual add (post-LN BERT) the Linears after it scale their own input
        done["smoothquant"] = smooth(model, batches, forward, alpha=config.smoothquant.alpha,
                                     unfoldable=Unfoldable.SCALE_NORM_INPUT)
    gptq_scales = None
    if config.gptq is not None:

        done["gptq"], gptq_scales = gptq_for_config(model, config, batches, forward)
    skipped: list[dict] = []
    quantize(model, config, skipped)
    if skipped:
        done["skipped"] = skipped
    if gptq_scales:
        _adopt_gptq_scales(model, gptq_scales)
    done["calibration_batches"] = calibrate(model, batches, forward)
    return done


def calibration_forward(model: nn.Module) -> Callable:
    """How calibration runs the model on a batch: through its own loss() where it is scored by
    one (a diffusion model's forward takes a timestep the data does not hold; its loss draws
    one), with the same draws on every call so the float and quantized models see one input."""
    if not scored_by_own_loss(model):
        return model_forward

    def run(m: nn.Module, x):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return m.loss(x)[0]
    return run


def _adopt_gptq_scales(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """GPTQ chose each group's scale; the weight quantizer keeps it, so the GPTQ'd weights sit
    exactly on its grid and re-quantizing them changes nothing."""
    for name, m in model.named_modules():
        if isinstance(m, QuantOp) and name in scales and m.weight_q is not None:
            m.weight_q._store(*scales[name])


@PREPARES.register(KIND)
def prepare_for_training(model: nn.Module, cfg: TrainConfig, splits) -> object:
    """QAT: quantize and calibrate on `cfg.calib_batches` training batches; the quant record."""
    path = Path(cfg.quant)
    config = parse_config(read_toml(path), str(path))
    if config.gptq is not None:
        raise KilnError(f"{path}: gptq is post-training rounding; it does not combine with quantization-aware training")
    prepare(model, config, calibration_batches(splits, cfg.calib_batches, cfg.batch_size, cfg.seed))
    return quant_record(model, config)


def quantize_run(src: str, config: QuantConfig, out: Path | None, dataset: str | None = None,
                 calib_batches: int = 16, batch_size: int = 32, seed: int = 0, evaluate: bool = True,
                 log: Callable[[str], None] = lambda s: None, fp32_metric: float | None = None) -> dict:
    """The whole command: load, quantize, calibrate, measure, write the run directory.
    `fp32_metric`, when the caller already measured the float model, skips measuring it again."""
    if out is not None:
        check_new_dir(out)
    if calib_batches < 1:
        raise KilnError(f"--calib-batches must be >= 1, got {calib_batches}")
    source = load_source(src, dataset)
    if source.quantized:
        raise KilnError(f"{src} is already quantized: evaluate it with `kiln eval`")
    if not source.dataset:
        raise KilnError(f"{src} has no default dataset: pass --calib-dataset (see `kiln datasets`)")
    log(f"model {source.spec}, data {source.dataset}")
    splits = source_splits(source)
    batches = calibration_batches(splits, calib_batches, batch_size, seed)
    forward = calibration_forward(source.model)
    check_batches(source.model, batches, f"calibration data {source.dataset}", forward)
    reference = copy.deepcopy(source.model)
    model = source.model
    done = prepare(model, config, batches, forward)
    log(f"calibrated on {done['calibration_batches']} batches of {batch_size}")
    rep = report(reference, model, lambda m: forward(m, batches[0]))
    rep["algorithms"] = {k: v for k, v in done.items() if k not in ("calibration_batches", "skipped")}
    rep["skipped"] = done.get("skipped", [])
    rep["calibration"] = {"batches": calib_batches, "batch_size": batch_size, "seed": seed}
    sizes = {k: rep[k] for k in ("avg_weight_bits", "model_bytes", "fp32_bytes")}
    metrics = {"model": source.spec, "source": src, "dataset": source.dataset} | sizes
    if evaluate:
        key, q = evaluate_model(model, splits)
        fp = fp32_metric if fp32_metric is not None else evaluate_model(reference, splits)[1]
        metrics = metric_record(key, before=fp, after=q, **metrics)
        log(f"test {key}: fp32 {fp:.4f}, quantized {q:.4f}")
    if out is not None:
        save_source(out, source, model, quant_record(model, config), report=rep, metrics=metrics)
    return {"metrics": metrics, "report": rep, "model": model}
