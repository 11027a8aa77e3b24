"""Several worker processes on one study: `kiln search ... --workers N`.

Each worker is a fresh Python process (`python -m kiln.search.workers`) with one torch thread
and the same storage; the storage hands out trial numbers, so no trial is run twice, samplers
are seeded per trial (kiln.search.samplers), and every worker stops when the study holds
`trials` trials. A worker stops like `kiln search` on SIGTERM or Ctrl-C (its trial runs again
on resume), and gets SIGTERM when the process that launched it dies (Linux), so a killed
search leaves no worker running. Workers on other
machines run the same command against a shared storage URL (PostgreSQL, or a journal file on
a shared file system).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from kiln.errors import KilnError
from kiln.search.config import load_search_config
from kiln.search.engine import Setup, make_space, open_study, optimize
from kiln.search.resume import Stops
from kiln.search.storage import open_storage


def worker_command(config: Path, storage: str, worker: int) -> list[str]:
    return [sys.executable, "-m", "kiln.search.workers", "--config", str(config),
            "--storage", storage, "--worker", str(worker), "--parent", str(os.getpid())]


def launch(config: Path, storage: str, n: int, log_dir: Path) -> list[subprocess.Popen]:
    """Start `n` workers; their stderr goes to log_dir/worker-I.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    for i in range(n):
        log = open(log_dir / f"worker-{i}.log", "w")
        procs.append(subprocess.Popen(worker_command(config, storage, i), env=env,
                                      stdout=subprocess.DEVNULL, stderr=log))
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], count: Callable[[], int], tick: Callable[[int], None],
         log_dir: Path) -> None:
    """Wait for every worker, calling tick(trials so far) about once a second; a worker that
    fails is a KilnError quoting the last line of its log. Ctrl-C stops them all."""
    try:
        # Ctrl-C and SIGTERM land only in the sleep: one landing in `count`'s storage read could
        # leave this process holding SQLite's lock while it waits for the workers to finish
        with Stops() as stops:
            while any(p.poll() is None for p in procs):
                tick(count())
                with stops.live():
                    time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    tick(count())
    for i, p in enumerate(procs):
        if p.returncode != 0:
            lines = (log_dir / f"worker-{i}.log").read_text().strip().splitlines()
            raise KilnError(f"search worker {i} exited with code {p.returncode}: "
                            f"{lines[-1] if lines else 'no output'}")


def worker_main(argv: list[str] | None = None) -> int:
    import torch


    parser = argparse.ArgumentParser(prog="kiln.search.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--parent", type=int, default=0, help="the launching process's pid")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)     # SIGTERM stops a trial like Ctrl-C
    _die_with_parent(args.parent)
    torch.set_num_threads(1)
    try:
        cfg = load_search_config(args.config)
        space, objectives = make_space(cfg)
        study = open_study(cfg, open_storage(args.storage), space)
        optimize(Setup(cfg, space, objectives, study),
                 log=lambda s: print(f"worker {args.worker}: {s}", file=sys.stderr, flush=True))
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worker {args.worker}: interrupted", file=sys.stderr)
        return 130
    return 0


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere a worker
    of a killed search finishes its trials, and the storage keeps their count)."""
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))      # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:       # the parent died while this worker was starting
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(worker_main())
