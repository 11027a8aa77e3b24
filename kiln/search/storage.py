"""Where a study lives: an Optuna storage from a URL, with one-line errors.

    (empty)                 SQLite file study.db in the run directory (one worker), or the
                            journal file study.journal there (several workers: SQLite's
                            database lock serialises writers and can time out under contention)
    sqlite:///PATH          SQLite
    postgresql://...        PostgreSQL (or mysql://...): any SQLAlchemy URL Optuna's RDBStorage takes
    journal:PATH            Optuna's JournalStorage on an append-only file (file locks): several
                            processes, or machines on a shared file system, share one study
"""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError, first_line
from kiln.search.resume import heartbeat_stale

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
HEARTBEAT_S = 30
ACCEPTED = "sqlite:///PATH, postgresql://USER:PASS@HOST/DB, mysql://..., journal:PATH"


def default_url(out: Path, workers: int) -> str:
    out = Path(out).resolve()
    return f"sqlite:///{out / 'study.db'}" if workers == 1 else f"journal:{out / 'study.journal'}"


def is_local_default(url: str, out: Path) -> bool:
    """The run directory's own storage: no other process shares it unless this command started it."""
    return url in (default_url(out, 1), default_url(out, 2))


def open_storage(url: str):
    """An Optuna storage for `url`; an unknown scheme or an unreachable database is a KilnError."""
    import optuna

    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if not path.parent.is_dir():
            raise KilnError(f"storage {url}: directory {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:
            raise KilnError(f"storage {url} cannot be opened: {first_line(exc)}") from None
    if scheme not in RDB_SCHEMES or "://" not in url:
        raise KilnError(f"storage {url!r} is not a storage URL; accepted: {ACCEPTED}")
    if scheme == "sqlite":
        parent = Path(url.split(":///", 1)[-1]).parent
        if not parent.is_dir():
            raise KilnError(f"storage {url}: directory {parent} does not exist")
    import warnings

    try:
        # a worker killed on another machine leaves its trial RUNNING: with a heartbeat, Optuna
        # fails such trials once they are silent for the grace period, and kiln queues them to
        # run again (journal files have no heartbeat: kiln.search.resume finds dead workers of
        # the same host there, and every storage's)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(scheme),
                                              heartbeat_interval=HEARTBEAT_S, grace_period=4 * HEARTBEAT_S,
                                              heartbeat_stale_trial_callback=heartbeat_stale)
    except Exception as exc:     # SQLAlchemy's OperationalError, a missing driver, ...
        raise KilnError(f"storage {url} cannot be reached: {first_line(exc)}") from None


def _engine_kwargs(scheme: str) -> dict:
    if scheme == "sqlite":
        return {"connect_args": {"timeout": 60}}    # wait for another writer's lock, don't fail
    if scheme == "postgresql":
        return {"connect_args": {"connect_timeout": 10}}
    return {}
