"""Nothing lost, nothing repeated: searches stopped by SIGKILL, SIGTERM or Ctrl-C and started again.

The oracle is an unkilled run of the same config: with the random sampler seeded per slot, a
search that was killed any number of times, on any storage, with any number of workers, ends
with exactly the budget of COMPLETE trials and exactly the unkilled run's points and values.
"""
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from kiln.errors import KilnError
from kiln.search import resume
from kiln.config import to_toml
from kiln.search.config import parse_search_config
from kiln.search.engine import SURPLUS, Setup, make_space, open_study, optimize, run_trial
from kiln.search.resume import OWNER, RETRY_OF, is_interrupted, recover, slot
from kiln.search.run import run_search
from kiln.search.storage import default_url, open_storage

USER = textwrap.dedent('''
    import time

    def slow(trial):
        x = trial.suggest_float("x", 0, 1)
        y = trial.suggest_int("y", 0, 9)
        time.sleep(0.3)
        return {"accuracy": x + y}

    def quick(trial):
        return {"accuracy": trial.suggest_float("x", 0, 1) + trial.suggest_int("y", 0, 9)}
''')
TRIALS = 10


def config(tmp_path, fn="slow", **top):
    (tmp_path / "user.py").write_text(USER)
    table = {"study": "kill", "objectives": ["accuracy"], "sampler": "random", "trials": TRIALS, "seed": 3, **top,
             "space": {"kind": "python", "objective": f"py:{tmp_path / 'user.py'}:{fn}"}}
    return parse_search_config(table)


def in_memory(cfg) -> Setup:
    space, objectives = make_space(cfg)
    space.ensure_setup()
    return Setup(cfg, space, objectives, open_study(cfg, None, space))


def points(trials) -> list[tuple]:
    return sorted((tuple(sorted(t.params.items())), tuple(t.values)) for t in trials
                  if t.state.name == "COMPLETE")


def test_a_retry_takes_its_originals_slot_and_point_and_later_trials_go_on_as_unkilled(tmp_path):
    reference = in_memory(config(tmp_path, "quick"))
    optimize(reference)
    reference = reference.study

    setup = in_memory(config(tmp_path, "quick"))
    study = setup.study
    for _ in range(3):
        run_trial(setup, log=lambda s: None)
    dead = study.ask()                          # a trial whose process was SIGKILLed mid-run
    dead.suggest_float("x", 0, 1), dead.suggest_int("y", 0, 9)
    assert recover(study, ownerless=True) == 0          # its owner, this process, is alive
    dead.set_user_attr(OWNER, "another-host:1:1")
    assert recover(study) == 0                          # another host's trial: left to the heartbeat
    dead.set_user_attr(OWNER, f"{socket.gethostname()}:{2**22 + 1}:1")    # above Linux's pid_max
    assert recover(study) == 1
    optimize(setup)
    trials = study.get_trials()
    assert is_interrupted(trials[3]) and trials[4].user_attrs[RETRY_OF] == 3
    assert trials[4].params == trials[3].params == reference.trials[3].params
    assert [slot(study, t) for t in trials] == [0, 1, 2, 3, 3] + list(range(4, TRIALS))
    assert points(trials) == points(reference.trials) and len(points(trials)) == TRIALS


def test_ctrl_c_in_a_trial_queues_its_retry_and_the_budget_does_not_count_it(tmp_path):
    setup = in_memory(config(tmp_path, "quick", trials=4))
    study, space = setup.study, setup.space
    run_trial(setup, log=lambda s: None)
    real = space.score

    def interrupted(trial, report):      # Ctrl-C after the point was drawn
        trial.suggest_float("x", 0, 1), trial.suggest_int("y", 0, 9)
        raise KeyboardInterrupt
    space.score = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_trial(setup, log=lambda s: None)
    space.score = real
    optimize(setup)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["fail_reason"].startswith("interrupted")
    assert trials[2].params == trials[1].params and trials[2].user_attrs[RETRY_OF] == 1


def _complete(url: str, study: str) -> int:
    """COMPLETE trials of `study` so far (0 before the search has made its storage)."""
    path = url.split(":///", 1)[1] if url.startswith("sqlite") else url[len("journal:"):] if url.startswith("journal") else None
    if path and not os.path.exists(path):     # opening it here would create it in the run directory
        return 0
    try:
        s = optuna.load_study(study_name=study, storage=open_storage(url))
        return sum(t.state.name == "COMPLETE" for t in s.get_trials(deepcopy=False))
    except KeyError:
        return 0
    except KilnError:         # SQLite locked by the search's writers: look again later
        return -1


def _mtime(path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


def _kill_and_resume(config_path, out, url: str, study: str, rng) -> list[str]:
    """Start `kiln search` and stop it with each signal once, in a random order, at a random
    point (after a random number of completed trials plus a random part of a trial); returns
    what was sent."""
    cmd = [sys.executable, "-m", "kiln.cli.main", "search", "--config", str(config_path), "--out", str(out)]
    sent = []
    for sig in rng.sample([signal.SIGKILL, signal.SIGTERM, signal.SIGINT], 3):
        written = _mtime(out / "config.toml")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = _complete(url, study) + rng.randint(0, 2)
        deadline = time.time() + 60
        # from config.toml's writing on (the command is running; a signal while Python is still
        # importing kiln finds no handler yet, and no trial either)
        while proc.poll() is None and time.time() < deadline and (
                _mtime(out / "config.toml") == written or _complete(url, study) < target):
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is not None:         # the search finished before the kill
            break
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:      # hung: leave no process behind, then fail
            proc.kill()
            proc.communicate()
            raise
        expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
        assert proc.returncode in (expected, 0), err        # 0: it finished as the signal came
        if sig != signal.SIGKILL and proc.returncode:
            assert err.strip().splitlines()[-1] == "kiln: interrupted", err
        sent.append(signal.Signals(sig).name)
    return sent


def _storage_url(kind: str, tmp_path) -> str:
    return {"default": "", "sqlite": f"sqlite:///{tmp_path / 'study.db'}", "journal": f"journal:{tmp_path / 'study.journal'}",
            "postgresql": os.environ.get("KILN_TEST_POSTGRES", "")}[kind]


@pytest.fixture(scope="module")
def unkilled(tmp_path_factory):
    """The oracle: the same search, never stopped (the points do not depend on the study's name)."""
    tmp = tmp_path_factory.mktemp("unkilled")
    run_search(config(tmp), tmp / "run", progress=False)
    return points(optuna.load_study(study_name="kill", storage=f"sqlite:///{tmp / 'run' / 'study.db'}").trials)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["default", "sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.skipif(
    not os.environ.get("KILN_TEST_POSTGRES"), reason="set KILN_TEST_POSTGRES=postgresql://USER:PASS@HOST/DB"))])
def test_killed_and_resumed_search_runs_the_budget_once_with_the_unkilled_points(tmp_path, kind, workers,
                                                                                 unkilled, monkeypatch):
    seed = int(os.environ.get("KILN_TEST_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    cfg = config(tmp_path, study=f"kill-{os.getpid()}-{time.time_ns()}", workers=workers,
                 storage=_storage_url(kind, tmp_path))
    config_path, out = tmp_path / "s.toml", tmp_path / "run"
    config_path.write_text(to_toml(cfg))
    url = cfg.storage or default_url(out, workers)
    sent = _kill_and_resume(config_path, out, url, cfg.study, rng)
    # a SIGKILL in the milliseconds between Optuna creating a trial and kiln stamping its owner
    # leaves a trial no process owns; a shared storage waits OWNERLESS_GRACE_S (a minute) before
    # it runs that trial again, so that a live worker's new trial is never taken for it
    monkeypatch.setattr(resume, "OWNERLESS_GRACE_S", 0.0)
    summary = run_search(cfg, out, progress=False)           # the last start runs to the end
    trials = optuna.load_study(study_name=cfg.study, storage=open_storage(url)).trials
    interrupted = [t for t in trials if is_interrupted(t)]
    retried = [t for t in trials if RETRY_OF in t.user_attrs]
    print(f"\n{kind}, {workers} worker(s), kill seed {seed}, sent {sent}: {len(trials)} trials run, "
          f"{len(interrupted)} interrupted, {len(retried)} re-run, "
          f"{sum(bool(t.user_attrs.get(SURPLUS)) for t in trials)} surplus (never ran), "
          f"{sum(t.state.name == 'COMPLETE' for t in trials)} complete")
    assert summary["trials"] == TRIALS
    assert summary["interrupted"] == len(interrupted) and summary["retried"] == len(retried)
    assert sum(t.state.name == "COMPLETE" for t in trials) == TRIALS
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    # a FAIL trial was interrupted, or created past the budget by a racing worker and never run
    assert all(is_interrupted(t) or t.user_attrs.get(SURPLUS) for t in trials if t.state.name == "FAIL")
    # every interrupted trial ran again exactly once, with its own point
    assert sorted(t.user_attrs[RETRY_OF] for t in retried) == sorted(t.user_attrs.get(RETRY_OF, t.number)
                                                                      for t in interrupted)
    assert points(trials) == unkilled          # no point lost, none repeated, none new
