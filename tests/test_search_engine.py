"""The search engine: failures, pruning, early stopping, grids, samplers, bad input (resume after a
kill: test_search_resume.py)."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from kiln.errors import KilnError
from kiln.config import to_toml
from kiln.search.config import parse_search_config
from kiln.search.engine import SURPLUS, Setup, make_space, open_study, optimize, run_trial, started
from kiln.search.pareto import front, hypervolume
from kiln.search.report import trial_rows
from kiln.search.run import run_search

USER = textwrap.dedent('''
    import time

    def two(trial):
        x = trial.suggest_float("x", -2, 2)
        y = trial.suggest_int("y", 0, 4)
        if y == 3:
            raise ValueError("y=3 is not allowed")
        return {"accuracy": -(x - 1) ** 2 - y, "model_bytes": abs(x) + y}

    def partial(trial, report):
        x = trial.suggest_float("x", 0, 1)
        report(1, {"accuracy": x, "model_bytes": 1.0})
        return {"accuracy": x, "model_bytes": 1.0}

    def single(trial, report):
        x = trial.suggest_float("x", 0, 1)
        report(1, {"accuracy": x})
        return {"accuracy": x}

    def grid(trial):
        return {"accuracy": trial.suggest_categorical("x", [1, 2, 3]) * 10 + trial.suggest_categorical("y", [0, 1])}

    def slow(trial):
        x = trial.suggest_float("x", 0, 1)
        time.sleep(0.4)
        return {"accuracy": x}
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(USER)
    return path


def cfg_for(user_file, fn, **top):
    table = {"study": "t", "objectives": ["accuracy"], "sampler": "random", "trials": 8, **top,
             "space": {"kind": "python", "objective": f"py:{user_file}:{fn}", **top.pop("space", {})}}
    return parse_search_config(table)


def in_memory(cfg, enqueue=()):
    space, objectives = make_space(cfg)
    study = open_study(cfg, None, space)
    for params in enqueue:
        study.enqueue_trial(params)
    optimize(Setup(cfg, space, objectives, study))
    return study


def test_a_trial_created_past_the_budget_by_a_racing_worker_never_runs(user_file):
    # two workers both see 2 of 3 trials and both create one: the lower number takes the last
    # slot, the other is marked surplus without sampling, and neither the budget nor the report
    # counts it
    cfg = cfg_for(user_file, "single", trials=3)
    space, objectives = make_space(cfg)
    space.ensure_setup()
    study = open_study(cfg, None, space)
    setup = Setup(cfg, space, objectives, study)
    assert [run_trial(setup, log=lambda s: None) for _ in range(2)] == ["COMPLETE", "COMPLETE"]
    rival = study.ask()                                   # the other worker's trial, still running
    assert run_trial(setup, log=lambda s: None) == "FAIL"
    surplus = study.trials[-1]
    assert surplus.number == rival.number + 1 and surplus.user_attrs[SURPLUS] and not surplus.params
    assert started(study) == 3
    assert [r["number"] for r in trial_rows(study)] == [0, 1, 2]


def _race(cfg, suggest):
    """A study where a rival worker holds the last slot of the budget (its trial has sampled its
    point with `suggest` and is still running) when this one runs a trial."""
    space, objectives = make_space(cfg)
    space.ensure_setup()
    study = open_study(cfg, None, space)
    setup = Setup(cfg, space, objectives, study)
    for _ in range(cfg.trials - 1):
        run_trial(setup, log=lambda s: None)
    rival = study.ask()
    suggest(rival)
    return setup, rival


def test_a_surplus_trial_leaves_its_grid_point_to_a_resumed_study(user_file):
    cfg = cfg_for(user_file, "grid", sampler="grid", trials=3, space={"grid": {"x": [1, 2, 3], "y": [0, 1]}})
    setup, rival = _race(cfg, lambda t: (t.suggest_categorical("x", [1, 2, 3]), t.suggest_categorical("y", [0, 1])))
    assert run_trial(setup, log=lambda s: None) == "FAIL"          # surplus
    setup.study.tell(rival, 0.0)
    optimize(dataclasses.replace(setup, cfg=dataclasses.replace(cfg, trials=6)))
    done = [t for t in setup.study.trials if not t.user_attrs.get(SURPLUS)]
    assert len(done) == 6 and len({(t.params["x"], t.params["y"]) for t in done}) == 6   # every point once


def test_a_surplus_trial_puts_the_queued_point_it_took_back_on_the_queue(user_file):
    cfg = cfg_for(user_file, "single", trials=2)
    setup, rival = _race(cfg, lambda t: t.suggest_float("x", 0, 1))
    setup.study.enqueue_trial({"x": 0.25})
    assert run_trial(setup, log=lambda s: None) == "FAIL"          # took the queued point, surplus
    setup.study.tell(rival, 0.0)
    optimize(dataclasses.replace(setup, cfg=dataclasses.replace(cfg, trials=3)))
    done = [t for t in setup.study.trials if not t.user_attrs.get(SURPLUS)]
    assert len(done) == 3 and done[-1].params == {"x": 0.25} and done[-1].state.name == "COMPLETE"


def test_failing_objective_is_marked_fail_with_its_reason_and_the_study_goes_on(user_file, tmp_path):
    cfg = cfg_for(user_file, "two", objectives=["accuracy", "model_bytes"], trials=20, reference=[-10.0, 10.0])
    summary = run_search(cfg, tmp_path / "run", progress=False)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["trials_detail"]
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert len(rows) == 20 and failed
    assert all(r["params"]["y"] == 3 and r["attrs"]["fail_reason"] == "y=3 is not allowed" for r in failed)
    assert all(r["params"]["y"] != 3 for r in rows if r["state"] == "COMPLETE")
    # the report's front and hypervolume are those of the completed trials
    points = [r["values"] for r in rows if r["state"] == "COMPLETE"]
    assert sorted(map(tuple, summary["front"])) == sorted(front(points, ("max", "min")))
    assert summary["hypervolume"] == hypervolume(points, ("max", "min"), (-10.0, 10.0))
    for n in summary["best"]:
        assert (tmp_path / "run" / "best" / f"trial-{n}" / "params.json").is_file()
    assert (tmp_path / "run" / "pareto.png").is_file() and "<svg" in (tmp_path / "run" / "report.html").read_text()


def test_hopeless_multi_objective_trials_are_stopped(user_file):
    cfg = cfg_for(user_file, "partial", objectives=["accuracy", "model_bytes"], trials=5,
                  early_stop_warmup=3, early_stop_dominators=3)
    study = in_memory(cfg, [{"x": 0.9}, {"x": 0.8}, {"x": 0.7}, {"x": 0.1}, {"x": 0.95}])
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[3].user_attrs["stopped"] == "hopeless at step 1"


def test_single_objective_trials_are_pruned_by_the_median_rule(user_file):
    cfg = cfg_for(user_file, "single", trials=7, pruner="median")
    study = in_memory(cfg, [{"x": v} for v in (0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.95)])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5 + ["PRUNED", "COMPLETE"]


def test_grid_sampler_walks_every_point_once(user_file):
    cfg = cfg_for(user_file, "grid", sampler="grid", trials=100, space={"grid": {"x": [1, 2, 3], "y": [0, 1]}})
    study = in_memory(cfg)
    assert sorted((t.params["x"], t.params["y"]) for t in study.trials) == [(x, y) for x in (1, 2, 3) for y in (0, 1)]


def test_nsga2_takes_its_mutation_probability(user_file):
    from kiln.search.samplers import make_sampler

    cfg = cfg_for(user_file, "two", sampler="nsga2", population=4, mutation_prob=0.25)
    space, _ = make_space(cfg)
    assert make_sampler(cfg, space).inner._child_generation_strategy._mutation_prob == 0.25
    default = make_sampler(dataclasses.replace(cfg, mutation_prob=0.0), space)
    assert default.inner._child_generation_strategy._mutation_prob is None          # optuna's 1 / parameters
    with pytest.raises(KilnError, match=r"mutation_prob must be in \[0, 1\]"):
        cfg_for(user_file, "two", sampler="nsga2", mutation_prob=1.5)
    crossover = make_sampler(dataclasses.replace(cfg, swapping_prob=0.1), space).inner._child_generation_strategy._crossover
    assert crossover._swapping_prob == 0.1
    # categorical parameters (the mixed-precision space's) use the strategy's own probability
    assert make_sampler(dataclasses.replace(cfg, swapping_prob=0.1), space).inner._child_generation_strategy._swapping_prob == 0.1
    assert make_sampler(cfg, space).inner._child_generation_strategy._crossover._swapping_prob == 0.5
    with pytest.raises(KilnError, match=r"swapping_prob must be in \[0, 1\]"):
        cfg_for(user_file, "two", sampler="nsga2", swapping_prob=-0.1)


def test_qmc_walks_scipys_scrambled_sobol_sequence(user_file):
    from scipy.stats import qmc

    study = in_memory(cfg_for(user_file, "single", sampler="qmc", trials=6, seed=5))
    # trial 0 fixes the space (sampled independently); then the sequence, in order, from its start
    sobol = qmc.Sobol(1, seed=5, scramble=True).random(8)[:5, 0]      # 8: a power of 2, as scipy asks
    assert [t.params["x"] for t in study.trials[1:]] == list(sobol)


@pytest.mark.parametrize("sampler", ["qmc", "tpe", "nsga2"])
def test_every_sampler_records_the_objective_at_its_own_points(user_file, sampler):
    study = in_memory(cfg_for(user_file, "two", sampler=sampler, objectives=["accuracy", "model_bytes"],
                              trials=9, population=4, startup_trials=2))
    assert len(study.trials) == 9
    for t in study.trials:
        x, y = t.params["x"], t.params["y"]
        assert -2 <= x <= 2 and y in range(5)
        if y == 3:
            assert t.state.name == "FAIL" and t.user_attrs["fail_reason"] == "y=3 is not allowed"
        else:
            assert t.state.name == "COMPLETE" and t.values == [-(x - 1) ** 2 - y, abs(x) + y]
    if sampler == "nsga2":      # generations in order, each of `population` completed trials
        key = optuna.samplers.NSGAIISampler._get_generation_key()
        generations = [t.system_attrs[key] for t in study.trials]
        assert generations == sorted(generations) and generations[-1] >= 1
        done = [sum(g == k and t.state.name == "COMPLETE" for g, t in zip(generations, study.trials))
                for k in range(generations[-1] + 1)]
        assert done[:-1] == [4] * generations[-1] and done[-1] <= 4


def test_unknown_keys_are_errors(user_file):
    with pytest.raises(KilnError, match="unknown key 'trails'"):
        parse_search_config({"trails": 3, "space": {"kind": "python", "objective": f"py:{user_file}:two"}})
    with pytest.raises(KilnError, match="unknown key 'objectiv'"):
        parse_search_config({"space": {"kind": "python", "objectiv": "x"}})
    with pytest.raises(KilnError, match="unknown search space 'nope'"):
        parse_search_config({"space": {"kind": "nope"}})
    with pytest.raises(KilnError, match="unknown objective 'acc'"):
        parse_search_config({"objectives": ["acc"], "space": {"kind": "python", "objective": f"py:{user_file}:two"}})


def test_config_round_trips_through_toml(user_file):
    import tomllib

    cfg = cfg_for(user_file, "two", objectives=["accuracy", "model_bytes"], reference=[0.5, 32.0], sampler="nsga2")
    assert parse_search_config(tomllib.loads(to_toml(cfg))) == cfg


def test_unreachable_storage_is_one_line_exit_2_and_nothing_written(user_file, tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(to_toml(cfg_for(user_file, "two")))
    out = tmp_path / "run"
    for url in ("postgresql://kiln:kiln@127.0.0.1:9/none", "sqlite:////no/such/dir/s.db", "redis-ish://x"):
        r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "search", "--config", str(config),
                            "--out", str(out), "--storage", url], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("kiln: error: storage") and r.stderr.count("\n") == 1, r.stderr
        assert "install" not in r.stderr        # the PostgreSQL driver ships with kiln: a refused connection
        assert not out.exists()


def test_resuming_a_different_search_in_the_same_directory_is_refused(user_file, tmp_path):
    run_search(cfg_for(user_file, "two", trials=2), tmp_path / "run", progress=False)
    with pytest.raises(KilnError, match="different search"):
        run_search(cfg_for(user_file, "single", trials=2), tmp_path / "run", progress=False)


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(user_file, tmp_path):
    cfg = cfg_for(user_file, "two", trials=10, workers=2)
    summary = run_search(cfg, tmp_path / "run", progress=False)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["trials_detail"]
    assert summary["trials"] == 10 and sorted(r["number"] for r in rows) == list(range(10))
    params = [tuple(sorted(r["params"].items())) for r in rows]
    assert len(set(params)) == 10                        # each worker samples with its own seed
    assert (tmp_path / "run" / "study.journal").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KILN_TEST_POSTGRES"),
                    reason="set KILN_TEST_POSTGRES=postgresql://USER:PASS@HOST/DB to test a PostgreSQL storage")
def test_two_workers_share_a_postgresql_study(user_file, tmp_path):
    import optuna

    url = os.environ["KILN_TEST_POSTGRES"]
    cfg = cfg_for(user_file, "two", trials=8, workers=2, storage=url, study=f"pytest-{os.getpid()}-{time.time_ns()}")
    summary = run_search(cfg, tmp_path / "run", progress=False)
    stored = optuna.load_study(study_name=cfg.study, storage=url).trials
    counted = [t for t in stored if not t.user_attrs.get(SURPLUS)]
    assert summary["trials"] == 8 and sorted(t.number for t in counted) == list(range(8))
    assert all(t.state.name == "FAIL" and not t.params for t in stored if t not in counted)
    assert not (tmp_path / "run" / "study.db").exists() and not (tmp_path / "run" / "study.journal").exists()


def test_cli_unknown_key_is_one_line_exit_2(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('trials = 3\nsampler = "tpe"\n[space]\nkind = "cnn"\nchanels = [8]\n')
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "search", "--config", str(config),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown key 'chanels'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_every_shipped_search_config_parses():
    configs = sorted(Path("configs/search").glob("*.toml"))
    assert configs
    from kiln.search.config import load_search_config

    for path in configs:
        assert load_search_config(path).space["kind"] in ("mixed-precision", "cnn", "vit", "compression",
                                                          "train-hparams", "python")


@pytest.mark.slow
def test_resuming_with_another_worker_count_keeps_the_study(user_file, tmp_path):
    run_search(cfg_for(user_file, "two", trials=3, workers=2), tmp_path / "run", progress=False)
    summary = run_search(cfg_for(user_file, "two", trials=5, workers=1), tmp_path / "run", progress=False)
    assert summary["trials"] == 5 and not (tmp_path / "run" / "study.db").exists()


def test_enqueued_starting_points_join_nsga2_generations_and_become_parents(user_file):
    # Optuna's NSGA-II gives a trial a generation when it samples it; an all-enqueued trial is
    # never sampled, so without kiln's join it belonged to no generation and was never a parent
    from optuna.samplers import NSGAIISampler

    cfg = cfg_for(user_file, "two", sampler="nsga2", population=4, objectives=["accuracy", "model_bytes"], trials=12)
    seeds = [{"x": x, "y": y} for x, y in ((0.5, 0), (0.9, 1), (0.1, 2), (0.2, 4), (0.7, 1))]
    study = in_memory(cfg, enqueue=seeds)
    key = NSGAIISampler._get_generation_key()
    generations = [t.system_attrs.get(key) for t in study.trials]
    assert generations[:5] == [0, 0, 0, 0, 1] and None not in generations
    assert [t.params for t in study.trials[:5]] == seeds
    parents = study.sampler.inner.get_parent_population(study, 1)
    assert {t.number for t in parents} == {0, 1, 2, 3}          # generation 0 was the starting points


def test_starting_points_interrupted_while_being_measured_are_enqueued_on_the_next_open(user_file):
    cfg = cfg_for(user_file, "two")
    space, _ = make_space(cfg)
    storage = optuna.storages.InMemoryStorage()

    def interrupted():
        raise KeyboardInterrupt

    space.initial_points = interrupted
    with pytest.raises(KeyboardInterrupt):
        open_study(cfg, storage, space)
    space.initial_points = lambda: [{"x": 0.5, "y": 1}]
    study = open_study(cfg, storage, space)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"x": 0.5, "y": 1}]
