"""The quantization figures: PTQ and QAT on real trained models, MiniLM's embeddings, the
course's format sweep. Each experiment is a real `kiln quantize` (kiln.quant.run) or
`kiln train --quant` (QAT through the trainer) run.

    .venv/bin/python benchmarks/quant_figures.py EXP [EXP ...] [--json PATH]

EXP:
  cnn        zoo:cnn trained on MNIST (runs/figures/cnn): W8A8 PTQ, 4-bit per-channel weights
             PTQ and QAT (3 epochs from the trained weights)
  minilm     MiniLM fine-tuned on Rotten Tomatoes (runs/figures/minilm-v3): W8A8 PTQ, plain
             and with SmoothQuant
  embed      pretrained all-MiniLM-L6-v2: cosine of W8A8 sentence embeddings to fp32 on 1,000
             real review sentences (test split)
  sweep      MiniLM on Rotten Tomatoes: every format family at 8, 6 and 4 bits (weights and
             Linear inputs), PTQ and QAT side by side; table and plot
The trained runs come from benchmarks/train_figures.py (cnn, minilm v3 recipe).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.config import read_toml  # noqa: E402
from kiln.quant.config import parse_config  # noqa: E402
from kiln.quant.run import quantize_run  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.trainer import fit  # noqa: E402

CNN_RUN = Path("runs/figures/cnn")
MINILM_RUN = Path("runs/figures/minilm-v3")
CONFIGS = Path("configs/quant")


def _need(run: Path, how: str) -> None:
    if not (run / "model.safetensors").is_file():
        sys.exit(f"{run} is missing: train it first with `{how}`")


def _toml(table: dict) -> str:
    """A flat-enough TOML writer for quant configs (inline tables for the roles)."""
    def val(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)
    lines = [f"{k} = {val(v)}" for k, v in table.items() if not isinstance(v, list) or k == "targets"]
    for k, v in table.items():
        if isinstance(v, list) and k != "targets":
            for item in v:
                lines.append(f"[[{k}]]")
                lines += [f"{kk} = {val(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def ptq(src: Path | str, config: Path, out: Path, **kw) -> dict:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = quantize_run(str(src), parse_config(read_toml(config), str(config)), out, **kw)
    m = res["metrics"]
    return {"config": str(config), "metric": m.get("metric"), "value": m.get("after"),
            "fp32": m.get("before"), "avg_weight_bits": m["avg_weight_bits"],
            "model_bytes": m["model_bytes"], "fp32_bytes": m["fp32_bytes"], "wall_s": time.perf_counter() - t0,
            "run": str(out)}


def qat(init: Path, config: Path, out: Path, **train) -> dict:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    base = read_toml(init / "config.toml")
    keep = {k: base[k] for k in ("model", "dataset", "seed", "eval_batch_size", "label_smoothing") if k in base}
    cfg = TrainConfig(**{**keep, **train, "init": str(init), "quant": str(config), "out": str(out)})
    t0 = time.perf_counter()
    m = fit(cfg, progress=sys.stderr.isatty())
    return {"config": str(config), "metric": m["metric"], "value": m["after"],
            "val": m["val"], "epochs": m["epochs"], "steps": m["steps"],
            "train": {k: v for k, v in train.items()}, "wall_s": time.perf_counter() - t0, "run": str(out)}


def exp_cnn(out: Path) -> dict:
    _need(CNN_RUN, "benchmarks/train_figures.py cnn")
    fp32 = json.loads((CNN_RUN / "metrics.json").read_text())["accuracy"]
    res = {"fp32": fp32,
           "ptq_w8a8": ptq(CNN_RUN, CONFIGS / "w8a8.toml", out / "cnn-ptq-w8a8", calib_batches=16),
           "ptq_w4": ptq(CNN_RUN, CONFIGS / "w4-channel.toml", out / "cnn-ptq-w4", calib_batches=16),
           "qat_w4": qat(CNN_RUN, CONFIGS / "w4-channel.toml", out / "cnn-qat-w4", epochs=3, lr=2e-4,
                         batch_size=64, warmup_fraction=0.0, weight_decay=0.0)}
    for k in ("ptq_w8a8", "ptq_w4", "qat_w4"):
        res[k]["delta_points"] = 100 * (res[k]["value"] - fp32)
    return res


def exp_minilm(out: Path) -> dict:
    _need(MINILM_RUN, "benchmarks/train_figures.py minilm")
    fp32 = json.loads((MINILM_RUN / "metrics.json").read_text())["accuracy"]
    res = {"fp32": fp32}
    for name in ("w8a8", "minilm-w8a8-smooth", "w8a8-dynamic"):
        r = ptq(MINILM_RUN, CONFIGS / f"{name}.toml", out / f"minilm-ptq-{name}", calib_batches=16)
        r["delta_points"] = 100 * (r["value"] - fp32)
        res[name] = r
    return res


@torch.no_grad()
def exp_embed(out: Path, n: int = 1000) -> dict:
    """Cosine between fp32 and W8A8 sentence embeddings of the pretrained MiniLM."""
    import copy

    from kiln.data import load_dataset
    from kiln.models.spec import load
    from kiln.quant.run import prepare
    from kiln.train.evaluation import calibration_batches

    splits = load_dataset("rotten-tomatoes?max_length=128", seed=0)
    model = load("zoo:minilm").model.eval()
    res = {"sentences": n, "max_length": 128}
    for name in ("w8a8", "minilm-w8a8-smooth", "w8a8-dynamic"):
        q = copy.deepcopy(model)
        config = parse_config(read_toml(CONFIGS / f"{name}.toml"))
        prepare(q, config, calibration_batches(splits, 16, 32, 0))
        cos = []
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(splits.test, range(n)), batch_size=50)
        for x, _ in loader:
            a, b = model(**x), q(**x)
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
        cos = torch.cat(cos)
        res[name] = {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                     "cosine_p01": torch.quantile(cos, 0.01).item()}
        print(name, res[name], file=sys.stderr, flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=["cnn", "minilm", "embed", "sweep"])
    parser.add_argument("--out", default="runs/quant")
    parser.add_argument("--json", default="benchmarks/results/quant_figures.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    for name in args.experiments:
        if name == "sweep":
            from quant_sweep import exp_sweep  # noqa: E402  (benchmarks/quant_sweep.py)

            entry = exp_sweep(out / "sweep", ptq, qat, _toml, MINILM_RUN)
        else:
            entry = globals()[f"exp_{name}"](out)
        entry["date"] = date.today().isoformat()
        print(name, json.dumps(entry, indent=1)[:3000], flush=True)
        merge_result(args.json, name, entry)


if __name__ == "__main__":
    main()
