"""`kiln search`: a search config and a run directory -> a study, its best configs and a report.

The run directory holds config.toml (the config as run), the study (study.db, or study.journal
for several workers, unless --storage points elsewhere), best/ (the best trials as ready-to-run
configs), report.html, report.md, the plots, and results.json. Running the same command again
resumes: the study's trial count goes on from where it stopped, and a trial that a kill, Ctrl-C or
SIGTERM interrupted runs again, not counted twice (kiln.search.resume).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from kiln.config import read_toml, to_toml
from kiln.errors import KilnError
from kiln.io import atomic_write_text
from kiln.search.config import SearchConfig, parse_search_config
from kiln.search.engine import Setup, budget, make_space, open_study, optimize, started
from kiln.search.report import write_report
from kiln.search.resume import recover
from kiln.search.storage import default_url, is_local_default, open_storage
from kiln.search.workers import launch, wait


def prepare_run(cfg: SearchConfig, out: Path) -> tuple[SearchConfig, Path]:
    """Check the run directory (a new one, or this same study's to resume) and write config.toml."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KilnError(f"--out {out} is a file, not a directory")
    previous = out / "config.toml"
    if out.is_dir() and any(out.iterdir()) and not previous.is_file():
        raise KilnError(f"output directory {out} is not empty and holds no search (config.toml)")
    url = cfg.storage or default_url(out, cfg.workers)
    cfg = dataclasses.replace(cfg, storage=url)
    if previous.is_file():
        old = parse_search_config(read_toml(previous), str(previous))
        if (old.space, old.objectives, old.study) != (cfg.space, cfg.objectives, cfg.study):
            raise KilnError(f"{out} holds a different search (space, objectives or study name): "
                            "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out / "config.toml", to_toml(cfg))
    return cfg, path


def run_search(cfg: SearchConfig, out: Path, progress: bool = True,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Run (or resume) the study, then write the best configs and the report; returns the summary."""

    space, objectives = make_space(cfg)
    space.ensure_setup()        # a space with no valid point, or a source that fails, stops here: nothing written
    previous = Path(out) / "config.toml"
    if not cfg.storage and previous.is_file():    # resuming: the study stays where it was started
        cfg = dataclasses.replace(cfg, storage=str(read_toml(previous).get("storage", "")))
    # a given storage must be reachable before anything is written; the default one lives in `out`
    storage = open_storage(cfg.storage) if cfg.storage else None
    cfg, config_path = prepare_run(cfg, out)
    storage = storage or open_storage(cfg.storage)
    study = open_study(cfg, storage, space)
    # the run directory's own storage is shared by no other search: a RUNNING trial without an
    # owner was created by a process killed before the trial began
    n = recover(study, ownerless=is_local_default(cfg.storage, out))
    if n:
        log(f"resuming: {n} trial(s) left running by a killed search run again")
    setup = Setup(cfg, space, objectives, study)
    total = budget(cfg, space)
    done = started(study)
    if done:
        log(f"resuming study {cfg.study!r}: {done} of {total} trials already there")
    with _bar(progress, total, done) as tick:
        if cfg.workers == 1:
            _single(setup, log, tick)
        else:

            procs = launch(config_path, cfg.storage, cfg.workers, Path(out))
            wait(procs, lambda: started(study), tick, Path(out))
    return write_report(study, cfg, space, objectives, Path(out))


def _single(setup: Setup, log, tick) -> None:
    import torch

    if setup.cfg.threads:
        torch.set_num_threads(setup.cfg.threads)
    optimize(setup, log, on_trial=lambda state: tick(started(setup.study)))


class _bar:
    """A rich progress bar over the study's trial count (silent when progress is off)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 transient=True)
        self.progress.start()
        task = self.progress.add_task("trials", total=self.total, completed=self.done)
        return lambda n: self.progress.update(task, completed=min(n, self.total))

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False
