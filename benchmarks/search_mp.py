"""Mixed-precision search on MiniLM fine-tuned on Rotten Tomatoes: NSGA-II against random.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/search_mp.py [--trials 80] [--seeds 3]
        [--samples 300] [--json benchmarks/results/search_mp.json]

The space (defaults): every one of MiniLM's 38 Linears (36 encoder, pooler, classifier) picks
its weight width among int3, int4, int5, int6 and int8, one scale per weight tensor (the
course lab's per-tensor fixed point: the setting where low widths cost accuracy and layers
differ in what they tolerate); every Linear input at int8 per tensor (min-max, calibrated on 2
training batches of 32 per trial); fake quantization (kiln.quant). A trial is scored on the
first `samples` reviews of the validation split (max_length 64): accuracy (max) and average
weight bits over the Linears (min). Both samplers start from the same 13 points, counted in
the budget: the 5 uniform ones (`seed_uniform`: every Linear at one width) and 8 points of the
sensitivity path (`seed_sensitivity`, kiln.search.spaces.quant: each Linear's output KL
divergence at each narrower width, measured once on the calibration batches; then greedy
lowering by least distortion per bit saved, 8 points evenly spaced in average bits). Then they
sample: NSGA-II with a population of 10 and a uniform crossover that takes each parameter from
the other parent with probability 0.1 (`swapping_prob`; optuna's 0.5 mixes two parents evenly,
so children land between the corners and never near them), random uniformly. Hypervolume
reference point: (accuracy 0.5, 32 bits); same trial budget, 3 seeds each. Then: do the fronts
dominate the uniform int8/int6/int4 points (any front point, and any sampled one, the seeded
points aside); the chosen best front point (the fewest bits within one point of uniform int8's
validation accuracy) and each uniform point's most accurate NSGA-II dominator, measured on the
whole test split beside the uniform point.

Every trial's point and parameters go to runs/benchmarks/search_mp_trials.json (out of git;
--summarise-only and --dominators-on-test read them); --json keeps fronts and summaries.

Earlier spaces and variants, kept in the JSON (each command also needs `--seed-sensitivity 0
--swapping-prob 0.5`, the defaults they ran with):
- minilm_mixed_precision_v1 (session 3: `--granularity channel --formats '' --include
  '.*encoder.*' --bits 4,6,8 --population 10 --trials 40 --no-seed-uniform`; pooler and
  classifier fixed at int8, so uniform int4 was the fewest-bits corner, which no point can
  dominate);
- minilm_mixed_precision_v2 (session 4 pilot, nsga2-0 and random-0 only: `--granularity
  channel --formats int2,int3,int4,fp4_e2m1,int6,int8 --population 12 --trials 60
  --no-seed-uniform`);
- minilm_mixed_precision_v3 (session 4: `--granularity channel --formats int2,int3,int4,int6,int8`):
  per channel, uniform int4 is within the subset's noise of int8, so no mix can beat it;
- minilm_mixed_precision_v4 (session 4's figure: this space, uniform seeds only, even crossover)
  and _mut0.1 (the same with `--mutation-prob 0.1`, NSGA-II only);
- _sens8pilot (session 5: `--seed-sensitivity 8 --swapping-prob 0.5 --only nsga2-0,random-0`)
  and _pilot_sens8_swap01 (`--only nsga2-0`, this figure's settings), both, and _unjoined (this
  figure's settings), run before the seeded points joined NSGA-II's generations;
- _t120 (`--trials 120`) and _t120p20 (`--only nsga2-0,nsga2-1,nsga2-2 --trials 120 --population
  20`; its random studies are _t120's, as the random sampler does not read the population), the
  setting whose fronts dominate int8, int6 and int4 in every seed; `--dominators-on-test` with
  the same flags measures each seed's dominators on the test split.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.search.config import parse_search_config  # noqa: E402
from kiln.search.engine import Setup, make_space, open_study, optimize  # noqa: E402
from kiln.search.pareto import dominates, front, hypervolume  # noqa: E402

RUN = Path("runs/figures/minilm-v3")
# every study's trial points and parameters: regenerable, megabytes, so kept out of git; the
# --json file keeps each study's front and figures
TRIALS = Path("runs/benchmarks/search_mp_trials.json")
REFERENCE = (0.5, 32.0)
# per block and sublayer: attention (q, k, v, output), intermediate, output: 18 choices, not 36
GROUPS = {"block-sublayer": r".*layer\.(\d+\.(?:attention|intermediate|output))\..*"}
DIRECTIONS = ("max", "min")


def source() -> Path:
    if (RUN / "model.safetensors").is_file():
        return RUN
    from train_figures import run

    print(f"{RUN} missing: training the minilm recipe (benchmarks/train_figures.py minilm)", flush=True)
    run("minilm", Path("runs/figures"))
    return Path("runs/figures/minilm")


def config(sampler: str, seed: int, args, src: Path, group: str = ""):
    choices = {"formats": args.formats.split(",")} if args.formats else {"bits": [int(b) for b in args.bits.split(",")]}
    return parse_search_config({
        "study": f"mp-{sampler}-{seed}", "objectives": ["accuracy", "avg_bits"], "sampler": sampler,
        "trials": args.trials, "seed": seed, "population": args.population, "reference": list(REFERENCE),
        "mutation_prob": args.mutation_prob, "swapping_prob": args.swapping_prob,
        "space": {"kind": "mixed-precision", "source": str(src), "include": args.include, **choices,
                  "samples": args.samples, "act_bits": 8, "fixed_bits": 8, "calib_batches": 2, "batch_size": 32,
                  "group": group, "seed_uniform": args.seed_uniform, "granularity": args.granularity,
                  "seed_sensitivity": args.seed_sensitivity},
    }, "search_mp")


def run_study(space, objectives, cfg) -> tuple[list[tuple[float, float]], list[dict]]:
    study = open_study(cfg, None, space)          # in memory: the figure keeps the points it needs
    optimize(Setup(cfg, space, objectives, study))
    done = [t for t in study.trials if t.values is not None]
    return [tuple(t.values) for t in done], [t.params for t in done]


def hv_optuna(points, reference) -> float:
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    losses = np.array([[-a, b] for a, b in points])
    inside = losses[(losses < np.array([-reference[0], reference[1]])).all(axis=1)]
    return float(compute_hypervolume(inside, np.array([-reference[0], reference[1]]))) if len(inside) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--mutation-prob", type=float, default=0.0, help="NSGA-II (0: optuna's 1/parameters)")
    parser.add_argument("--swapping-prob", type=float, default=0.1,
                        help="NSGA-II uniform crossover: chance a parameter comes from the other parent")
    parser.add_argument("--name", default="", help="JSON key suffix, so a variant does not replace the figure")
    parser.add_argument("--include", default=r".*", help="regex over Linear FQNs searched; the rest at int8")
    parser.add_argument("--bits", default="3,4,5,6,8", help="int bit widths per layer")
    parser.add_argument("--no-seed-uniform", dest="seed_uniform", action="store_false",
                        help="start from sampled points only, not the uniform ones")
    parser.add_argument("--seed-sensitivity", type=int, default=8,
                        help="also start from N points of the sensitivity path (both samplers)")
    parser.add_argument("--granularity", default="tensor", choices=("tensor", "channel"), help="weight scales")
    parser.add_argument("--formats", default="", help="format presets per layer instead of --bits, e.g. int3,int4,fp4_e2m1")
    parser.add_argument("--only", default="", help="run only these studies, e.g. nsga2-0,random-0 (a pilot)")
    parser.add_argument("--json", default="benchmarks/results/search_mp.json")
    parser.add_argument("--group", default="", help="share one choice among the Linears whose FQNs this "
                        "regex's group captures alike (e.g. per block and sublayer: --group block-sublayer)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="recompute the summary from the studies stored in --json (no trials run)")
    parser.add_argument("--dominators-on-test", action="store_true",
                        help="for the studies stored under this --name: each NSGA-II seed's most accurate sampled "
                        "dominator of uniform int8 and int4, on the whole test split beside the uniform point")
    args = parser.parse_args()
    if args.summarise_only:
        return resummarise(args)
    if args.dominators_on_test:
        return dominators_per_seed(args)
    torch.set_num_threads(args.threads)
    src = source()
    t0 = time.perf_counter()
    group = GROUPS.get(args.group, args.group)
    space, objectives = make_space(config("nsga2", 0, args, src, group))
    space.ensure_setup()                          # one subset and one set of calibration batches for all
    uniform = {f"int{b}": tuple(space.score(space.uniform(f"int{b}" if args.formats else b), None)[k]
                                for k in ("accuracy", "avg_bits")) for b in (8, 6, 4)}
    print("uniform (val subset):", uniform, flush=True)
    t = time.perf_counter()
    seeds = space.initial_points()                # the sensitivity path is measured once, for every study
    sensitivity_s = time.perf_counter() - t
    if args.seed_sensitivity:
        print(f"{len(seeds)} starting points, the sensitivity path measured in {sensitivity_s:.0f} s", flush=True)
    studies = {}
    for sampler in ("nsga2", "random"):
        for seed in range(args.seeds):
            if args.only and f"{sampler}-{seed}" not in args.only.split(","):
                continue
            t = time.perf_counter()
            points, params = run_study(space, objectives, config(sampler, seed, args, src, group))
            studies[f"{sampler}-{seed}"] = {"points": points, "params": params, "front": front(points, DIRECTIONS),
                                            "hypervolume": hypervolume(points, DIRECTIONS, REFERENCE),
                                            "hypervolume_optuna": hv_optuna(points, REFERENCE),
                                            "wall_s": time.perf_counter() - t}
            s = studies[f"{sampler}-{seed}"]
            print(f"{sampler} seed {seed}: hypervolume {s['hypervolume']:.5f} (optuna {s['hypervolume_optuna']:.5f}), "
                  f"front {len(s['front'])} points, {s['wall_s']:.0f} s", flush=True)
    if args.only:                                 # some studies only: their fronts, no summary
        for k, st in studies.items():
            print(k, "front:", sorted((round(a, 4), round(b, 3)) for a, b in st["front"]))
        save(args, {"only": args.only, "studies": studies, "uniform": uniform,
                                             "mutation_prob": args.mutation_prob, "trials": args.trials,
                                             "seed_sensitivity": args.seed_sensitivity, "sensitivity_s": sensitivity_s,
                                             "swapping_prob": args.swapping_prob,
                                             "date": date.today().isoformat(), "wall_s": time.perf_counter() - t0})
        return
    entry = summarise(studies, uniform, args, len(seeds))
    entry |= best_on_test(space, studies, uniform, "int8" if args.formats else 8, len(seeds))
    entry |= {"wall_s": time.perf_counter() - t0, "date": date.today().isoformat(), "threads": args.threads,
              "source": str(src), "trials": args.trials, "seeds": args.seeds, "samples": args.samples,
              "space": f"{len(space.groups)} layers ({args.include}) x {space.config.choices} weights per {args.granularity}; "
                       + ("" if len(space.groups) == len(space.layers) else "other layers int8; ")
                       + "inputs int8 per tensor", "population": args.population,
              "granularity": args.granularity,
              "reference": list(REFERENCE), "studies": studies, "uniform": uniform}
    entry["group"] = group
    entry["seed_uniform"] = args.seed_uniform
    entry["mutation_prob"] = args.mutation_prob
    entry["seed_sensitivity"] = args.seed_sensitivity
    entry["swapping_prob"] = args.swapping_prob
    entry["sensitivity_s"] = sensitivity_s
    print_table(entry)
    save(args, entry)


def save(args, entry: dict) -> None:
    """The entry to --json without the studies' trial points and parameters, those to TRIALS."""
    TRIALS.parent.mkdir(parents=True, exist_ok=True)
    studies = entry["studies"]
    merge_result(str(TRIALS), name(args), {k: {"points": s["points"], "params": s["params"]} for k, s in studies.items()})
    merge_result(args.json, name(args), dict(entry, studies={
        k: {key: v for key, v in s.items() if key not in ("points", "params")} for k, s in studies.items()}))


def load(args) -> dict:
    """An entry of --json with its studies' trial points and parameters from TRIALS."""
    import json

    entry = json.loads(Path(args.json).read_text())[name(args)]
    trials = json.loads(TRIALS.read_text()).get(name(args)) if TRIALS.is_file() else None
    if trials is None:
        print(f"error: {TRIALS} has no trials of {name(args)}: run that study first (they are not kept in git)",
              file=sys.stderr)
        sys.exit(2)
    for k, s in entry["studies"].items():
        s |= trials[k]
    return entry


def name(args) -> str:
    return "minilm_mixed_precision" + (f"_{args.group}" if args.group else "") + (f"_{args.name}" if args.name else "")


def resummarise(args) -> None:
    entry = load(args)
    studies = {k: dict(v, points=[tuple(p) for p in v["points"]], front=[tuple(p) for p in v["front"]])
               for k, v in entry["studies"].items()}
    args.seeds = entry["seeds"]
    # entries from before seeded_trials was kept: the uniform points only (pass the run's --bits/--formats)
    choices = len((args.formats or args.bits).split(","))
    seeded = entry.get("seeded_trials", choices if entry.get("seed_uniform") else 0)
    entry |= summarise(studies, {k: tuple(v) for k, v in entry["uniform"].items()}, args, seeded)
    print_table(entry)
    save(args, entry)


def summarise(studies: dict, uniform: dict, args, seeded: int) -> dict:
    """Hypervolumes and domination; `seeded`: how many of each study's first trials were its
    starting points (the rest were sampled)."""
    out = {"seeded_trials": seeded}
    for sampler in ("nsga2", "random"):
        hvs = [studies[f"{sampler}-{s}"]["hypervolume"] for s in range(args.seeds)]
        out[f"{sampler}_hypervolume_mean"] = statistics.mean(hvs)
        out[f"{sampler}_hypervolumes"] = hvs
    # a uniform point counts as beaten when some point of the front dominates it; uniform int4 is
    # the space's fewest-bits corner, so at best a front point ties it (weakly dominates it)
    for sampler in ("nsga2", "random"):
        fronts = [studies[f"{sampler}-{s}"]["front"] for s in range(args.seeds)]
        out[f"{sampler}_front_dominates_uniform"] = {
            name: [any(dominates(p, u, DIRECTIONS) for p in f) for f in fronts] for name, u in uniform.items()}
        out[f"{sampler}_front_weakly_dominates_uniform"] = {
            name: [any(p[0] >= u[0] and p[1] <= u[1] + 1e-9 for p in f) for f in fronts] for name, u in uniform.items()}
        sampled = [sampled_points(studies[f"{sampler}-{s}"], seeded) for s in range(args.seeds)]
        out[f"{sampler}_sampled_dominate_uniform"] = {
            name: [any(dominates(p, u, DIRECTIONS) for p in ps) for ps in sampled] for name, u in uniform.items()}
    return out


def sampled_points(study: dict, seeded: int) -> list[tuple]:
    """A study's points after its `seeded` starting points, less those whose parameters repeat a
    starting point (a child identical to a seeded parent is answered with the parent's values)."""
    seeds = study["params"][:seeded]
    return [tuple(p) for p, params in zip(study["points"][seeded:], study["params"][seeded:]) if params not in seeds]


def test_scorer(space):
    """Accuracy of a choice on the whole test split."""
    from kiln.data import load_dataset

    splits = load_dataset(space.source.dataset, seed=space.ctx.seed)
    return lambda choice: space.measure(space.model, space.quant_table(space.bits_of(choice)), splits, "test")["accuracy"]


def most_accurate_dominator(points: list, uniform_point) -> tuple | None:
    """The most accurate of `points` (fewest bits among equals) dominating `uniform_point`."""
    beating = [p for p in points if dominates(p, uniform_point, DIRECTIONS)]
    return max(beating, key=lambda p: (p[0], -p[1])) if beating else None


def best_on_test(space, studies: dict, uniform: dict, int8, seeded: int) -> dict:
    """On the whole test split: the fewest-bits NSGA-II front point within one point of uniform
    int8 (validation subset) beside uniform int8; and, for each uniform point some NSGA-II front
    dominates on the subset, the most accurate such point (fewest bits among equals) beside it,
    taken among the sampled points where one dominates (`seeded` says which point it was)."""
    test_accuracy = test_scorer(space)
    nsga = [p for k, s in studies.items() if k.startswith("nsga2") for p in s["front"]]

    def params_of(point):
        return next(s["params"][s["points"].index(point)] for s in studies.values() if point in s["points"])

    out: dict = {"chosen": None}
    candidates = [p for p in nsga if p[0] >= uniform["int8"][0] - 0.01]
    if candidates:
        chosen = min(candidates, key=lambda p: (p[1], -p[0]))
        out = {"chosen_val": chosen, "chosen_params": params_of(chosen), "chosen_test_accuracy": test_accuracy(params_of(chosen)),
               "uniform_int8_test_accuracy": test_accuracy(space.uniform(int8))}
    out["dominators_test"] = {}
    sampled = [p for k, st in studies.items() if k.startswith("nsga2") for p in sampled_points(st, seeded)]
    for name, u in uniform.items():
        best = most_accurate_dominator(sampled, u) or most_accurate_dominator(nsga, u)
        if best is None:
            continue
        width = int8 if name == "int8" else (name if isinstance(int8, str) else int(name[3:]))
        uni_test = out["uniform_int8_test_accuracy"] if name == "int8" and "uniform_int8_test_accuracy" in out \
            else test_accuracy(space.uniform(width))
        out["dominators_test"][name] = {"val": best, "seeded": best not in sampled,
                                        "test_accuracy": test_accuracy(params_of(best)),
                                        "uniform_test_accuracy": uni_test}
    return out


def dominators_per_seed(args) -> None:
    """Per NSGA-II study of a stored entry (an --only run included): its most accurate sampled
    point (seeds and copies of them aside) dominating uniform int8 / int4 on the validation
    subset, measured on the whole test split; stored in the entry as dominators_test_per_seed."""
    torch.set_num_threads(args.threads)
    entry = load(args)
    seeded = entry.get("seeded_trials", 13)
    space, _ = make_space(config("nsga2", 0, args, source(), GROUPS.get(args.group, args.group)))
    space.ensure_setup()
    test_accuracy = test_scorer(space)

    out = {"uniform_test": {f"int{b}": test_accuracy(space.uniform(b)) for b in (8, 4)}, "seeded_trials": seeded}
    for key, st in sorted(entry["studies"].items()):
        if not key.startswith("nsga2"):
            continue
        sampled = sampled_points(st, seeded)
        for uni in ("int8", "int4"):
            point = most_accurate_dominator(sampled, tuple(entry["uniform"][uni]))
            if point is not None:
                params = st["params"][seeded:][[tuple(p) for p in st["points"][seeded:]].index(point)]
                out[f"{key}_{uni}"] = {"val": point, "test_accuracy": test_accuracy(params)}
                print(f"{key}: uniform {uni}'s most accurate sampled dominator {point}: test "
                      f"{out[f'{key}_{uni}']['test_accuracy']:.4f} vs {out['uniform_test'][uni]:.4f}", flush=True)
    save(args, dict(entry, dominators_test_per_seed=out))


def print_table(entry: dict) -> None:
    print(f"\n{'':16}{'hypervolume (mean of seeds)':>30}")
    for sampler in ("nsga2", "random"):
        print(f"{sampler:16}{entry[f'{sampler}_hypervolume_mean']:>30.5f}   {entry[f'{sampler}_hypervolumes']}")
    for name, u in entry["uniform"].items():
        print(f"uniform {name}: val acc {u[0]:.4f}, {u[1]:.2f} bits; dominated by the NSGA-II front "
              f"(per seed): {entry['nsga2_front_dominates_uniform'][name]}, weakly: "
              f"{entry['nsga2_front_weakly_dominates_uniform'][name]}; by random's: "
              f"{entry['random_front_dominates_uniform'][name]}; by a sampled (not seeded) NSGA-II point: "
              f"{entry['nsga2_sampled_dominate_uniform'][name]}, random: {entry['random_sampled_dominate_uniform'][name]}")
    for name, d in entry.get("dominators_test", {}).items():
        print(f"uniform {name}'s most accurate NSGA-II dominator: val {d['val']}; test {d['test_accuracy']:.4f} "
              f"vs uniform {name} {d['uniform_test_accuracy']:.4f}")
    if entry.get("chosen_val"):
        print(f"chosen front point: val {entry['chosen_val']}; test accuracy {entry['chosen_test_accuracy']:.4f} "
              f"vs uniform int8 {entry['uniform_int8_test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
