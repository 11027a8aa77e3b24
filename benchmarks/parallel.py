"""Parallel training on this machine: throughput of each mode at 2 processes (a 2-D plan at its
mesh's 4) against DDP and against 1 process, per-rank model-state bytes and peak memory against
1 process, and each pipeline rank's measured idle share against the bubble (p-1)/(m+p-1).

Every time is the trainer's own measured step time (metrics.json `throughput_samples_s`,
`train_time_s`); memory is each rank's model states counted tensor by tensor (exact) and its
process's peak RSS (getrusage). The 2 processes run 1 thread each; the 1-process baseline runs 2
threads: both use the same 2 cores. On a 2-core CPU this measures overheads, not speed-ups:
re-run on a quiet machine before quoting the times.

    .venv/bin/python benchmarks/parallel.py [--model zoo:gpt] [--steps 30] [--batch 32] [--json PATH]
    .venv/bin/python benchmarks/parallel.py --small     # a 2-layer GPT, 4 steps: checks the script runs
    .venv/bin/python benchmarks/parallel.py --recompute benchmarks/results/parallel_quiet.json \
        [--stored-overheads] --json benchmarks/results/parallel_predicted.json
        # the planner against a stored run, no training (--stored-overheads: no timing at all)
    cp README.md /tmp/corpus.txt && .venv/bin/python benchmarks/parallel.py --wide --steps 4 --batch 8 \
        --dataset "rt-lm?path=/tmp/corpus.txt"
        # memory at 25 M parameters; README's text as the corpus (rt-lm reads a .txt as one
        # document per line, anything else as CSV) keeps the per-epoch evaluation short
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from dataclasses import replace
from datetime import date

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

from kiln.runs.artifact import default_dataset  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.distributed import launch  # noqa: E402
from kiln.train.parallel.config import Mode, ParallelConfig, PipeSchedule  # noqa: E402
from kiln.train.trainer import fit  # noqa: E402

PLANS = {
    "ddp": ParallelConfig(),
    "zero1": ParallelConfig(modes=(Mode.ZERO1,)),
    "fsdp (ZeRO-3)": ParallelConfig(modes=(Mode.FSDP,)),
    "fsdp (ZeRO-2-like)": ParallelConfig(modes=(Mode.FSDP,), reshard_after_forward=False),
    "tp": ParallelConfig(modes=(Mode.TP,)),
    "pp gpipe m=4": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.GPIPE, microbatches=4),
    "pp 1f1b m=4": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.ONE_F_ONE_B, microbatches=4),
    "pp 1f1b m=8": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.ONE_F_ONE_B, microbatches=8),
    # 2-D plans run on their mesh's processes (4 here), not 2
    "ddp x tp 2x2": ParallelConfig(modes=(Mode.DDP, Mode.TP), mesh=(2, 2)),
}


def processes(plan: ParallelConfig) -> int:
    """A plan's mesh fixes its process count; a 1-D plan runs on 2."""
    n = 1
    for k in plan.mesh:
        n *= k
    return n if plan.mesh else 2
SMALL = textwrap.dedent('''
    import torch
    from kiln.models.zoo.gpt import GPT, GPTConfig

    def gpt():
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)), (torch.randint(0, 256, (1, 16)),)

    def wide():
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=64, dropout=0.0)), (torch.randint(0, 256, (1, 64)),)
''')


def states(ranks: list[dict]) -> list[int]:
    return [r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in ranks]


def run_mode(base: dict, tmp: str, name: str, plan: ParallelConfig, nproc: int = 2) -> dict:
    out = os.path.join(tmp, name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", ""))
    launch(TrainConfig(**base, out=out, threads=1), nproc=nproc, parallel=plan)
    m = json.load(open(os.path.join(out, "metrics.json")))
    ranks = m["parallel"]["ranks"]
    row = {"mode": name, "processes": nproc, "samples_s": m["throughput_samples_s"],
           "step_s": m["train_time_s"] / m["steps"], "model_state_bytes_per_rank": states(ranks),
           "peak_rss_mb_per_rank": [round(r["peak_rss_bytes"] / 2**20, 1) for r in ranks]}
    if "idle_fraction" in ranks[0]:
        row["pipeline"] = [{"rank": r["pp_rank"], "idle_measured": r["idle_fraction"], "bubble_theory": r["bubble_theory"],
                            "microbatches": r["microbatches"], "units": r["units"]} for r in ranks]
    return row


# the benchmark's mode names -> `kiln plan`'s (the plan a `--parallel MODE --nproc 2` run executes)
PREDICTED = {"ddp": "ddp", "zero1": "zero1", "fsdp (ZeRO-3)": "fsdp", "tp": "tp", "pp 1f1b m=4": "pp"}
ISSUE_MODES = ("ddp", "fsdp", "pp", "tp")     # the modes issue 14's figure names (zero1 is extra)


def quiet_cluster(plan_json: str = os.path.join(os.path.dirname(__file__), "results", "plan.json"), contention=None):
    """The local cluster of the collectives stored by `benchmarks/plan.py --collectives` (its fits
    at the calibration sizes), so that predictions recomputed from stored runs need no timing."""
    from kiln.plan.calibrate import local_profile
    from kiln.plan.cluster import CalibratedConfig, Cluster

    entry = json.load(open(plan_json))["collectives"]
    fits = {k: CalibratedConfig(**{f: tuple(v) if isinstance(v, list) else v for f, v in d.items()})
            for k, d in entry["fits"].items()}
    processes = tuple(next(iter(fits.values())).processes)
    return Cluster(local_profile(fits, processes, contention=contention), f"{plan_json} collectives ({entry.get('date', '?')})")


def with_contention(cluster, contention):
    """The cluster with its processes' contention for the cores replaced."""
    from kiln.plan.cluster import Cluster

    return Cluster(replace(cluster.config, contention=contention), cluster.path)


def contention_of_stored_run(d: dict):
    """For a stored run that has no contention measurement: its own 1-process rows, one thread
    against two threads of one process on the same cores, 2 x T(2 threads) / T(1 thread): what
    each core's compute costs when both compute, against one alone. An upper bound on the
    contention (it also holds the intra-op threading's own cost), from one process: nothing of
    a 2-process run enters it."""
    from kiln.plan.cluster import ContentionConfig

    one = next(r for r in d["modes"] if r["processes"] == 1)
    two_threads = d["global_batch"] / d["one_process_2_threads_samples_s"]
    slowdown = max(1.0, 2 * two_threads / one["step_s"])
    how = (f"the stored run's 1-process rows: 2 threads {two_threads:.4f} s, 1 thread {one['step_s']:.4f} s per step; "
           f"2 x {two_threads:.4f} / {one['step_s']:.4f} = {slowdown:.3f}")
    return ContentionConfig((2,), (slowdown,)), how


def overheads_for(spec: str, batch: int, nproc: int = 2) -> dict:
    """Each predicted mode's engine overhead per step, measured on one process at the batch one
    of its `nproc` ranks sees (kiln.plan.overhead; CPU time, so a busy machine may measure it)."""
    from kiln.plan.overhead import engine_overheads

    batches = {m: batch if m == "tp" else batch // nproc for m in set(PREDICTED.values()) if m != "pp"}
    return engine_overheads(spec, batches)


def predicted_vs_measured(spec: str, batch: int, rows: list[dict], cores: int, cluster="local",
                          overheads: dict | None = None) -> dict:
    """kiln plan's step time for each mode at 2 processes beside the measured one; the error and
    whether the planner ranks the modes as the measurement does. The compute efficiency comes
    from the 1-process row alone (1 thread of `cores`: kiln.plan.plans.calibrated_efficiency),
    each engine's overhead from one process (`overheads`, kiln.plan.overhead); nothing of a
    2-process run enters a prediction."""
    from kiln.hardware.profiles import load_profile
    from kiln.plan.cluster import load_cluster
    from kiln.plan.plans import calibrated_efficiency
    from kiln.plan.run import predict_mode
    from kiln.plan.workload import load_workload

    workload = load_workload(spec)
    cluster = cluster if not isinstance(cluster, str) else load_cluster(cluster)
    hw = load_profile(cluster.config.device)
    one = next(r for r in rows if r["processes"] == 1)
    efficiency = calibrated_efficiency(workload, cluster, hw, batch, one["step_s"], share=cores)
    # the overheads' yardstick: their run's reference engine at this batch against the 1-process
    # row's step (a busy machine stretches CPU time too, by its cache and memory contention,
    # about alike for every engine: 1.37x in one run here, 0.99x in another)
    reference = (overheads or {}).get("median_s", {}).get(f"ddp@{batch}")
    scale = one["step_s"] / reference if reference else 1.0
    per_mode = {m: v * scale for m, v in (overheads or {}).get("overhead_s", {}).items()}
    out = []
    for r in rows:
        mode = PREDICTED.get(r["mode"])
        if mode is None:
            continue
        # the benchmark's pipeline runs 4 micro-batches
        predicted = predict_mode(spec, mode, 2, batch, cluster=cluster, workload=workload,
                                 microbatches=4 if mode == "pp" else 0, efficiency=efficiency,
                                 overheads=per_mode)
        out.append({"mode": r["mode"], "measured_step_s": r["step_s"], "predicted_step_s": predicted.step_s,
                    "error": predicted.step_s / r["step_s"] - 1, "parts_s": predicted.parts})
    measured_rank = [o["mode"] for o in sorted(out, key=lambda o: o["measured_step_s"])]
    predicted_rank = [o["mode"] for o in sorted(out, key=lambda o: o["predicted_step_s"])]
    issue = [o for o in out if PREDICTED[o["mode"]] in ISSUE_MODES]
    return {"rows": out, "within_30pct": sum(abs(o["error"]) <= 0.30 for o in out), "of": len(out),
            "measured_ranking": measured_rank, "predicted_ranking": predicted_rank,
            "rankings_agree": measured_rank == predicted_rank,
            "issue_modes_within_30pct": f"{sum(abs(o['error']) <= 0.30 for o in issue)}/{len(issue)}",
            "issue_modes_rankings_agree": [m for m in measured_rank if PREDICTED[m] in ISSUE_MODES]
            == [m for m in predicted_rank if PREDICTED[m] in ISSUE_MODES], "efficiency": efficiency,
            "efficiency_from": f"{one['mode']}: {one['step_s']:.4f} s per step, 1 thread of {cores} cores",
            "cluster": cluster.path or cluster.name, "hardware": hw.path or hw.name, "overheads": overheads,
            "overhead_scale": scale, "overheads_used_s": per_mode}


def recompute(stored: str, out: str | None, stored_overheads: bool = False) -> None:
    """Predictions for a stored measurement (no timing of the modes): the collectives from
    results/plan.json, the efficiency and the cores' contention from the stored 1-process rows
    (contention_of_stored_run), the engines' overheads measured now on one process, or with
    `stored_overheads` those the stored run measured (CPU time; no timing now)."""
    d = json.load(open(stored))
    contention, how = contention_of_stored_run(d)
    overheads = d.get("planner", {}).get("overheads") if stored_overheads else None
    result = {"date": date.today().isoformat(), "measured": stored, "measured_date": d["date"], "model": d["model"],
              "global_batch": d["global_batch"], "contention_from": how,
              "overheads_from": "the stored run's (measured with it)" if overheads else "measured now, on one process",
              "planner": predicted_vs_measured(d["model"], d["global_batch"], d["modes"], d["cores"],
                                               cluster=quiet_cluster(contention=contention),
                                               overheads=overheads or overheads_for(d["model"], d["global_batch"]))}
    report(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:gpt")
    parser.add_argument("--dataset")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="a 2-layer GPT for 4 steps: checks the script runs")
    parser.add_argument("--wide", action="store_true",
                        help="zoo:gpt's architecture at 8 layers x 512 wide (25 M parameters, 400 MB of AdamW model "
                             "states): memory large enough to see in each process's peak RSS")
    parser.add_argument("--only", nargs="*", help="modes to run (default: all)")
    parser.add_argument("--predict", action="store_true",
                        help="beside each measured ddp/zero1/fsdp/tp/pp step, kiln plan's prediction for this machine "
                             "(the calibrated `local` cluster) and whether the two rankings agree")
    parser.add_argument("--recompute", metavar="STORED_JSON",
                        help="no training: the planner's predictions for a stored run of this script (its "
                             "1-process row, results/plan.json's collectives, engine overheads measured now)")
    parser.add_argument("--stored-overheads", action="store_true",
                        help="with --recompute: the engine overheads the stored run measured, not new ones")
    parser.add_argument("--mmap-threshold", type=int,
                        help="glibc's mmap threshold for the modes' workers (0: glibc's defaults; default: kiln's "
                             "choice per mode, kiln.train.parallel.config.allocator_env)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.recompute:
        return recompute(args.recompute, args.json, args.stored_overheads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.py")
        open(path, "w").write(SMALL)
        if args.small:
            args.model, args.dataset, args.steps, args.batch = f"py:{path}:gpt", "rt-lm?block=16", 4, 8
        if args.wide:
            args.model, args.dataset = f"py:{path}:wide", args.dataset or "rt-lm"
        dataset = args.dataset or default_dataset(args.model)
        base = dict(model=args.model, dataset=dataset, epochs=1, max_steps=args.steps, batch_size=args.batch,
                    schedule="constant", seed=0)
        plain = fit(TrainConfig(**base, out=os.path.join(tmp, "plain"), threads=2), progress=False)
        one = run_mode(base, tmp, "1 process (ddp engine, world 1)", ParallelConfig(), nproc=1)
        plans = {name: plan if args.mmap_threshold is None else replace(plan, mmap_threshold=args.mmap_threshold)
                 for name, plan in PLANS.items() if not args.only or name in args.only}
        rows = [one] + [run_mode(base, tmp, name, plan, processes(plan)) for name, plan in plans.items()]
        # inside the temporary directory: a --small or --wide model's factory lives there
        predictions = None
        if args.predict:
            from kiln.plan.calibrate import measure_contention
            from kiln.plan.cluster import load_cluster

            # this run's own measurement of 2 single-process copies computing at once
            contention, probe = measure_contention((2,))
            predictions = predicted_vs_measured(args.model, args.batch, rows, os.cpu_count(),
                                                cluster=with_contention(load_cluster("local"), contention),
                                                overheads=overheads_for(args.model, args.batch))
            predictions["contention"] = {"processes": list(contention.processes), "slowdown": list(contention.slowdown),
                                         "probe_s": probe}
    ddp = next((r for r in rows if r["mode"] == "ddp"), None)
    for r in rows:
        r["vs_1_process_2_threads"] = r["samples_s"] / plain["throughput_samples_s"]
        r["vs_ddp"] = r["samples_s"] / ddp["samples_s"] if ddp else None
        r["model_states_vs_1_process"] = [b / one["model_state_bytes_per_rank"][0] for b in r["model_state_bytes_per_rank"]]
    result = {"date": date.today().isoformat(), "model": "wide GPT (8 x 512)" if args.wide else args.model, "dataset": dataset, "global_batch": args.batch,
              "mmap_threshold": "kiln's choice per mode" if args.mmap_threshold is None else args.mmap_threshold,
              "environment_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              "steps": args.steps, "cores": os.cpu_count(), "one_process_2_threads_samples_s": plain["throughput_samples_s"],
              "note": "2 processes x 1 thread share the 2 cores the 1-process baseline uses with 2 threads; "
                      "times need a quiet machine", "modes": rows}
    if predictions:
        result["planner"] = predictions
    report(result, args.json)


if __name__ == "__main__":
    main()
