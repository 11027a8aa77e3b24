"""The run directory of `kiln optimize` and the whole command.

    runs/NAME/optimize.json    the options (what a resume must share) and each ended phase's record
              study.db         the search (Optuna, SQLite): --resume continues it
              steps/           the chosen point's configs, and the intermediate artifacts
              model/           the deployable artifact (kiln eval, compile, bench read it)
              compiled/        `kiln compile --backend auto` of it: the backend file, report.json
              report.html, report.md, report.json, figures/

--budget covers phases 1 to 3 (the search gets what the baseline and the sensitivities left);
the result (rebuild, confirm, compile, LoadGen) runs after it. A phase's record is written
when it ends, so Ctrl-C keeps every ended phase and the search's finished trials, and
`--resume` goes on from there. Nothing is written before the baseline is measured: a source,
dataset, metric or budget that cannot work leaves no directory behind.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from kiln.errors import Interrupted, KilnError
from kiln.io import atomic_write_json, check_new_dir
from kiln.optimize import phases
from kiln.optimize.config import FP32_BACKENDS, INT8_BACKENDS, Constraint, OptimizeConfig
from kiln.optimize.report import write_report
from kiln.optimize.space import OptimizeSpace, OptimizeSpaceConfig
from kiln.runs.artifact import load_source
from kiln.search.config import SearchConfig
from kiln.search.engine import Setup, open_study, optimize, started
from kiln.search.objectives import resolve
from kiln.search.resume import recover
from kiln.search.spaces import Context
from kiln.search.storage import default_url, open_storage
from kiln.train.evaluation import source_splits

STATE = "optimize.json"
STUDY = "kiln-optimize"
MAX_TRIALS = 100_000       # the budget is time, not a count


class ConstraintNotMet(Exception):
    """No trial met the drop: the CLI prints the message and exits 1 (the report is kept)."""


@dataclasses.dataclass
class Hooks:
    """How a run reports: `phase(name)` when a phase starts, `log(line)` within it, and the
    final compile's backend list (`auto`, or fewer in tests)."""
    log: Callable[[str], None] = lambda s: None
    phase: Callable[[str], None] = lambda s: None
    final_backend: str = "auto"


def _read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        raise KilnError(f"{out} holds no kiln optimize run to resume ({STATE} missing or corrupt)") from None


def _start(cfg: OptimizeConfig, out: Path, resume: bool) -> dict:
    if not resume:
        check_new_dir(out)
        return {}
    state = _read_state(out)
    if state.get("config") != cfg.defining():
        changed = sorted(k for k, v in cfg.defining().items() if state.get("config", {}).get(k) != v)
        raise KilnError(f"{out} was started with other options ({', '.join(changed)} differ): resume with the same "
                        f"ones, or use another --out")
    return state


def _save(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE, state)


def make_space(cfg: OptimizeConfig, source, base: dict, seeds: list[dict] | None = None) -> OptimizeSpace:
    objectives = (_metric_objective(base["metric"]), cfg.cost_objective)
    space_cfg = OptimizeSpaceConfig(
        source=cfg.src, dataset=source.dataset, split="val", samples=cfg.val_samples, bits=cfg.bits,
        sparsity=cfg.sparsity, budgets=cfg.budgets, include=".*", fixed_bits=0, act_bits=8, calib_batches=4,
        batch_size=32, eval_batch_size=256, target=cfg.target, batch=cfg.batch, rounds=cfg.rounds,
        fp32_backends=FP32_BACKENDS, int8_backends=INT8_BACKENDS, baseline_backend=base["backend"],
        baseline_ms=base.get("latency_ms") or 0.0)
    ctx = Context(wanted=frozenset(objectives), seed=source.data_seed, hardware=cfg.target)
    return OptimizeSpace(space_cfg, ctx, seeds)


def _metric_objective(metric: str) -> str:
    """The study's objective for the task metric: `accuracy` (maximised) or `loss` (minimised,
    holding perplexity)."""
    return "accuracy" if metric == "accuracy" else "loss"


def search(cfg: OptimizeConfig, out: Path, space: OptimizeSpace, seconds: float, log) -> object:
    """Run (or continue) the study in `out/study.db` for `seconds`."""
    objectives = (_metric_objective(space_metric(space)), cfg.cost_objective)
    scfg = SearchConfig(space={"kind": "optimize", **cfg.defining()}, objectives=objectives, sampler="tpe",
                        trials=MAX_TRIALS, seed=cfg.seed, study=STUDY, timeout_s=max(seconds, 1.0),
                        storage=default_url(out, 1), startup_trials=8)
    study = open_study(scfg, open_storage(scfg.storage), space)
    n = recover(study, ownerless=True)
    if n:
        log(f"{n} trial(s) an interruption left running run again")
    optimize(Setup(scfg, space, resolve(objectives), study), log,
             on_trial=lambda state: log(f"{started(study)} trials, the last {state.lower()}"))
    return study


def space_metric(space: OptimizeSpace) -> str:
    return "accuracy" if "accuracy" in space.ctx.wanted else "perplexity"


def optimize_run(cfg: OptimizeConfig, out: str | Path, profile, resume: bool = False, hooks: Hooks = Hooks()) -> dict:
    """The whole command (see the module docstring); returns the result record. Raises
    ConstraintNotMet, after writing the report, when no trial meets the drop."""
    out = Path(out)
    t0 = time.monotonic()
    state = _start(cfg, out, resume)
    source = load_source(cfg.src)
    splits = source_splits(source)
    phases.check_metric(source, splits, cfg)
    done = []
    try:
        if "baseline" not in state:
            hooks.phase("1/4 analyse and baseline")
            base = phases.baseline(source, splits, cfg, FP32_BACKENDS, hooks.log)
            took = time.monotonic() - t0
            if took > 60 * cfg.budget_min:
                raise KilnError(f"--budget {cfg.budget_min:g} min is less than the baseline alone took ({took:.0f} s): "
                                f"give --budget {max(1, round(3 * took / 60))} or more")
            state = {"format": 1, "config": cfg.defining(), "src": cfg.src, "baseline": base}
            _save(out, state)
        base = state["baseline"]
        done.append("baseline")
        constraint = Constraint.of(base["metric"], base["val"], cfg)
        space = make_space(cfg, source, base)
        if "sensitivity" not in state:
            hooks.phase("2/4 per-layer sensitivity")
            state["sensitivity"] = phases.sensitivity(space, hooks.log)
            _save(out, state)
        done.append("sensitivity")
        space.seed_points = phases.seed_points(space, state["sensitivity"], base["backend"])
        hooks.phase("3/4 search")
        left = 60 * cfg.budget_min - (time.monotonic() - t0)
        study = search(cfg, out, space, left, hooks.log)
    except KeyboardInterrupt:
        kept = f"kept {', '.join(done)} and the finished trials in {out}" if done else "nothing was kept"
        raise Interrupted(f"{kept}; continue with `kiln optimize ... --out {out} --resume`") from None
    hooks.phase("4/4 result")
    return finish(cfg, out, state, space, study, constraint, source, splits, profile, hooks)


def finish(cfg, out: Path, state: dict, space: OptimizeSpace, study, constraint: Constraint, source, splits, profile,
           hooks: Hooks) -> dict:
    """Choose, rebuild, confirm, compile, LoadGen, report."""
    metric_obj = _metric_objective(state["baseline"]["metric"])
    rows = phases.trial_rows(study, cfg.cost_objective, metric_obj)
    chosen, closest = phases.choose(rows, constraint)
    for stale in ("steps", "model", "compiled"):    # an earlier, interrupted phase 4's
        shutil.rmtree(out / stale, ignore_errors=True)
    result: dict = {"constraint": constraint.to_dict(), "trials": rows, "met": chosen is not None,
                    "cost_objective": cfg.cost_objective}
    if chosen is None:
        result["closest"] = closest
        state["result"] = result
        _save(out, state)
        write_report(out, cfg, state)
        if closest is None:
            raise ConstraintNotMet(f"no trial finished inside --budget {cfg.budget_min:g} min: give a larger budget "
                                   f"(report: {out / 'report.html'})")
        raise ConstraintNotMet(
            f"no candidate keeps {constraint.metric} within --max-drop {cfg.max_drop:g} ({cfg.drop_type.value}): "
            f"the closest, trial {closest['number']}, scores {closest['metric']:.4f} on validation, "
            f"{constraint.miss(closest['metric']):.4f} short of the limit {constraint.limit:.4f} "
            f"(report: {out / 'report.html'})")
    result["chosen"] = chosen
    hooks.log(f"chosen: trial {chosen['number']} ({cfg.cost_objective} {chosen['cost']:.4g}, "
              f"{constraint.metric} {chosen['metric']:.4f})")
    built = space.build(chosen["params"])
    result["steps"] = phases.rebuild(space, chosen["params"], cfg.src, out, hooks.log)
    result["confirm"] = phases.confirm(out / "model", splits, constraint, state["baseline"])
    result["after"] = phases.after_figures(built, space.loaded, cfg.target) | {
        "flops": chosen["flops"], "model_bytes": chosen["model_bytes"]}
    result["deploy"] = phases.deploy(out / "model", out, cfg, built.table is not None, hooks.final_backend,
                                     state["baseline"], source.model, profile, hooks.log)
    result["decisions"] = decisions(space, chosen["params"])
    state["result"] = result
    _save(out, state)
    write_report(out, cfg, state)
    return result


def decisions(space: OptimizeSpace, params: dict) -> list[dict]:
    """Per searched group: its layers' types and what the chosen point does to it (a group
    kiln.lowrank cannot factorise has budget 1.0, dense)."""
    precision = params["precision"]
    return [{"group": g, "layers": list(names), "types": [type(space.model.get_submodule(n)).__name__ for n in names],
             "precision": precision, "bits": params.get(f"{g}:bits") or 32 if precision == "int8" else 32,
             "sparsity": params[f"{g}:sparsity"], "budget": params.get(f"{g}:budget", 1.0)}
            for g, names in space.groups.items()]
