"""GPTQ against round-to-nearest on the trained zoo GPT: validation and test perplexity on rt-lm.

    .venv/bin/python benchmarks/quant_gptq.py [--run runs/figures/gpt] [--calib 128]
                                             [--json benchmarks/results/quant_gptq.json]

The run directory is benchmarks/train_figures.py's `gpt` run; the model, data and perplexity
are rebuilt with the trainer's own functions (build, evaluate_model). Every
method quantizes the weights of the 16 block Linears in place (fake quantization, fp32 compute);
the head is tied to the token embedding and stays fp32, as in the GPTQ paper. GPTQ calibrates
on `--calib` random training sequences. Also W8A8 (int8 weights per row, int8 activations per
tensor, dynamic) without and with SmoothQuant.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kiln.config import load_toml  # noqa: E402
from kiln.quant.config import GPTQConfig  # noqa: E402
from kiln.quant.gptq import gptq, rtn  # noqa: E402
from kiln.quant.smoothquant import fake_quant_linears, smooth  # noqa: E402
from kiln.runs.weights import load_weights  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.evaluation import evaluate_model  # noqa: E402
from kiln.train.trainer import build  # noqa: E402

# (label, method, format, group_size, act_order); group 0 = one scale per output row
WEIGHT_ONLY = [
    ("RTN int4 per-row", "rtn", "int4", 0, False),
    ("GPTQ int4 per-row", "gptq", "int4", 0, False),
    ("RTN int4 g128", "rtn", "int4", 128, False),
    ("GPTQ int4 g128", "gptq", "int4", 128, False),
    ("GPTQ int4 g128 act-order", "gptq", "int4", 128, True),
    ("RTN int4 g32", "rtn", "int4", 32, False),
    ("GPTQ int4 g32", "gptq", "int4", 32, False),
    ("RTN int3 g128", "rtn", "int3", 128, False),
    ("GPTQ int3 g128", "gptq", "int3", 128, False),
    ("RTN int3 g32", "rtn", "int3", 32, False),
    ("GPTQ int3 g32", "gptq", "int3", 32, False),
]


def calibration(train, n: int, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """n random training sequences (inputs only), in batches."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    xs = torch.stack([train[int(i)][0] for i in idx])
    return list(xs.split(batch))


def perplexities(model, setup, cfg) -> dict[str, float]:
    return {split: evaluate_model(model, setup.splits, split, cfg.eval_batch_size)[1] for split in ("val", "test")}


def weight_only(base, setup, cfg, calib, method, fmt, group, act_order) -> tuple[dict, float, dict]:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "gptq":
        report = gptq(model, calib, fmt=fmt, config=GPTQConfig(group_size=group, act_order=act_order))
    else:
        report = rtn(model, fmt, group)
    seconds = time.perf_counter() - t0
    layers = {layer["name"]: {"in_features": layer["in_features"], "group": layer["group"],
                              "groups_per_row": -(-layer["in_features"] // layer["group"]),
                              **({"gptq_objective": layer["error"], "rtn_objective": layer["rtn_error"]}
                                 if layer["error"] is not None else {})}
              for layer in report["layers"]}
    return perplexities(model, setup, cfg), seconds, {"layers": layers, "skipped": report["skipped"]}


def w8a8(base, setup, cfg, calib, smoothed: bool) -> tuple[dict, float, dict]:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    extra = {}
    if smoothed:
        report = smooth(model, calib)
        extra = {"smoothed": {g["norm"]: g["linears"] for g in report["groups"]},
                 "outlier_ratio_before_after": {g["linears"][0]: [round(g["ratio_before"], 3), round(g["ratio_after"], 3)]
                                                for g in report["groups"]}}
    seconds = time.perf_counter() - t0
    with fake_quant_linears(model, "int8", "int8"):
        return perplexities(model, setup, cfg), seconds, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/figures/gpt")
    parser.add_argument("--calib", type=int, default=128, help="calibration sequences from the train split")
    parser.add_argument("--json", default="benchmarks/results/quant_gptq.json")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "config.toml").is_file() or not (run / "model.safetensors").is_file():
        print(f"{run} holds no trained GPT; train it first: .venv/bin/python benchmarks/train_figures.py gpt",
              file=sys.stderr)
        sys.exit(2)
    cfg = load_toml(TrainConfig, run / "config.toml")
    setup = build(cfg)
    load_weights(setup.model, run / "model.safetensors")
    base = setup.model.eval()
    calib = calibration(setup.splits.train, args.calib, seed=cfg.seed)

    rows = [("fp32", "fp32", perplexities(base, setup, cfg), 0.0, {})]
    for label, method, fmt, group, act_order in WEIGHT_ONLY:
        ppl, seconds, extra = weight_only(base, setup, cfg, calib, method, fmt, group, act_order)
        rows.append((label, method, ppl, seconds, {"format": fmt, "group_size": group, "act_order": act_order, **extra}))
        print(f"{label}: {ppl}", flush=True)
    for label, smoothed in (("W8A8 per-tensor", False), ("W8A8 per-tensor + SmoothQuant", True)):
        ppl, seconds, extra = w8a8(base, setup, cfg, calib, smoothed)
        rows.append((label, "smoothquant" if smoothed else "rtn", ppl, seconds,
                     {"format": "int8 weights per row, int8 activations per tensor (dynamic)", **extra}))
        print(f"{label}: {ppl}", flush=True)

    fp32 = rows[0][2]
    results = [{"method": label, "algorithm": method, "val_perplexity": ppl["val"], "test_perplexity": ppl["test"],
                "val_increase": ppl["val"] - fp32["val"], "test_increase": ppl["test"] - fp32["test"],
                "quantize_seconds": seconds, **extra} for label, method, ppl, seconds, extra in rows]
    out = {
        "date": date.today().isoformat(),
        "config": {"run": str(run), "model": cfg.model, "dataset": cfg.dataset, "calibration_sequences": args.calib,
                   "calibration_seed": cfg.seed, "block": GPTQConfig().block, "percdamp": GPTQConfig().percdamp,
                   "n_embd": base.config.n_embd, "n_layer": base.config.n_layer,
                   "note": "group 128 is one group per row for the 128-wide inputs (attn.qkv, attn.proj, mlp.0) "
                           "and 4 groups per row for mlp.2 (512 inputs); the tied lm_head/wte stays fp32",
                   "threads": torch.get_num_threads()},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\n{'method':32s} {'val ppl':>8s} {'+val':>7s} {'test ppl':>8s} {'+test':>7s} {'quant s':>8s}")
    for r in results:
        print(f"{r['method']:32s} {r['val_perplexity']:8.4f} {r['val_increase']:+7.4f} {r['test_perplexity']:8.4f} "
              f"{r['test_increase']:+7.4f} {r['quantize_seconds']:8.2f}")


if __name__ == "__main__":
    main()
