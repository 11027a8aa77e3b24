"""The study loop: Optuna's ask/tell around a search space, with kiln's rules on top.

- A trial whose objective raises is told FAIL with the reason in its user attribute
  `fail_reason`; the study goes on.
- Single-objective trials that report intermediate scores are pruned by Optuna's pruner.
  Multi-objective trials, which Optuna's pruners do not handle, are stopped as hopeless when
  their partial scores at a step are dominated by the partial scores at that step of
  `early_stop_dominators` completed trials (after `early_stop_warmup` completed trials).
- The budget is the study's trial count, whatever ran them: a resumed study, or several worker
  processes sharing one storage, stop together at `trials`.
- A trial stopped by Ctrl-C, SIGTERM or a kill is interrupted, not failed: it does not count,
  and its point runs again (kiln.search.resume).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

from kiln.errors import KilnError, first_line
from kiln.search.config import SearchConfig
from kiln.search.objectives import Objective, pick, resolve
from kiln.search.pareto import dominates
from kiln.search.resume import Stops, is_interrupted, recover, retry, shield
from kiln.search.samplers import grid_size, make_pruner, make_sampler
from kiln.search.spaces import Context, Space, build_space

OPTUNA_DIRECTION = {"max": "maximize", "min": "minimize"}
# the keys that define a study: resuming one with other values would mix two searches
DEFINING = ("space", "objectives", "study")


@dataclass
class Setup:
    cfg: SearchConfig
    space: Space
    objectives: list[Objective]
    study: object          # optuna.Study


def make_space(cfg: SearchConfig) -> tuple[Space, list[Objective]]:
    objectives = resolve(cfg.objectives)
    ctx = Context(wanted=frozenset(cfg.objectives), seed=cfg.seed, hardware=cfg.hardware)
    return build_space(cfg.space, ctx), objectives


def open_study(cfg: SearchConfig, storage, space: Space):
    """Create the study, or load it to resume; a study made by a different config is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)    # kiln logs failed trials itself, in one line
    directions = [OPTUNA_DIRECTION[o.direction] for o in resolve(cfg.objectives)]
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study, directions=directions,
                                    sampler=make_sampler(cfg, space), pruner=make_pruner(cfg),
                                    load_if_exists=True)
    except ValueError as exc:   # the stored study has other directions
        raise KilnError(f"study {cfg.study!r} exists with another definition: {first_line(exc)}") from None
    defining = json.dumps({k: getattr(cfg, k) for k in DEFINING}, sort_keys=True, default=list)
    stored = study.user_attrs.get("kiln_definition")
    if stored is None:                     # a new study: the space's starting points go first
        points = space.initial_points()    # (may take minutes: an interruption leaves no half-made study)
        study.set_user_attr("kiln_definition", defining)
        for params in points:
            study.enqueue_trial(params)
    elif stored != defining:
        raise KilnError(f"study {cfg.study!r} in this storage was made by a different search config "
                        "(space or objectives differ): use another --out, --storage or study name")
    return study


def _reporter(trial, study, cfg: SearchConfig, objectives: list[Objective]) -> Callable:
    import optuna

    directions = [o.direction for o in objectives]

    def report(step: int, partial: dict) -> None:
        values = [partial.get(o.name) for o in objectives]
        if any(v is None for v in values):
            return
        if not cfg.multi:
            trial.report(float(values[0]), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")
            return
        trial.set_user_attr(f"partial_{step}", [float(v) for v in values])
        if cfg.early_stop and hopeless(study, step, values, directions, cfg):
            trial.set_user_attr("stopped", f"hopeless at step {step}")
            raise optuna.TrialPruned(f"hopeless at step {step}")

    return report


def hopeless(study, step: int, values: list[float], directions: list[str], cfg: SearchConfig) -> bool:
    """Partial scores dominated, at the same step, by `early_stop_dominators` completed trials."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < cfg.early_stop_warmup:
        return False
    key = f"partial_{step}"
    beaten = sum(1 for t in done if key in t.user_attrs and dominates(t.user_attrs[key], values, directions))
    return beaten >= cfg.early_stop_dominators


SURPLUS = "kiln_surplus"     # user attribute; kiln_ so a python-space objective cannot collide


def join_generation(study, trial) -> None:
    """Put a trial in its genetic sampler's current generation. Optuna's NSGA-II and NSGA-III
    do it when they sample a trial's first parameter; a trial whose parameters were all
    enqueued (a space's starting points) is never sampled, so it would belong to no generation
    and never be a parent: its point would be run and then ignored by the evolution."""
    from optuna.samplers import BaseGASampler

    sampler = study.sampler.inner
    if isinstance(sampler, BaseGASampler):
        sampler.get_trial_generation(study, study._storage.get_trial(trial._trial_id))


def run_trial(setup: Setup, log: Callable[[str], None], stops: Stops | None = None) -> str:
    """Run one trial through Optuna's own loop (samplers such as the grid's stop the study from
    inside it); returns the trial's state name. An exception fails the trial, with its reason."""
    import optuna

    study, cfg = setup.study, setup.cfg
    stops = stops or Stops()
    ran = []

    total = budget(cfg, setup.space)

    def objective(trial):
        ran.append(trial.number)
        try:
            with stops.live():
                return run_objective(trial)
        except KeyboardInterrupt:       # Ctrl-C or SIGTERM: this point runs again when the search resumes
            if not trial.user_attrs.get(SURPLUS):
                trial.set_user_attr("fail_reason", "interrupted: the search was stopped")
                retry(study, study._storage.get_trial(trial._trial_id))
            raise

    def run_objective(trial):
        if claimed_before(study, trial.number) >= total:
            # another worker took the last slot between our budget check and this trial's creation:
            # the storage numbered the trials, so the lower number wins and this one never runs
            trial.set_user_attr(SURPLUS, True)
            trial.set_user_attr("fail_reason", "surplus: the budget was already taken by other workers")
            # samplers that hand out fixed points (grid, QMC) mark the point as this trial's
            # before the objective runs, and count a finished trial's point as visited: an empty
            # search space tells them this trial visited nothing, so a resumed study still runs it
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", {})
            fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
            if fixed:        # an enqueued point this trial took off the queue goes back on it
                study.enqueue_trial(fixed)
            raise KilnError("surplus: the budget was already taken by other workers")
        try:
            join_generation(study, trial)
            candidate = setup.space.suggest(trial)
            earlier = _same_params(study, trial) if setup.space.deterministic else None
            if earlier is not None:      # samplers re-propose points of a finite space: don't pay twice
                trial.set_user_attr("duplicate_of", earlier.number)
                return earlier.values if cfg.multi else earlier.values[0]
            scores = setup.space.score(candidate, _reporter(trial, study, cfg, setup.objectives))
            values = pick(scores, setup.objectives, setup.space.kind)
            bad = [(o.name, v) for o, v in zip(setup.objectives, values) if not math.isfinite(v)]
            if bad:
                raise KilnError(f"objective {bad[0][0]} is {bad[0][1]}")
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned", str(exc))
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", first_line(exc))
            log(f"trial {trial.number} failed: {first_line(exc)}")
            raise
        for name, value in scores.items():
            trial.set_user_attr(name, value)
        return values if cfg.multi else values[0]

    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
    return study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, ran[0])).state.name if ran else "NONE"


def _same_params(study, trial):
    """A completed trial with exactly this trial's parameters, if any."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params:
            return t
    return None


def counted(study) -> list:
    """Trials that count against the budget: all but enqueued ones still WAITING to run,
    surplus ones a racing worker created past the budget, and interrupted ones (their retries
    count instead)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.FAIL, TrialState.RUNNING))
            if not t.user_attrs.get(SURPLUS) and not is_interrupted(t)]


def started(study) -> int:
    return len(counted(study))


def claimed_before(study, number: int) -> int:
    """Counted trials numbered below `number`."""
    return sum(t.number < number for t in counted(study))


def budget(cfg: SearchConfig, space: Space) -> int:
    size = grid_size(space) if cfg.sampler == "grid" else None
    return min(cfg.trials, size) if size else cfg.trials


def optimize(setup: Setup, log: Callable[[str], None] = lambda s: None,
             on_trial: Callable[[str], None] = lambda s: None) -> None:
    """Run trials until the study holds `trials` of them (or timeout_s passes)."""
    cfg = setup.cfg
    setup.space.ensure_setup()
    total = budget(cfg, setup.space)
    t0 = time.monotonic()
    with Stops() as stops:
        shield(setup.study._storage, stops)
        while started(setup.study) < total and not stops.pending:
            if cfg.timeout_s and time.monotonic() - t0 > cfg.timeout_s:
                log(f"timeout_s {cfg.timeout_s:g} reached")
                break
            n = recover(setup.study)         # a worker on this host killed since: its trial runs again
            if n:
                log(f"{n} trial(s) of a killed worker interrupted; they run again")
            on_trial(run_trial(setup, log, stops))
