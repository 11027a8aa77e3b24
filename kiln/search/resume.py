"""Nothing lost, nothing repeated: what a study keeps when its search is killed.

A trial stopped by Ctrl-C, SIGTERM (Slurm, Kubernetes) or a killed process is *interrupted*:
it is told FAIL with `fail_reason` "interrupted...", it does not count against the budget,
and a retry with its parameters is queued (user attribute `kiln_retry_of`), so the resumed
search runs that point instead of a new one.

- Ctrl-C and SIGTERM: the trial queues its own retry as it stops (kiln.search.engine).
- A killed process leaves its trial RUNNING. Each trial records its owner (host, pid, and the
  process's start time, so a recycled pid is not mistaken for it); any search on the same host
  that finds the owner gone interrupts the trial. A trial of a worker on another machine is
  found by Optuna's heartbeat on RDB storages (`heartbeat_stale`). A trial whose process was
  killed in the milliseconds between Optuna creating it and kiln stamping its owner is
  interrupted once it is OWNERLESS_GRACE_S old, or at once by a search on the run directory's
  own storage, which no other search shares.

A trial's *slot* is its place in the budget, the same whether or not the search was killed:
its number less the retries before it, and a retry takes its original's slot.
Samplers are seeded from the slot (kiln.search.samplers), so a resumed search neither replays
the first trials' points nor differs from an unkilled one where the sampler is deterministic.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import threading

INTERRUPTED = "interrupted"         # fail_reason prefix
RETRY_OF = "kiln_retry_of"          # user attribute: the number of the first trial of this point
OWNER = "kiln_owner"                # user attribute: "host:pid:start" of the process running it
# a trial gets its owner milliseconds after Optuna creates it (kiln.search.samplers stamps it
# first thing): one without an owner after this long lost its process in between
OWNERLESS_GRACE_S = 60.0


def is_interrupted(t) -> bool:
    """A FAIL trial stopped from outside. Every failure kiln's objective sees gets a reason, so a
    FAIL trial without one was failed by Optuna's heartbeat: its process went away."""
    from optuna.trial import TrialState

    return t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", INTERRUPTED)).startswith(INTERRUPTED)


def requeue(study, t, user_attrs: dict | None = None) -> None:
    """Queue a new WAITING trial that runs `t`'s point: its parameters fixed, and the sampler's
    own marks (a grid point, a generation) carried over, as Optuna's retry callback does."""
    import optuna

    system = {k: v for k, v in t.system_attrs.items() if k != "search_space" or "grid_id" in t.system_attrs}
    system["fixed_params"] = {**t.system_attrs.get("fixed_params", {}), **t.params}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING,
                                              system_attrs=system, user_attrs=user_attrs or {}))


def retry(study, t) -> None:
    """Queue the retry of interrupted trial `t` (a retry of a retry names the first trial)."""
    requeue(study, t, {RETRY_OF: t.user_attrs.get(RETRY_OF, t.number)})


def interrupt(study, t, why: str) -> bool:
    """Fail a RUNNING trial as interrupted and queue its retry; False if it finished meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"{INTERRUPTED}: {why}")
        if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:        # its own process, or another search, finished it first
        return False
    retry(study, study._storage.get_trial(t._trial_id))
    return True


def heartbeat_stale(study, t) -> None:
    """Optuna's callback for a trial its heartbeat found silent (RDB storages): retry it."""
    retry(study, t)


@functools.lru_cache(maxsize=8)
def process_id(pid: int) -> str:
    """host:pid:start time of a process (the start time in clock ticks since boot, Linux; '' elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = ""
    return f"{socket.gethostname()}:{pid}:{start}"


def owner_gone(owner: str) -> bool:
    """The process named by `owner` ran on this host and no longer runs (or its pid was reused)."""
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:        # alive, someone else's
        pass
    process_id.cache_clear()      # a pid's start time is only fixed while that process lives
    return bool(start) and process_id(int(pid)) != owner


def stamp(study, trial) -> None:
    """Record this process as the owner of `trial` (see `recover`)."""
    study._storage.set_trial_user_attr(trial._trial_id, OWNER, process_id(os.getpid()))


def recover(study, ownerless: bool = False) -> int:
    """Interrupt the RUNNING trials whose process is gone, and those with no owner that are
    older than OWNERLESS_GRACE_S, or any age when `ownerless` (only when no other process can
    be starting trials of the study). Returns how many."""
    import datetime

    from optuna.trial import TrialState

    n = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER)
        old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > OWNERLESS_GRACE_S
        if owner_gone(owner) if owner else (ownerless or old):
            n += interrupt(study, t, "its search was killed")
    return n


def slot(study, trial) -> int:
    """`trial`'s place in the budget (see the module's docstring): the number of distinct points
    numbered below it, that is its number less the retries numbered below it. (Counting the
    interrupted trials instead would race: a trial created between another's interruption and
    its retry's queueing would take the interrupted trial's slot.)"""
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    first = trial.user_attrs.get(RETRY_OF)
    number = trial.number if first is None else first
    return number - sum(1 for t in trials if t.number < number and RETRY_OF in t.user_attrs)


class Stops:
    """Ctrl-C and SIGTERM where kiln can handle them. Inside a trial's objective (`live`) they
    raise KeyboardInterrupt at once, and the trial is interrupted and queued again; elsewhere
    (Optuna creating or telling a trial, starting its heartbeat thread) they are held until the
    next trial would start or the loop ends: an interrupt there could leave a trial RUNNING, or a
    heartbeat thread that never stops and keeps the process from exiting."""

    def __init__(self):
        self.pending = self.armed = False
        self.saved: dict = {}

    def __enter__(self) -> "Stops":
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, *_) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        if self.pending and kind is None:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        self.pending = True
        if self.armed:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """Hold signals for a moment inside `live` (a storage call); raise after it if one came."""
        was, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = was
        if was and self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def live(self):
        if self.pending:
            raise KeyboardInterrupt
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def shield(storage, stops: Stops) -> None:
    """Hold Ctrl-C and SIGTERM during every call of `storage`'s public methods in the main thread.
    An interrupt inside one leaves its transaction open: SQLite then stays locked by this process,
    and the trial's heartbeat thread, which the interrupted process waits for, never gets the lock
    (seen as a worker hung for minutes). The methods are wrapped on the instance, so Optuna's
    isinstance checks (the heartbeat) still hold; wrapping twice only swaps the Stops."""
    storage._kiln_stops = stops
    if getattr(storage, "_kiln_shielded", False):
        return
    storage._kiln_shielded = True
    for name in dir(type(storage)):
        method = getattr(storage, name)
        if not name.startswith("_") and callable(method):
            setattr(storage, name, _held(storage, method))


def _held(storage, method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():    # signals reach the main thread only
            return method(*args, **kwargs)
        with storage._kiln_stops.held():
            return method(*args, **kwargs)
    return call
