"""The four phases of `kiln optimize`, each a function of what the phases before it kept.

Every figure a phase returns is JSON-ready: the run directory keeps it (kiln.optimize.run) so
that a resumed run skips the phases that ended, and the report reads only these records.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

from torch import nn

from kiln.bench.loadgen import BenchConfig, Scenario
from kiln.bench.run import bench_run
from kiln.compile.auto import at_batch, call, select
from kiln.compile.backends import Precision, build, parse_backend
from kiln.compile.run import CompileConfig, compile_run
from kiln.errors import KilnError
from kiln.config import to_toml
from kiln.hardware.profiles import load_profile
from kiln.io import atomic_write_json, atomic_write_text
from kiln.lowrank.config import parse_config as parse_lowrank
from kiln.lowrank.run import lowrank_run
from kiln.models.loaded import LoadedModel
from kiln.optimize.config import Constraint, OptimizeConfig
from kiln.optimize.space import FLOAT, FP32, INT8, Built, OptimizeSpace, energy_uj, roofline_as_it_runs, roofline_point
from kiln.prune.config import parse_config as parse_prune
from kiln.prune.run import prune_run
from kiln.quant.apply import calibrate, quantize
from kiln.quant.config import parse_config as parse_quant
from kiln.quant.run import quantize_run
from kiln.runs.artifact import load_artifact, save_source
from kiln.runs.metrics import metric_record
from kiln.search.objectives import count_flops, fp32_bytes
from kiln.search.spaces.quant import frozen_weights
from kiln.timing import TimingConfig, measure
from kiln.train.evaluation import evaluate_model
from kiln.train.tasks import forward, metric_for

Log = Callable[[str], None]


# ---------------------------------------------------------------- phase 1: analyse and baseline

def check_metric(source, splits, cfg: OptimizeConfig) -> str:
    """The task metric the drop is judged on; a task without one is refused before any work."""
    key = metric_for(splits.task, source.model).key
    Constraint.of(key, 0.0, cfg)        # raises for a task scored by its own loss
    return key


def baseline(source, splits, cfg: OptimizeConfig, backends: tuple[str, ...], log: Log) -> dict:
    """The float model: validation and test metric, graph cost and roofline on the target, and
    (target `local`) the fastest of `backends` at the batch, timed by kiln.timing."""
    model = source.model.eval()
    loaded = at_batch(dataclasses.replace(source.loaded, model=model), cfg.batch, cfg.seed)
    log("validation and test metric")
    key, val = evaluate_model(model, splits, "val")
    test = evaluate_model(model, splits, "test")[1]
    log(f"roofline on {cfg.target}")
    roof = roofline_point(loaded, cfg.target)
    profile = load_profile(cfg.target)
    out = {"profile": {"name": profile.name, "peak_flops": dict(profile.peak_flops),
                       "memory_bandwidth": profile.memory_bandwidth},
           "metric": key, "val": val, "test": test, "flops": count_flops(model, tuple(loaded.example_inputs)),
           "model_bytes": fp32_bytes(model), "roofline": roof, "roofline_ms": 1e3 * roof["latency_s"],
           "energy_uj": energy_uj(Built(model, FP32, "eager"), loaded), "batch": cfg.batch,
           "val_size": len(splits.val), "test_size": len(splits.test)}
    if cfg.local:
        log(f"timing fp32 backends: {', '.join(backends)}")
        sel = select(model, loaded, list(backends), Precision.FP32, rounds=max(cfg.rounds, 10))
        best = sel.by_name(sel.chosen)
        out["backends"] = sel.to_dict()
        out["backend"], out["latency_ms"] = sel.chosen, 1e3 * best.latency_s
    else:
        out["backend"], out["latency_ms"] = "eager", None
    return out


# ---------------------------------------------------------------- phase 2: sensitivity

def sensitivity(space: OptimizeSpace, log: Log) -> list[dict]:
    """Each searched group alone at each narrower choice (weight bits, every other layer
    float; sparsity; low-rank budget where kiln.lowrank factorises it), everything else float:
    the scoring metric and its change from the float model's, one row per (group, change)."""
    space.ensure_setup()
    c = space.config
    none = none_choice(space, FP32, c.fp32_backends[0])
    base = space.quality(space.build(none))
    metric = next(k for k in base if k.startswith("metric_"))
    rows = []
    todo = [(g, "bits", b) for g in space.groups for b in space.group_choices[g] if b != FLOAT] + \
        [(g, "sparsity", s) for g in space.groups for s in c.sparsity if s != min(c.sparsity)] + \
        [(g, "budget", b) for g in space.rankable for b in c.budgets if b != max(c.budgets)]
    t0 = time.monotonic()
    for i, (g, kind, value) in enumerate(todo, 1):
        if kind == "bits":
            model = copy.deepcopy(space.model)
            table = space.quant_table({n: value for n in space.groups[g]})
            built = Built(model, INT8, c.int8_backends[0])
            built.model = quantize_table(space, model, table)
            built.table = table
        else:
            built = space.build({**none, f"{g}:{kind}": value})
        score = space.quality(built)[metric]
        rows.append({"group": g, "layers": list(space.groups[g]), "change": kind, "value": value,
                     "metric": score, "delta": score - base[metric]})
        log(f"{i}/{len(todo)} layer choices measured ({time.monotonic() - t0:.0f} s)")
    return rows


def quantize_table(space: OptimizeSpace, model: nn.Module, table: dict) -> nn.Module:
    qmodel = quantize(model, parse_quant(table, "sensitivity"))
    with frozen_weights(qmodel):
        calibrate(qmodel, space.batches, forward)
    return qmodel.eval()


def none_choice(space: OptimizeSpace, precision: str, backend: str) -> dict:
    """Every group left as it is: no sparsity, full rank (and the widest bits for int8)."""
    c = space.config
    out = {"precision": precision, f"backend:{precision}": backend}
    for g in space.groups:
        out[f"{g}:sparsity"] = min(c.sparsity)
        if g in space.rankable:
            out[f"{g}:budget"] = max(c.budgets)
        if precision == INT8:
            out[f"{g}:bits"] = max((b for b in space.group_choices[g] if b != FLOAT), key=c.choice_bits)
    return out


def seed_points(space: OptimizeSpace, rows: list[dict], fp32_backend: str, n: int = 4) -> list[dict]:
    """The points a new study runs first: the float model on the baseline's backend (so a
    feasible point exists), every layer at the widest bits, the Linears alone at the widest
    bits (what kiln's int8 kernels run; where the model has other layers), then `n` points of
    the sensitivity path: the changes applied one by one, the least harmful first, each point
    a prefix of that order at evenly spaced lengths."""
    space.ensure_setup()       # a resumed run reads its sensitivities and has not set the space up yet
    c = space.config
    points = []
    if FP32 in c.precisions:
        points.append(none_choice(space, FP32, fp32_backend if fp32_backend in c.fp32_backends else c.fp32_backends[0]))
    if INT8 not in c.precisions:
        return points
    current = none_choice(space, INT8, c.int8_backends[0])
    points.append(dict(current))
    floated = {f"{g}:bits": FLOAT for g, names in space.groups.items()
               if not all(isinstance(space.model.get_submodule(n), nn.Linear) for n in names)}
    if floated and len(floated) < len(space.groups):
        points.append(current | floated)
    sign = 1.0 if any(k == "accuracy" for k in space.ctx.wanted) else -1.0    # larger delta is better
    ordered = sorted(rows, key=lambda r: -sign * r["delta"])
    path = []
    for r in ordered:
        key = f"{r['group']}:{r['change']}"
        if key in current and r["value"] != current[key] and _narrower(r["change"], r["value"], current[key], c):
            current[key] = r["value"]
            path.append(dict(current))
    for k in range(1, n + 1):
        if path:
            p = path[min(len(path) - 1, round(k * len(path) / n) - 1)]
            if p not in points:
                points.append(p)
    return points


def _narrower(change: str, new, old, c) -> bool:
    if change == "bits":
        return c.choice_bits(new) < c.choice_bits(old)
    return new > old if change == "sparsity" else new < old


# ---------------------------------------------------------------- phase 4: the result

def trial_rows(study, cost: str, metric_obj: str) -> list[dict]:
    """Every completed trial: number, params, the scoring metric and the cost."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if cost not in a or metric_obj not in a:
            continue
        rows.append({"number": t.number, "params": dict(t.params), "metric": a[metric_obj], "cost": a[cost],
                     "flops": a.get("flops"), "model_bytes": a.get("model_bytes"),
                     "latency_ratio": a.get("latency_ratio")})
    return rows


def choose(rows: list[dict], constraint: Constraint) -> tuple[dict | None, dict | None]:
    """(the cheapest trial meeting the constraint, ties to the better metric; or None, and
    then the trial closest to meeting it)."""
    ok = [r for r in rows if constraint.meets(r["metric"])]
    if ok:
        sign = 1 if constraint.higher_is_better else -1
        return min(ok, key=lambda r: (r["cost"], -sign * r["metric"])), None
    if not rows:
        return None, None
    return None, min(rows, key=lambda r: constraint.miss(r["metric"]))


def rebuild(space: OptimizeSpace, params: dict, src: str, out: Path, log: Log) -> list[dict]:
    """The chosen point made by kiln's own commands, in order (prune, lowrank, quantize last),
    each on the one before's output, the last writing `out/model`; returns the steps with their
    command lines (a point that changes nothing is the source saved as an artifact)."""
    c = space.config
    configs = space.configs(params)
    steps_dir = out / "steps"
    commands = space.commands(list(configs)) if configs else []
    names = list(configs)
    prev, steps = src, []
    for i, name in enumerate(names):
        last = i == len(names) - 1
        dest = out / "model" if last else steps_dir / name.removesuffix(".toml")
        atomic_write_text(steps_dir / name, to_toml(configs[name]))
        log(f"{name.removesuffix('.toml')}: {commands[i]}")
        if name == "prune.toml":
            prune_run(prev, parse_prune(configs[name], name), dest, evaluate=False, progress=False)
        elif name == "lowrank.toml":
            lowrank_run(prev, parse_lowrank(configs[name], name), dest, evaluate=False)
        else:
            quantize_run(prev, parse_quant(configs[name], name), dest, calib_batches=c.calib_batches,
                         batch_size=c.batch_size, seed=space.ctx.seed, evaluate=False)
        steps.append({"step": name.removesuffix(".toml"), "config": configs[name], "command": commands[i],
                      "out": str(dest)})
        prev = str(dest)
    if not names:
        save_source(out / "model", space.source, space.model)
        steps.append({"step": "copy", "config": {}, "command": f"(the source {src}, unchanged)", "out": str(out / "model")})
    return steps


def confirm(model_dir: Path, splits, constraint: Constraint, baseline_: dict) -> dict:
    """The deployable reloaded from its directory (as `kiln eval` does), scored on the whole
    validation and test splits; its metrics.json says so."""
    source = load_artifact(model_dir)
    key, val = evaluate_model(source.model, splits, "val")
    test = evaluate_model(source.model, splits, "test")[1]
    metrics = metric_record(key, before=baseline_["test"], after=test, model=source.spec, source=str(model_dir),
                            dataset=source.dataset, val=val, val_before=baseline_["val"],
                            meets_on_val=constraint.meets(val), meets_on_test=constraint.meets(test))
    atomic_write_json(model_dir / "metrics.json", metrics)
    return {"val": val, "test": test, "metric": key, "drop_val": constraint.drop(val),
            "drop_test": constraint.drop(test), "meets_val": constraint.meets(val), "meets_test": constraint.meets(test)}


def deploy(model_dir: Path, out: Path, cfg: OptimizeConfig, quantized: bool, backend: str, baseline_: dict,
           float_model: nn.Module, profile, log: Log) -> dict:
    """`kiln compile --backend auto` of the deployable (out/compiled), then the compiled model
    timed beside the baseline's backend on the float source in the same rounds, then LoadGen."""
    log("compile: every --backend auto candidate")
    config = CompileConfig(backend=backend, batch=cfg.batch, precision=Precision.INT8 if quantized else Precision.FP32,
                           rounds=max(cfg.rounds, 10))
    report, sel = compile_run(str(model_dir), config, out / "compiled", profile, progress=log)
    source = load_artifact(model_dir)
    loaded = at_batch(dataclasses.replace(source.loaded, model=source.model), cfg.batch, cfg.seed)
    result = {"compile": report, "chosen_backend": sel.chosen}
    if cfg.local and baseline_.get("backend"):
        log("timing the result beside the baseline")
        ref = build(parse_backend(baseline_["backend"]), float_model, loaded)
        fn = sel.fns[sel.chosen]
        m = measure({"baseline": lambda: call(ref, loaded), "result": lambda: call(fn, loaded)},
                    TimingConfig(rounds=max(cfg.rounds, 10), warmup=3))
        b, r = m.timings["baseline"], m.timings["result"]
        result["side_by_side"] = {"baseline_ms": 1e3 * b.median, "result_ms": 1e3 * r.median,
                                  "speedup": b.median / r.median, "contended": b.contended or r.contended,
                                  "threads": m.threads, "rounds": m.rounds}
    log("LoadGen")
    scenario = Scenario.SINGLE_STREAM if cfg.batch == 1 else Scenario.OFFLINE
    bench = BenchConfig(scenario, batch=0 if cfg.batch == 1 else cfg.batch, min_duration_s=cfg.loadgen_s,
                        max_samples=256)
    try:
        result["loadgen"] = bench_run(str(out / "compiled"), bench, profile=profile)
    except KilnError as exc:
        result["loadgen"] = {"error": str(exc)}
    return result


def after_figures(built: Built, loaded: LoadedModel, target: str) -> dict:
    """FLOPs, bytes and roofline of the chosen candidate as it runs, and its modelled energy."""
    roof = roofline_as_it_runs(built, loaded, target)
    return {"roofline": roof, "roofline_ms": 1e3 * roof["latency_s"],
            "energy_uj": energy_uj(built, loaded)}
