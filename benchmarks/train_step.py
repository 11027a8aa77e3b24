"""The training step analysed against the same step measured: backward FLOPs against
torch.utils.flop_counter on `loss.backward()` (share of models exact), and the memory of a
step per kind against storage accounting of a real eager step (error per kind).

    .venv/bin/python benchmarks/train_step.py [--json PATH [--append]] [--specs zoo:gpt,hf-config:bert] [--quick]

Every zoo model and every transformers type in --types (default: the 28 of the FLOPs
benchmark) runs one AdamW step (fp32; and for zoo:gpt also bf16 and checkpointed). Nothing
here is a timing: the figures are counts and bytes, valid on a busy machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kiln.analysis.step_oracle import measure_step  # noqa: E402
from kiln.analysis.train_step import KINDS, analyze_step  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.models.zoo import ZOO  # noqa: E402

HF_TYPES = ["bert", "roberta", "albert", "deberta-v2", "modernbert", "gpt2", "llama", "qwen3", "gemma", "phi",
            "falcon", "bloom", "opt", "mamba", "mixtral", "qwen3_moe", "t5", "bart", "vit", "swin", "convnext",
            "resnet", "mobilenet_v2", "efficientnet", "segformer", "wav2vec2", "whisper", "clip"]


def one(spec: str, checkpoint: bool = False, precision: str = "fp32") -> dict:
    row: dict = {"spec": spec, "checkpoint": checkpoint, "precision": precision}
    t0 = time.perf_counter()
    try:
        loaded = load(spec)
        a = analyze_step(copy.deepcopy(loaded.model), loaded.example_inputs, loaded.example_kwargs,
                         checkpoint=checkpoint, precision=precision, name=spec)
        m = measure_step(copy.deepcopy(loaded.model), loaded.example_inputs, loaded.example_kwargs,
                         checkpointed=a.checkpointed, precision=precision)
    except Exception as exc:  # a model that cannot be traced or run is a row, not a crash
        return row | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    row |= {
        "params": a.params,
        "forward_flops": a.forward.flops, "forward_flops_measured": m.forward_flops,
        "backward_flops": a.backward.flops, "backward_flops_measured": m.backward_flops,
        "recompute_flops": a.recompute.flops,
        "backward_exact": a.backward.flops == m.backward_flops,
        "forward_exact": a.forward.flops == m.forward_flops,
        "peak_bytes": a.memory.peak_bytes, "peak_bytes_measured": m.peak_bytes,
        "peak_error": a.memory.peak_bytes / m.peak_bytes - 1,
        "max_by_kind": a.memory.max_by_kind.as_dict(), "max_by_kind_measured": m.max_by_kind.as_dict(),
        "kind_error": {k: _err(getattr(a.memory.max_by_kind, k), getattr(m.max_by_kind, k)) for k in KINDS},
        "bytes_per_param": a.bytes_per_param(),
        "seconds": time.perf_counter() - t0,
    }
    return row


def _err(a: int, m: int) -> float | None:
    return None if m == 0 and a == 0 else (a / m - 1 if m else float("inf"))


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r and r["precision"] == "fp32" and not r["checkpoint"]]
    summary = {
        "date": date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
        "models": len([r for r in rows if r["precision"] == "fp32" and not r["checkpoint"]]),
        "traced": len(ok),
        "backward_exact": sum(r["backward_exact"] for r in ok),
        "forward_exact": sum(r["forward_exact"] for r in ok),
        "not_exact": [r["spec"] for r in ok if not r["backward_exact"]],
        "failed": {r["spec"]: r["error"] for r in rows if "error" in r},
    }
    for kind in KINDS + ("peak",):
        errs = [abs(r["peak_error"] if kind == "peak" else r["kind_error"][kind]) for r in ok
                if (r["peak_error"] if kind == "peak" else r["kind_error"][kind]) is not None]
        if errs:
            errs.sort()
            summary[f"abs_error_{kind}"] = {"median": errs[len(errs) // 2], "max": errs[-1]}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--specs", default=None, help="comma-separated specs (default: every zoo model and HF type)")
    ap.add_argument("--quick", action="store_true", help="three small models only (a check that it runs)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --json (runs split over processes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.quick:
        specs = ["zoo:mlp", "zoo:cnn", "hf-config:bert"]
    elif args.specs:
        specs = args.specs.split(",")
    else:
        # wav2vec2's LayerDrop skips encoder layers at random in training: the traced and the eager
        # steps would draw apart (tests/test_train_step.py runs it the same way)
        specs = [f"zoo:{n}" for n in ZOO.names()] + [f"hf-config:{t}" + ("?layerdrop=0.0" if t == "wav2vec2" else "")
                                                     for t in HF_TYPES]
    rows = []
    runs = [(s, False, "fp32") for s in specs]
    if "zoo:gpt" in specs:
        runs += [("zoo:gpt", True, "fp32"), ("zoo:gpt", False, "bf16"), ("zoo:gpt", True, "bf16")]
    for spec, ck, prec in runs:
        rows.append(one(spec, ck, prec))
        r = rows[-1]
        print(spec, ck, prec, r.get("error") or f"backward {'exact' if r['backward_exact'] else 'DIFF'} "
              f"{r['backward_flops']} vs {r['backward_flops_measured']}; peak {r['peak_error']:+.1%}", flush=True)
        if args.json:   # after every model: a long run cut short keeps what it measured
            path = Path(args.json)
            done = json.loads(path.read_text()).get("rows", []) if args.append and path.is_file() else []
            keep = [d for d in done if (d["spec"], d["checkpoint"], d["precision"]) != (spec, ck, prec)]
            all_rows = keep + [r] if args.append else rows
            path.write_text(json.dumps({"summary": summarise(all_rows), "rows": all_rows}, indent=2))
    print(summarise(rows))


if __name__ == "__main__":
    main()
