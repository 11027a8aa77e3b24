"""`kiln federate`: run a federation and write its run directory.

The run directory is a kiln run (kiln.runs.artifact) of the global model after the last
completed round, so `kiln eval`, `kiln quantize` and `kiln compile` take it; beside it
config.toml, state.json (rounds done, history, bytes; what --resume reads), strategy.pt (a
server optimizer's moments), partitions.json and partitions.png (each client's label
histogram), rounds.png (accuracy and bytes per round) and, with error feedback, clients/ (each
client's residual: see kiln.federated.client.ResidualStore). A fresh run is built in a hidden
sibling directory that takes the run's name after its first round; from then on each round
replaces the files atomically, so Ctrl-C leaves the last completed round loadable.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from kiln.config import load_toml, to_dict, to_toml
from kiln.errors import Interrupted, KilnError
from kiln.federated import compress, secagg, simulation
from kiln.federated.client import make_client_app
from kiln.federated.config import Engine, FederateConfig, PrivacyMode
from kiln.federated.partition import histograms, plot_histograms
from kiln.federated.server import CountingGrid, InProcessGrid, KilnStrategy, accountant_epsilon, base_strategy
from kiln.federated.task import Federation, client_seed, federation
from kiln.io import StagedDir, atomic_write_json, atomic_write_text, check_new_dir
from kiln.runs.artifact import WEIGHTS_FILE, write_meta
from kiln.runs.metrics import metric_record
from kiln.runs.weights import load_weights, save_weights
from kiln.train.evaluation import evaluate_model

STATE_FILE = "state.json"
RESUMABLE_CHANGES = ("rounds", "threads", "engine", "superlink")   # transport, not maths


def check_config(cfg: FederateConfig) -> None:
    """What the config alone can refuse, before anything loads."""
    cfg.check_sampling()
    compress.check_format(cfg.compression.format)
    if cfg.privacy.mode == PrivacyMode.CLIENT and cfg.compression.format != compress.NONE:
        raise KilnError("privacy.mode client clips whole weights (Flower's fixedclipping_mod): it cannot be combined "
                        "with a compressed update; use privacy.mode central")
    if cfg.secagg:
        secagg.check(cfg)


def _seed_round(cfg: FederateConfig, round_: int) -> None:
    """Flower samples clients with `random` and draws DP noise with numpy's global generator:
    seed both per round, so a run (and a resumed one) repeats exactly."""
    random.seed(client_seed(cfg.seed, round_, 999_983))
    np.random.seed(client_seed(cfg.seed, round_, 999_979))


class _Run:
    """The run directory and the record of each round."""

    def __init__(self, cfg: FederateConfig, fed: Federation, out: Path | None, resume: bool, log: Callable):
        self.cfg, self.fed, self.log = cfg, fed, log
        self.staged = StagedDir(out) if out is not None and not resume else None
        self.path = self.staged.path if self.staged else out
        self.state = {"round": 0, "history": [], "bytes_up": 0, "bytes_down": 0, "initial_accuracy": None}
        self.t0 = time.perf_counter()

    @property
    def published(self) -> bool:
        return self.staged is None or self.staged.published

    def write_partition(self) -> None:
        fed = self.fed
        hist = histograms(fed.labels, fed.rows, fed.splits.num_classes or int(fed.labels.max()) + 1)
        info = {"kind": str(self.cfg.partition.kind), "alpha": self.cfg.partition.alpha, "seed": self.cfg.seed,
                "sizes": [len(r) for r in fed.rows], "label_histograms": hist,
                "partitioner": "flwr_datasets.partitioner (see kiln/federated/partition.py)"}
        if self.path is not None:
            atomic_write_json(self.path / "partitions.json", info)
            plot_histograms(hist, self.path / "partitions.png",
                            f"{fed.dataset}: {self.cfg.clients} clients, {self.cfg.partition.kind}")

    def initial(self, round_: int, accuracy: float) -> None:
        """The server's evaluation before any training (round 0 of this invocation): kept once, logged."""
        if self.state["initial_accuracy"] is None:
            self.state["initial_accuracy"] = accuracy
        self.log(f"round {round_}/{self.cfg.rounds}  test accuracy {accuracy:.4f}")

    def record(self, round_: int, accuracy: float, strategy: KilnStrategy, grid: CountingGrid) -> dict:
        train = strategy.train_metrics.get(round_, {})
        evals = strategy.eval_metrics.get(round_, {})
        row = {"round": round_, "test_accuracy": accuracy,
               "train_loss": train.get("train_loss"), "train_accuracy": train.get("train_accuracy"),
               "client_accuracy": evals.get("client_accuracy"),
               "bytes_up": grid.up - self.state["bytes_up"], "bytes_down": grid.down - self.state["bytes_down"],
               "failures": strategy.failures.get(round_, []),
               "epsilon": accountant_epsilon(self.cfg, round_), "wall_s": time.perf_counter() - self.t0}
        self.state["bytes_up"], self.state["bytes_down"] = grid.up, grid.down
        self.state["history"].append(row)
        self.state["round"] = round_
        return row

    def checkpoint(self, strategy: KilnStrategy, accuracy: float) -> None:
        if self.path is None:
            return
        fed = self.fed
        atomic_write_text(self.path / "config.toml", to_toml(self.cfg))
        write_meta(self.path, spec=fed.source.spec, dataset=fed.dataset, transforms=list(fed.source.transforms),
                   data_seed=self.cfg.seed)
        save_weights(fed.model, self.path / WEIGHTS_FILE)
        torch.save(strategy.optimizer_state(), self.path / "strategy.pt")
        atomic_write_json(self.path / "metrics.json", self.metrics(accuracy))
        atomic_write_json(self.path / STATE_FILE, self.state)
        if self.staged is not None:
            self.path = self.staged.publish()
            self.staged = None

    def metrics(self, accuracy: float) -> dict:
        h = self.state["history"]
        return metric_record("accuracy", before=self.state["initial_accuracy"], after=accuracy,
                             model=self.cfg.model, source=self.cfg.model, dataset=self.fed.dataset,
                             task="classification", eval_batch_size=self.cfg.eval_batch_size,
                             rounds=self.state["round"], clients=self.cfg.clients, engine=str(self.cfg.engine),
                             bytes_up=self.state["bytes_up"], bytes_down=self.state["bytes_down"],
                             epsilon=h[-1]["epsilon"] if h else None, delta=self.cfg.privacy.delta,
                             history=h, config=to_dict(self.cfg))

    def plot(self) -> None:
        if self.path is None or not self.state["history"]:
            return
        plot_rounds(self.state["history"], self.path / "rounds.png", f"{self.cfg.model} on {self.fed.dataset}")

    def discard(self) -> None:
        if self.staged is not None:
            self.staged.discard()


def plot_rounds(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    rounds = [h["round"] for h in history]
    a.plot(rounds, [h["test_accuracy"] for h in history], marker="o")
    a.set_xlabel("round")
    a.set_ylabel("test accuracy")
    b.bar(rounds, [h["bytes_up"] / 1e6 for h in history], label="uplink")
    b.set_xlabel("round")
    b.set_ylabel("MB uplink")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_resumable(cfg: FederateConfig, out: Path) -> dict:
    if not (out / STATE_FILE).is_file():
        raise KilnError(f"nothing to resume in {out}: no {STATE_FILE} (the run never finished a round)")
    old = to_dict(load_toml(FederateConfig, out / "config.toml"))
    for key, value in to_dict(cfg).items():
        if key not in RESUMABLE_CHANGES and old[key] != value:
            raise KilnError(f"--resume cannot change {key} ({old[key]!r} -> {value!r}); only rounds (and the engine) may change")
    return json.loads((out / STATE_FILE).read_text())


def prepare(cfg: FederateConfig) -> Federation:
    """Every check that needs no round: the config, then the model, the data and the partition
    (built once per process: `federate` reuses them)."""
    check_config(cfg)
    return federation(cfg)


def federate(cfg: FederateConfig, out: str | Path | None = None, resume: bool = False,
             log: Callable[[str], None] = print, grid: Grid | None = None) -> dict:
    """Run the federation `cfg` (into the run directory `out`); returns the final metrics. The
    clients run in Flower's simulation engine (cfg.engine simulation), or as virtual nodes
    called in this process (inprocess), unless `grid` is given (a deployment's ServerApp passes
    the Grid Flower gives it)."""
    check_config(cfg)
    out = Path(out) if out else None
    saved = None
    if resume:
        if out is None:
            raise KilnError("--resume needs --out: the run directory to continue")
        saved = _check_resumable(cfg, out)
    elif out is not None:
        check_new_dir(out)
    fed = federation(cfg)
    run = _Run(cfg, fed, out, resume, log)
    if saved is not None:
        run.state = saved
        load_weights(fed.model, out / WEIGHTS_FILE)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)   # Flower's per-round INFO and its notes
    serve = _serve
    if cfg.secagg:
        serve = secagg.serve
    try:
        if grid is None and cfg.engine == Engine.SIMULATION:
            return simulation.simulate(cfg, client_app(cfg), lambda flower_grid, abort: serve(cfg, fed, run, out, flower_grid, abort))
        return serve(cfg, fed, run, out, grid if grid is not None else InProcessGrid(client_app(cfg), cfg, {}))
    except KeyboardInterrupt:
        if run.published and run.state["round"]:
            raise Interrupted(f"round {run.state['round']}'s global model in {out} is intact (use --resume)") from None
        raise Interrupted("before the first round was saved; nothing was written") from None
    finally:
        flwr_logger.setLevel(level)
        run.discard()


def client_app(cfg: FederateConfig):
    """kiln's ClientApp for `cfg`: the Message-API one, or SecAgg+'s legacy one."""
    if cfg.secagg:
        return secagg.make_client_app(cfg)
    return make_client_app(cfg)


def _serve(cfg: FederateConfig, fed: Federation, run: _Run, out: Path | None, given: Grid,
           abort: threading.Event | None = None) -> dict:
    done = run.state["round"]
    strategy = KilnStrategy(base_strategy(cfg), cfg, round_offset=done, state_dir=lambda: run.path)
    if done and out is not None and (out / "strategy.pt").is_file():
        strategy.load_optimizer_state(torch.load(out / "strategy.pt", weights_only=False))
    grid = CountingGrid(given, abort)
    grid.up, grid.down = run.state["bytes_up"], run.state["bytes_down"]
    if not done:
        run.write_partition()
    remaining = cfg.rounds - done
    if remaining <= 0:
        raise KilnError(f"{out} has done {done} rounds already: raise rounds to continue it")

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        round_ = server_round + done
        fed.load_shared(arrays.to_torch_state_dict())
        _, acc = evaluate_model(fed.model, fed.splits, batch_size=cfg.eval_batch_size)
        fed.model.train()
        if server_round == 0:
            run.initial(round_, acc)
        else:
            row = run.record(round_, acc, strategy, grid)
            run.checkpoint(strategy, acc)
            eps = f"  epsilon {row['epsilon']:.3g}" if row["epsilon"] is not None else ""
            fails = f"  {len(row['failures'])} failed" if row["failures"] else ""
            loss = f"  train loss {row['train_loss']:.4f}" if row["train_loss"] is not None else ""
            run.log(f"round {round_}/{cfg.rounds}  test accuracy {acc:.4f}{loss}  up {row['bytes_up'] / 1e6:.3f} MB"
                    f"  down {row['bytes_down'] / 1e6:.3f} MB{eps}{fails}  {row['wall_s']:.1f} s")
        _seed_round(cfg, round_ + 1)
        return MetricRecord({"accuracy": acc})

    initial = ArrayRecord(fed.shared_state())
    result = strategy.start(grid, initial, num_rounds=remaining, evaluate_fn=evaluate)
    del result
    run.plot()
    final = run.state["history"][-1]["test_accuracy"]
    metrics = run.metrics(final)
    if run.path is not None:
        atomic_write_json(run.path / "metrics.json", metrics)
    return metrics
