"""Issue 6's figures: backends chosen by measurement, kiln's graph passes, LoadGen against a raw
loop, and MiniLM's achieved fraction of the fp32 matmul peak.

    TORCHINDUCTOR_COMPILE_THREADS=1 flock /tmp/kiln-cpu.lock \
        .venv/bin/python benchmarks/compile_figures.py zoo [--models cnn,gpt] [--batches 1,64] [--out PATH]
    ... compile_figures.py loadgen      # Offline throughput and SingleStream p90 vs a raw loop
    ... compile_figures.py peak         # MiniLM 32 x 128 on its best fp32 backend vs matmul peak
    ... compile_figures.py table        # print the tables for BENCHMARKS.md from the JSON

All runs: torch.set_num_threads(2), ONNX Runtime with 2 intra-op threads, inputs at the batch
size (floats random, seeded; token ids repeated from the example). `zoo` runs `kiln compile
--backend auto` (kiln.compile.auto.select over every fp32 candidate) per model and batch, with
the peers (eager, torch.compile default, ONNX Runtime default, OpenVINO fp32) in its final
round: auto's figure and every peer's come from that one interleaved measurement, the one the
choice stands on (auto's chosen backend is the fastest there by construction). OpenVINO int8
(NNCF post-training quantization calibrated as `kiln compile` calibrates: 256 training-split
samples of the model's dataset, else its example inputs) is timed beside the chosen backend in
fresh interleaved rounds: it is a column beside, not a peer auto must beat, since auto here
chooses among fp32 candidates. Results merge into
benchmarks/results/compile_figures.json (or --out) per model and batch, so the sweep can run in
parts. A smoke: `zoo --models cnn --batches 1 --budget 1 --out /tmp/cf.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import merge_result  # noqa: E402

from kiln.compile.auto import AUTO, at_batch, batch_dim_size, call, select  # noqa: E402
from kiln.compile.backends import Precision  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.timing import TimingConfig, format_timing, measure  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "compile_figures.json")
PEERS = ("eager", "inductor", "onnxruntime", "openvino")     # eager, torch.compile default, ORT and OpenVINO default
OV_INT8 = "openvino:dtype=int8"                  # a column beside: int8, not one of auto's fp32 candidates
ZOO = ("cnn", "mlp", "resnet20", "mobilenet_v2", "efficientnet_lite0", "c3d", "vit_tiny", "gpt", "minilm",
       "minilm_cls", "gcn", "gat", "vae", "ddpm")
CNNS = ("cnn", "resnet20", "mobilenet_v2", "efficientnet_lite0", "c3d")


def _rounds(model, loaded, budget_s: float, lo: int = 5, hi: int = 20) -> int:
    """As many interleaved rounds as fit the budget at eager speed, within [lo, hi]."""
    once = TimingConfig(rounds=1, warmup=1, short_call_s=0.0, remeasure=False)
    per_call = measure({"eager": lambda: model(*loaded.example_inputs, **loaded.example_kwargs)}, once)["eager"].median
    return max(lo, min(hi, int(budget_s / (per_call * len(AUTO[Precision.FP32]) + 1e-9))))


def _openvino_int8(name: str, base, loaded) -> dict:
    """OpenVINO int8 (NNCF) built as `kiln compile` builds it, checked against eager: the callable
    under "fn" when it ran within int8's tolerance, else why not."""
    from kiln.compile.backends import TOLERANCE, build, parse_backend
    from kiln.compile.run import calibration_inputs
    from kiln.compile.verify import relative_error
    from kiln.errors import KilnError
    from kiln.runs.artifact import load_source

    batches, note = calibration_inputs(load_source(f"zoo:{name}"))
    try:
        fn = build(parse_backend(OV_INT8), base.model, loaded, batches)
    except KilnError as exc:
        return {"status": "failed", "reason": str(exc), "calibration": note}
    err = relative_error(call(fn, loaded), call(base.model.eval(), loaded))
    out = {"status": "ok" if err <= TOLERANCE[Precision.INT8] else "rejected", "error": err, "calibration": note}
    if out["status"] == "ok":
        out["fn"] = fn
    return out


def zoo(models: list[str], batches: list[int], budget_s: float, results: str = RESULTS) -> None:
    for name in models:
        base = load(f"zoo:{name}")
        for batch in batches:
            if batch_dim_size(base) is None and batch != 1:
                merge_result(results, f"zoo:{name}@{batch}", {"skipped": "inputs have no batch dimension (a whole graph)"})
                continue
            loaded = at_batch(base, batch)
            rounds = _rounds(base.model.eval(), loaded, budget_s)
            print(f"== zoo:{name} batch {batch}: auto over {len(AUTO[Precision.FP32])} candidates, {rounds} rounds",
                  flush=True)
            t0 = time.perf_counter()
            auto = select(base.model, loaded, list(AUTO[Precision.FP32]), Precision.FP32, rounds=rounds,
                          progress=lambda s: print("  ", s, flush=True), also=PEERS)
            select_s = time.perf_counter() - t0
            final = auto.final        # auto and the peers, in the rounds the choice stands on
            ok = [b for b in [auto.chosen] + [p for p in PEERS if p != auto.chosen] if auto.by_name(b).status == "ok"]
            fns = {auto.chosen: auto.fns[auto.chosen]}
            int8 = _openvino_int8(name, base, loaded)
            if "fn" in int8:
                fns[OV_INT8] = int8.pop("fn")
            int8_m = measure({b: (lambda fn=fn: call(fn, loaded)) for b, fn in fns.items()},
                             TimingConfig(rounds=rounds, warmup=2)) if len(fns) > 1 else None
            entry = {
                "model": f"zoo:{name}", "batch": batch, "threads": torch.get_num_threads(), "rounds": rounds,
                "chosen": auto.chosen, "select_s": select_s,
                "candidates": auto.to_dict()["candidates"],
                "retimed": {b: {"latency_s": final[b].median, "p90_s": final[b].p90, "timing": final[b].to_dict()}
                            for b in ok},
                "retimed_note": final.note(),
                "peer_status": {p: auto.by_name(p).status + (": " + auto.by_name(p).reason if auto.by_name(p).reason else "")
                                for p in PEERS},
                "openvino_int8": int8,
                "date": str(date.today()),
            }
            if int8_m is not None:   # beside the chosen backend in its own rounds: scaled to its final-round figure
                ratio = int8_m[OV_INT8].median / int8_m[auto.chosen].median
                scale = final[auto.chosen].median / int8_m[auto.chosen].median
                entry["retimed"][OV_INT8] = {"latency_s": ratio * final[auto.chosen].median,
                                             "p90_s": scale * int8_m[OV_INT8].p90,
                                             "timing": int8_m[OV_INT8].to_dict()}
                entry["auto_vs_openvino_int8"] = ratio
            auto_s = final[auto.chosen].median
            peers = {p: final[p].median for p in PEERS if p in ok}   # auto's choice may be one of them
            entry["auto_vs_best_peer"] = min(peers.values()) / auto_s
            merge_result(results, f"zoo:{name}@{batch}", entry)
            print(f"   chosen {auto.chosen}: {format_timing(final[auto.chosen])}; "
                  + ", ".join(f"{p} {format_timing(final[p])}" for p in peers if p != auto.chosen)
                  + (f"; OpenVINO int8 {entry['auto_vs_openvino_int8']:.2f}x its time" if int8_m is not None else "")
                  + (f"; timing: {final.note()}" if final.note() else ""), flush=True)
            del auto, fns


def loadgen(batch: int, duration: float) -> None:
    """LoadGen Offline vs a raw loop (throughput) and SingleStream vs a raw loop (p90), same
    backend (eager and the best of inductor/ORT), same batches, interleaved pairs."""
    from kiln.compile.backends import build, parse_backend
    from kiln.bench.run import real_inputs
    from kiln.bench.loadgen import BenchConfig, Scenario, dataset_samples, raw_loop, run_loadgen
    from kiln.runs.artifact import load_source

    out = {"date": str(date.today()), "threads": torch.get_num_threads(), "min_duration_s": duration}
    for src, backend in (("zoo:minilm_cls", "onnxruntime"), ("zoo:resnet20", "inductor:freezing=1,passes=1")):
        source = load_source(src)
        samples = dataset_samples(source.dataset, 1024)
        for scenario, b in (("Offline", batch), ("SingleStream", 1)):
            loaded = real_inputs(source, samples, b)
            fn = build(parse_backend(backend), source.model, loaded)
            cfg = BenchConfig(Scenario(scenario), batch=b if scenario == "Offline" else 0, min_duration_s=duration)
            raw1 = raw_loop(fn, samples, b, seconds=duration)
            lg = run_loadgen(fn, samples, cfg)
            raw2 = raw_loop(fn, samples, b, seconds=duration)
            key = f"{src} {backend} {scenario} batch {b}"
            if scenario == "Offline":
                raw = (raw1["samples_per_second"] + raw2["samples_per_second"]) / 2
                entry = {"loadgen_samples_per_s": lg["result_samples_per_second"], "raw_samples_per_s": raw,
                         "ratio": lg["result_samples_per_second"] / raw, "valid": lg["valid"]}
            else:
                raw = (raw1["p90_latency_s"] + raw2["p90_latency_s"]) / 2
                lg_p90 = lg["result_90.00_percentile_latency_ns"] / 1e9
                entry = {"loadgen_p90_s": lg_p90, "raw_p90_s": raw, "ratio": lg_p90 / raw, "valid": lg["valid"],
                         "loadgen_queries": lg["result_query_count"]}
            out[key] = entry
            print(key, entry, flush=True)
    merge_result(RESULTS, "loadgen", out)


def peak(rounds: int) -> None:
    """MiniLM (zoo:minilm, the sentence encoder) at 32 x 128 tokens: FLOPs counted by kiln's
    analysis, every fp32 candidate timed, beside the fp32 matmul peak measured in this run."""
    from kiln.analysis.report import analyze
    from kiln.hardware.calibrate import matmul_peak
    from kiln.hardware.profiles import load_profile

    base = load("zoo:minilm")
    loaded = at_batch(base, 32)
    flops = analyze(loaded, load_profile("a100"), measure_time=False).flops
    peak_before = matmul_peak(2048, torch.float32, budget_s=10.0).value
    sel = select(base.model, loaded, list(AUTO[Precision.FP32]), Precision.FP32, rounds=rounds,
                 progress=lambda s: print("  ", s, flush=True))
    peak_after = matmul_peak(2048, torch.float32, budget_s=10.0).value
    peak_flops = max(peak_before, peak_after)
    best = sel.by_name(sel.chosen)
    entry = {"model": "zoo:minilm", "shape": "32 x 128", "flops": flops, "peak_fp32_flops": peak_flops,
             "peak_before": peak_before, "peak_after": peak_after, "chosen": sel.chosen,
             "chosen_latency_s": best.latency_s, "achieved_flops": flops / best.latency_s,
             "fraction_of_peak": flops / best.latency_s / peak_flops,
             "candidates": {c.backend: {"latency_s": c.latency_s, "fraction": flops / c.latency_s / peak_flops}
                            for c in sel.candidates if c.status == "ok"},
             "threads": torch.get_num_threads(), "rounds": rounds, "date": str(date.today())}
    merge_result(RESULTS, "minilm_peak", entry)
    print(json.dumps(entry, indent=1))


def table(results: str = RESULTS) -> None:
    res = json.load(open(results))
    print("| model | batch | auto's choice | auto | eager | torch.compile | ORT | OpenVINO | auto vs best peer "
          "| OpenVINO int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, e in res.items():
        if "@" not in key:
            continue
        if "skipped" in e:
            print(f"| {key.split('@')[0]} | {key.split('@')[1]} | - | {e['skipped']} | | | | | | |")
            continue
        r = e["retimed"]
        status = {**e["peer_status"], OV_INT8: e.get("openvino_int8", {}).get("status", "not measured")}
        def cell(b):
            return f"{r[b]['latency_s'] * 1e3:.3g} ms" if b in r else status.get(b, "not measured").split(":")[0]
        best = min(r[p]["latency_s"] for p in PEERS if p in r)
        print(f"| {e['model']} | {e['batch']} | {e['chosen']} | {cell(e['chosen'])} | {cell('eager')} | "
              f"{cell('inductor')} | {cell('onnxruntime')} | {cell('openvino')} | "
              f"{best / r[e['chosen']]['latency_s']:.2f}x | {cell(OV_INT8)} |")
    print("\nkiln's graph passes, same backend with and without (median latency, from the auto rounds):")
    print("| model | batch | eager | eager + passes | gain | inductor freezing | + passes | gain |")
    print("|---|---|---|---|---|---|---|---|")
    for key, e in res.items():
        if "@" not in key or "skipped" in e or e["model"].split(":")[1] not in CNNS:
            continue
        c = {x["backend"]: x for x in e["candidates"]}
        lat = lambda b: c[b]["latency_s"] if c[b]["status"] == "ok" else None  # noqa: E731
        a, b, d, f = lat("eager"), lat("eager:passes=1"), lat("inductor:freezing=1"), lat("inductor:freezing=1,passes=1")
        fmt = lambda v: f"{v * 1e3:.3g} ms" if v else "-"  # noqa: E731
        print(f"| {e['model']} | {e['batch']} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x | {fmt(d)} | {fmt(f)} | "
              f"{(d / f) if d and f else float('nan'):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("zoo", "loadgen", "peak", "table"))
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--budget", type=float, default=20.0, help="zoo: seconds of timing per model and batch")
    ap.add_argument("--batch", type=int, default=32, help="loadgen: Offline batch")
    ap.add_argument("--duration", type=float, default=15.0, help="loadgen: LoadGen min duration and raw loop seconds")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=RESULTS, help="zoo and table: the results JSON (a smoke run: another file)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.what == "zoo":
        zoo(args.models.split(","), [int(b) for b in args.batches.split(",")], args.budget, args.out)
    elif args.what == "loadgen":
        loadgen(args.batch, args.duration)
    elif args.what == "peak":
        peak(args.rounds)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
