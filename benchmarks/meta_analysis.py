"""Full-size models analysed without weights (kiln.models.meta): a 70B Llama's `kiln analyze`
wall time and peak memory, its exactness by scaling, and GPT-3 175B's forward FLOPs per token
against 2N.

    .venv/bin/python benchmarks/meta_analysis.py [--json PATH] [--layers 80]

- 70B: `kiln analyze` on the issue's hf-config spec, input 1x4096, on h100, in a fresh process
  (Python start, imports, meta build, capture, cost, JSON): its wall time and its peak resident
  memory (the child's ru_maxrss). The wall time depends on the machine's load: say so.
- exactness: the same config at 2 and 4 layers fixes per-layer and rest figures (FLOPs, bytes,
  parameters, weight bytes); the 80-layer analysis must equal rest + 80 x per layer exactly, and
  its peak activation must equal the 2-layer one.
- GPT-3 175B (preset:gpt3-175b, 1x2048): forward FLOPs per token beside 2N (N all parameters)
  and 2N_non-embedding + 2 n_layer n_ctx d_model (Kaplan et al. 2020, table 1: the forward pass
  per token; the attention term counts QK^T and PV at the full context, as flop_counter does),
  and the exact account: 2 x the matmul weights + 4 n_layer n_ctx d_model + 2 vocab d_model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import write_with_history  # noqa: E402

from kiln.analysis.report import analyze  # noqa: E402
from kiln.hardware.profiles import load_profile  # noqa: E402
from kiln.models.meta import load_for_analysis, load_meta, with_meta_input_shapes  # noqa: E402

KILN = os.path.join(os.path.dirname(sys.executable), "kiln")
LLAMA_70B = ("hf-config:llama?hidden_size=8192&intermediate_size=28672&num_hidden_layers={}"
             "&num_attention_heads=64&num_key_value_heads=8&vocab_size=128256")
KEYS = ("flops", "bytes", "params", "param_bytes")


def cli_70b(layers: int) -> tuple[dict, float, float, float]:
    """(the analysis JSON, wall seconds, CPU seconds, peak resident MB) of `kiln analyze` in a
    fresh process. On a shared machine the CPU seconds (user + system) say more than the wall."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/a.json"
        t0 = time.perf_counter()
        subprocess.run([KILN, "analyze", LLAMA_70B.format(layers), "--input-shape", "1x4096", "--hardware", "h100",
                        "--no-measure", "--top", "0", "--json", out], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mb = usage.ru_maxrss / 1024   # Linux: kB
        with open(out) as f:
            return json.load(f), wall, usage.ru_utime + usage.ru_stime, peak_mb


def figures(layers: int) -> dict:
    loaded = with_meta_input_shapes(load_meta(LLAMA_70B.format(layers)), ["1x4096"])
    a = analyze(loaded, load_profile("h100"), measure_time=False)
    return {"flops": a.flops, "bytes": a.cost.bytes, "params": a.params, "param_bytes": a.param_bytes,
            "peak_activation_bytes": a.memory.peak_activation_bytes}


def scaling(big: dict, layers: int) -> dict:
    two, four = figures(2), figures(4)
    predicted = {k: two[k] + (layers - 2) * (four[k] - two[k]) // 2 for k in KEYS}
    got = {k: big[k] for k in KEYS}
    return {"per_layer": {k: (four[k] - two[k]) // 2 for k in KEYS}, "predicted": predicted, "got": got,
            "exact": predicted == got and big["peak_activation_bytes"] == two["peak_activation_bytes"]}


def gpt3() -> dict:
    loaded, why = load_for_analysis("preset:gpt3-175b")
    a = analyze(loaded, load_profile("h100"), measure_time=False)
    cfg = loaded.model.config
    tokens = loaded.example_kwargs["input_ids"].shape[1]
    n = a.params
    n_embed = cfg.vocab_size * cfg.n_embd + cfg.n_positions * cfg.n_embd
    kaplan = 2 * (n - n_embed) + 2 * cfg.n_layer * tokens * cfg.n_embd
    per_token = a.flops / tokens
    # the exact account: 2 x every matmul weight (2-D parameters but the embedding tables), both
    # attention matmuls over the full context (2 x 2 n_layer n_ctx d_model), the tied LM head
    matmul = sum(p.numel() for name, p in loaded.model.named_parameters()
                 if p.dim() == 2 and not name.endswith(("wte.weight", "wpe.weight")))
    account = 2 * matmul + 4 * cfg.n_layer * tokens * cfg.n_embd + 2 * cfg.vocab_size * cfg.n_embd
    return {"exact_account_per_token": account, "account_equals": account * tokens == a.flops,"no_weights_because": why, "params": n, "tokens": tokens, "forward_flops": a.flops,
            "flops_per_token": per_token, "two_n": 2 * n, "ratio_to_2n": per_token / (2 * n),
            "kaplan_forward_per_token": kaplan, "ratio_to_kaplan": per_token / kaplan,
            "lm_head_flops_per_token": 2 * cfg.vocab_size * cfg.n_embd,
            "roofline_h100_s": a.roofline.latency_s,
            "note": "2N counts the tied embedding once; the LM head's matmul (2 x vocab x d_model per token) "
                    "runs it a second time, and attention adds 2 x 2 n_layer n_ctx d_model"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--layers", type=int, default=80)
    args = parser.parse_args()
    result, wall, cpu, peak_mb = cli_70b(args.layers)
    big = {"flops": result["flops"], "bytes": result["bytes"], "params": result["params"],
           "param_bytes": result["param_bytes"], "peak_activation_bytes": result["peak_activation_bytes"]}
    summary = {
        "date": str(date.today()), "layers": args.layers,
        "llama70b_cli_wall_s": round(wall, 1), "llama70b_cli_cpu_s": round(cpu, 1),
        "llama70b_cli_peak_rss_mb": round(peak_mb),
        "llama70b": big | {"roofline_h100_s": result["roofline"]["latency_s"],
                           "weights_materialised": result["weights_materialised"]},
        "scaling": scaling(big, args.layers),
        "gpt3_175b": gpt3(),
        "load_avg_1min": os.getloadavg()[0],
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.json:
        write_with_history(args.json, {"summary": summary})


if __name__ == "__main__":
    main()
