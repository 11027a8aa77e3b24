"""`kiln optimize`: the constraint's arithmetic, the choice, the bad inputs, and one whole run
on the MNIST CNN checked against its oracles (kiln eval of the deployable, kiln.timing's own
medians, the study's trials before and after --resume), and its report in headless Chromium."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.errors import KilnError
from kiln.optimize.config import Constraint, DropType, OptimizeConfig
from kiln.optimize.phases import choose

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cfg(**kw) -> OptimizeConfig:
    return OptimizeConfig(src="zoo:cnn", **kw)


def test_absolute_drop_is_in_the_metrics_units():
    c = Constraint.of("accuracy", 0.9, _cfg(max_drop=0.01))
    assert c.limit == pytest.approx(0.89)
    assert c.meets(0.89) and not c.meets(0.8899)
    assert c.drop(0.88) == pytest.approx(0.02) and c.miss(0.88) == pytest.approx(0.01)


def test_relative_drop_is_a_fraction_of_the_baseline_and_perplexity_may_only_rise():
    c = Constraint.of("perplexity", 20.0, _cfg(max_drop=0.05, drop_type=DropType.RELATIVE))
    assert c.limit == pytest.approx(21.0)
    assert c.meets(21.0) and not c.meets(21.01) and c.meets(15.0)


def test_a_task_scored_by_its_own_loss_has_no_metric_to_drop():
    with pytest.raises(KilnError, match="not a task metric"):
        Constraint.of("loss", 1.0, _cfg())


def test_choose_takes_the_cheapest_feasible_trial_else_says_which_came_closest():
    c = Constraint.of("accuracy", 0.9, _cfg(max_drop=0.01))
    rows = [{"number": 0, "metric": 0.90, "cost": 5.0}, {"number": 1, "metric": 0.895, "cost": 2.0},
            {"number": 2, "metric": 0.50, "cost": 1.0}, {"number": 3, "metric": 0.899, "cost": 2.0}]
    chosen, closest = choose(rows, c)
    assert chosen["number"] == 3 and closest is None         # cost 2 twice: the better metric
    chosen, closest = choose([r for r in rows if r["number"] == 2] + [{"number": 4, "metric": 0.7, "cost": 1}], c)
    assert chosen is None and closest["number"] == 4


@pytest.mark.parametrize("args, message", [
    (["--objective", "speed"], "unknown objective 'speed'"),
    (["--target", "nosuchchip"], "unknown hardware profile 'nosuchchip'"),
    (["--drop-type", "percent"], "unknown --drop-type 'percent'"),
    (["--max-drop", "-1"], "--max-drop must be a number >= 0"),
])
def test_bad_options_are_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    r = runner.invoke(app, ["optimize", "zoo:cnn", "--max-drop", "0.01", "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.count("kiln: error:") == 1
    assert not out.exists()


def test_a_generative_model_has_no_metric_exit_2(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["optimize", "zoo:vae", "--max-drop", "0.01", "--out", str(out)])
    assert r.exit_code == 2 and "not a task metric" in r.output, r.output
    assert not out.exists()


def test_resume_of_a_directory_with_no_run_is_refused(tmp_path):
    r = runner.invoke(app, ["optimize", "zoo:cnn", "--max-drop", "0.01", "--out", str(tmp_path), "--resume"])
    assert r.exit_code == 2 and "no kiln optimize run to resume" in r.output, r.output


@pytest.mark.slow
def test_a_budget_smaller_than_the_baseline_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["optimize", "zoo:cnn", "--max-drop", "0.01", "--budget", "0.001", "--out", str(out)])
    assert r.exit_code == 2 and "less than the baseline alone took" in r.output, r.output
    assert not out.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One whole run on the (untrained) MNIST CNN, the final compile between eager and ONNX
    Runtime, every kiln.timing measurement of phase 4 recorded."""
    import kiln.optimize.phases as phases
    from kiln.optimize.run import Hooks, optimize_run

    timed = []
    real = phases.measure

    def recording(calls, config):
        m = real(calls, config)
        timed.append(m)
        return m

    out = tmp_path_factory.mktemp("optimize") / "cnn"
    cfg = OptimizeConfig(src="zoo:cnn", max_drop=0.02, budget_min=4.0, val_samples=200, rounds=3, loadgen_s=1.0)
    mp = pytest.MonkeyPatch()
    mp.setattr(phases, "measure", recording)
    try:
        result = optimize_run(cfg, out, _local(), hooks=Hooks(final_backend="eager+onnxruntime"))
    finally:
        mp.undo()
    return out, cfg, result, timed


def _local():
    from kiln.cli.analyze import _hardware

    return _hardware("local")


@pytest.mark.slow
def test_the_deployables_metric_is_what_kiln_eval_measures(run):
    from kiln.train.evaluation import evaluate_run

    out, _, result, _ = run
    again = evaluate_run(out / "model")
    assert again["reproduced"] is True
    assert again["value"] == result["confirm"]["test"]
    assert result["confirm"]["meets_val"]


@pytest.mark.slow
def test_the_reported_speedup_is_kiln_timings_own_medians(run):
    _, _, result, timed = run
    side = result["deploy"]["side_by_side"]
    m = timed[-1]
    assert side["baseline_ms"] == 1e3 * m.timings["baseline"].median
    assert side["result_ms"] == 1e3 * m.timings["result"].median
    assert side["speedup"] == m.timings["baseline"].median / m.timings["result"].median


@pytest.mark.slow
def test_resume_repeats_no_trial(run, tmp_path):
    import optuna

    from kiln.optimize.run import Hooks, optimize_run

    out, cfg, _, _ = run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    url = f"sqlite:///{copy / 'study.db'}"

    def finished():
        study = optuna.load_study(study_name="kiln-optimize", storage=url)
        return {t.number: (t.datetime_start, t.params) for t in study.trials if t.state.is_finished()}

    before = finished()
    state = json.loads((copy / "optimize.json").read_text())
    # a shorter budget: it is not part of what a resume must share
    optimize_run(dataclasses.replace(cfg, budget_min=1.0), copy, _local(), resume=True, hooks=Hooks(final_backend="eager"))
    after = finished()
    assert all(after[n] == v for n, v in before.items())     # every earlier trial kept, none run again
    again = json.loads((copy / "optimize.json").read_text())
    assert again["baseline"] == state["baseline"] and again["sensitivity"] == state["sensitivity"]
    study = optuna.load_study(study_name="kiln-optimize", storage=url)
    enqueued = [t for t in study.trials if "fixed_params" in t.system_attrs]
    assert len(enqueued) == len({json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in enqueued})


@pytest.mark.slow
def test_a_drop_no_candidate_meets_keeps_the_report_and_names_the_closest(run, tmp_path):
    import optuna

    from kiln.optimize.run import ConstraintNotMet, Hooks, finish, make_space
    from kiln.runs.artifact import load_source
    from kiln.train.evaluation import source_splits

    out, cfg, _, _ = run
    copy = tmp_path / "unmet"
    shutil.copytree(out, copy)
    state = json.loads((copy / "optimize.json").read_text())
    source = load_source(cfg.src)
    study = optuna.load_study(study_name="kiln-optimize", storage=f"sqlite:///{copy / 'study.db'}")
    impossible = Constraint("accuracy", 1.5, 1.4, True)
    with pytest.raises(ConstraintNotMet, match="the closest, trial"):
        finish(cfg, copy, state, make_space(cfg, source, state["baseline"]), study, impossible, source,
               source_splits(source), None, Hooks())
    assert (copy / "report.html").is_file() and not (copy / "model").exists()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_its_charts_and_no_console_errors(run):
    out, _, _, _ = run
    browser = _chromium()
    if browser is None or not (ROOT / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs Debian's chromium and npm's playwright-core (make setup installs both as root)")
    shot = Path(os.environ.get("KILN_ARTEFACTS", out)) / "optimize-report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["node", str(ROOT / "tests" / "browser" / "check_report.js"), str(out / "report.html"),
                           str(shot), browser], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = json.loads(proc.stdout.strip().splitlines()[-1])
    assert page["errors"] == []
    figures = {f["id"]: f for f in page["figures"]}
    for name in ("roofline", "pareto"):
        assert figures[name]["svg"] and figures[name]["paths"] > 5 and figures[name]["width"] > 100
    assert page["tables"] >= 4 and page["title"].startswith("kiln optimize")
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_the_cost_model_of_a_trial_is_kiln_analyze_of_the_artifact_it_becomes(tmp_path):
    """Off `local`, a trial's latency is the roofline of the candidate as it runs; rebuilt by
    kiln's own commands into an artifact, `kiln analyze`'s as-it-runs figure must be the same."""
    from kiln.analysis.report import analyze
    from kiln.hardware.profiles import load_profile
    from kiln.optimize.phases import none_choice, rebuild
    from kiln.optimize.run import make_space
    from kiln.runs.artifact import load_artifact, load_source
    from kiln.runs.execution import as_it_runs

    cfg = OptimizeConfig(src="zoo:cnn", target="h100", val_samples=50)
    source = load_source(cfg.src)
    space = make_space(cfg, source, {"metric": "accuracy", "backend": "eager"})
    space.ensure_setup()
    choice = none_choice(space, "int8", "onnxruntime:dtype=int8") | {"fc:budget": 0.5, "fc:bits": 4}
    trial = space.cost(space.build(choice), {"roofline_ms", "model_bytes"})
    rebuild(space, choice, cfg.src, tmp_path, lambda s: None)
    art = load_artifact(tmp_path / "model")
    assert [t.kind for t in art.transforms] == ["lowrank", "quant"]
    model, execution = as_it_runs(art.model, art.transforms)
    loaded = dataclasses.replace(art.loaded, model=model.eval())
    a = analyze(loaded, load_profile("h100"), measure_time=False, execution=execution)
    assert trial["roofline_ms"] == pytest.approx(1e3 * a.runs_as.roofline.latency_s, rel=1e-12)


@pytest.mark.slow
def test_ctrl_c_keeps_the_ended_phases_and_says_how_to_resume(run, tmp_path, monkeypatch):
    import kiln.optimize.phases as phases
    from kiln.errors import Interrupted
    from kiln.optimize.run import Hooks, optimize_run

    out, cfg, _, _ = run
    copy = tmp_path / "stopped"
    shutil.copytree(out, copy)
    state = json.loads((copy / "optimize.json").read_text())
    del state["sensitivity"], state["result"]
    (copy / "optimize.json").write_text(json.dumps(state))

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(phases, "sensitivity", ctrl_c)
    with pytest.raises(Interrupted, match="kept baseline .* --resume"):
        optimize_run(cfg, copy, _local(), resume=True, hooks=Hooks(final_backend="eager"))
    kept = json.loads((copy / "optimize.json").read_text())
    assert kept["baseline"] == state["baseline"] and "sensitivity" not in kept


def test_an_unmet_drop_is_exit_1_with_one_line(tmp_path, monkeypatch):
    import kiln.optimize.run as run_module

    def unmet(*a, **k):
        raise run_module.ConstraintNotMet("no candidate keeps accuracy within --max-drop 0.01: the closest, trial 3, ...")

    monkeypatch.setattr(run_module, "optimize_run", unmet)
    r = runner.invoke(app, ["optimize", "zoo:cnn", "--target", "h100", "--max-drop", "0.01", "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and r.output.count("kiln: error:") == 1 and "the closest, trial 3" in r.output, r.output
