"""Worker processes sharing one study: 2 workers against 1, same study definition.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/search_workers.py [--trials 40]
        [--steps 300] [--repeats 3] [--json benchmarks/results/search_workers.json]

The study: the train-hparams space (a 2-stage ConvNet trained for a fixed number of AdamW
steps on MNIST, lr and weight decay searched, random sampler so the proposal cost does not
grow with the study), `trials` trials. Each case starts its workers the way `kiln search
--workers N` does (kiln.search.workers: one process per worker, one torch thread each, one
journal-file storage), and is timed from launch to the last worker's exit, process start-up
included. Checks: the study holds exactly `trials` trials, numbered 0..trials-1, all complete,
with no parameter set run twice (a trial a worker created past the budget in a race is marked
surplus, never runs, and is counted apart).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.config import to_toml  # noqa: E402
from kiln.search.config import parse_search_config  # noqa: E402
from kiln.search.engine import SURPLUS, make_space, open_study  # noqa: E402
from kiln.search.storage import open_storage  # noqa: E402
from kiln.search.workers import launch, wait  # noqa: E402


def config(trials: int, steps: int, workers: int):
    return parse_search_config({
        "study": "workers", "objectives": ["accuracy"], "sampler": "random", "trials": trials, "seed": 0,
        "workers": workers, "space": {"kind": "train-hparams", "steps": steps, "eval_every": 10_000, "samples": 500},
    })


def one_case(workers: int, trials: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-workers-") as tmp:
        out = Path(tmp)
        cfg = config(trials, steps, workers)
        url = f"journal:{out / 'study.journal'}"
        (out / "config.toml").write_text(to_toml(cfg))
        space, _ = make_space(cfg)
        study = open_study(cfg, open_storage(url), space)      # created before the workers start
        t0 = time.perf_counter()
        wait(launch(out / "config.toml", url, workers, out), lambda: 0, lambda n: None, out)
        wall = time.perf_counter() - t0
        stored = study.get_trials(deepcopy=False)
        trials_ = [t for t in stored if not t.user_attrs.get(SURPLUS)]   # surplus: taken past the budget, never run
        numbers = sorted(t.number for t in trials_)
        params = [tuple(sorted(t.params.items())) for t in trials_]
        return {"workers": workers, "wall_s": wall, "trials": len(trials_), "surplus": len(stored) - len(trials_),
                "numbers_are_0_to_n": numbers == list(range(trials)),
                "states": sorted({t.state.name for t in trials_}),
                "distinct_params": len(set(params)),
                "trial_seconds_median": statistics.median(t.duration.total_seconds() for t in trials_ if t.duration)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/search_workers.json")
    args = parser.parse_args()
    runs = {1: [], 2: []}
    for r in range(args.repeats):
        for workers in (1, 2):          # interleaved, so drift in machine load hits both alike
            case = one_case(workers, args.trials, args.steps)
            runs[workers].append(case)
            print(f"repeat {r}: {workers} worker(s): {case['wall_s']:.1f} s, {case['trials']} trials, "
                  f"distinct params {case['distinct_params']}, numbers 0..n {case['numbers_are_0_to_n']}, "
                  f"states {case['states']}, median trial {case['trial_seconds_median']:.2f} s", flush=True)
    one = statistics.median(c["wall_s"] for c in runs[1])
    two = statistics.median(c["wall_s"] for c in runs[2])
    # each repeat runs the two cases back to back: the median of the paired ratios is the figure
    # (a burst of load from outside the lock then spoils one repeat, not the result)
    paired = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[1], runs[2])]
    ok = all(c["trials"] == args.trials and c["numbers_are_0_to_n"] and c["distinct_params"] == args.trials
             and c["states"] == ["COMPLETE"] for cs in runs.values() for c in cs)
    entry = {"speedup_2_workers": statistics.median(paired), "paired_speedups": paired,
             "speedup_of_medians": one / two, "wall_s_1_worker_median": one, "wall_s_2_workers_median": two,
             "no_trial_twice": ok, "trials": args.trials, "steps": args.steps, "repeats": args.repeats,
             "threads_per_worker": 1, "storage": "journal file", "sampler": "random", "runs": runs,
             "date": date.today().isoformat(), "cpus": os.cpu_count()}
    print(f"\n{'workers':>8}{'wall s (median)':>18}\n{1:>8}{one:>18.1f}\n{2:>8}{two:>18.1f}")
    print(f"speed-up of 2 workers: median of paired repeats {statistics.median(paired):.2f}x {[round(r, 2) for r in paired]}, "
          f"of median times {one / two:.2f}x; every study exactly {args.trials} distinct trials: {ok}")
    merge_result(args.json, "workers_2_vs_1", entry)


if __name__ == "__main__":
    main()
