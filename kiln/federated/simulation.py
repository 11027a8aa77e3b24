"""Flower's simulation engine: `flwr.simulation.run_simulation` with the Ray backend runs kiln's
ServerApp (a thread of this process, on Flower's InMemoryGrid) and kiln's ClientApp (in Ray
actors, one CPU each; every virtual node's Context kept by Flower between rounds).

Why run_simulation and not `flwr run` against a local simulation federation: both end in the
same Simulation Runtime (vce + Ray), but `flwr run` starts a SuperLink and a SuperExec that
outlive the run and does a `uv sync` of an app directory; run_simulation keeps the server in
this process, so progress lines, Ctrl-C, exceptions and the run directory stay kiln's.
Flower marks run_simulation deprecated in 1.42 in favour of `flwr run`; kiln's deployment path
(kiln.federated.deploy) is the `flwr run` one.

What Flower's engine does not do for us: a ServerApp thread that raises KeyboardInterrupt (or
any BaseException) is not passed back by run_simulation, and a Ctrl-C in the main thread
stops the runtime while the ServerApp thread would wait for replies forever. Both are handled
here: the server's exceptions come back through `_Outcome`, and the grid polls an abort event.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from kiln.errors import KilnError
from kiln.federated.config import FederateConfig

JOIN_S = 60.0   # how long a Ctrl-C waits for the ServerApp thread to see the abort


class _Outcome:
    """What the ServerApp thread returned or raised, for the calling thread."""

    def __init__(self):
        self.value, self.error = None, None
        self.done = threading.Event()


def backend_config(cfg: FederateConfig) -> dict:
    """Ray: one CPU per ClientApp actor (Flower's default of 2 would run one client at a time on
    a 2-core machine), no dashboard, Ray's own logs at WARNING and not on the terminal."""
    cpus = cfg.threads or 1
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}}


def simulate(cfg: FederateConfig, client_app: ClientApp, serve: Callable[[Grid, threading.Event], dict]) -> dict:
    """Run `serve(grid, abort)` as the ServerApp of a Flower simulation with `cfg.clients`
    virtual nodes running `client_app`; returns what it returns, raises what it raises."""
    from flwr.simulation import run_simulation

    outcome, abort = _Outcome(), threading.Event()
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome.value = serve(grid, abort)
        except BaseException as exc:   # KeyboardInterrupt too: run_simulation drops it
            outcome.error = exc
        finally:
            outcome.done.set()

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")   # a warning per start otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run_simulation(server, client_app, num_supernodes=cfg.clients, backend_config=backend_config(cfg))
    except KeyboardInterrupt:
        abort.set()
        outcome.done.wait(JOIN_S)
        raise
    except RuntimeError as exc:
        if outcome.error is None:
            raise KilnError(f"Flower's simulation engine failed: {exc.__cause__ or exc}") from None
    if outcome.error is not None:
        raise outcome.error
    if not outcome.done.is_set():
        raise KilnError("Flower's simulation ended before kiln's ServerApp finished")
    return outcome.value
