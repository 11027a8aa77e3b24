"""The server side: Flower's strategies (and DP wrappers) chosen by the config, kiln's one
wrapper around them (decodes compressed updates, records each round's client metrics and
failures), the grid that counts the bytes of every serialized message, and the privacy
accountant."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from kiln.errors import KilnError, first_line
from kiln.federated import compress
from kiln.federated.client import KILN_ERROR, STATE_DIR
from kiln.federated.config import FederateConfig, PrivacyMode, StrategyName


def base_strategy(cfg: FederateConfig) -> fs.Strategy:
    """The Flower strategy the config names, with its sampling."""
    s = cfg.strategy
    common = dict(fraction_train=s.fraction_train, min_train_nodes=s.min_train_clients,
                  min_available_nodes=s.min_train_clients, fraction_evaluate=s.fraction_evaluate,
                  min_evaluate_nodes=max(1, int(cfg.clients * s.fraction_evaluate)) if s.fraction_evaluate else 0)
    byz = s.byzantine or cfg.attack.clients
    build = {
        StrategyName.FEDAVG: lambda: fs.FedAvg(**common),
        StrategyName.FEDPROX: lambda: fs.FedProx(**common, proximal_mu=s.proximal_mu),
        StrategyName.FEDADAM: lambda: fs.FedAdam(**common, eta=s.server_lr, tau=s.tau),
        StrategyName.FEDYOGI: lambda: fs.FedYogi(**common, eta=s.server_lr, tau=s.tau),
        StrategyName.FEDADAGRAD: lambda: fs.FedAdagrad(**common, eta=s.server_lr, tau=s.tau),
        StrategyName.FEDMEDIAN: lambda: fs.FedMedian(**common),
        StrategyName.FEDTRIMMEDAVG: lambda: fs.FedTrimmedAvg(**common, beta=s.trim_beta),
        StrategyName.KRUM: lambda: fs.Krum(**common, num_malicious_nodes=byz),
        StrategyName.MULTIKRUM: lambda: fs.MultiKrum(**common, num_malicious_nodes=byz,
                                                     num_nodes_to_select=s.keep or max(1, cfg.sampled - byz)),
    }
    strategy = build[s.name]()
    p = cfg.privacy
    if p.mode == PrivacyMode.CENTRAL:
        strategy = fs.DifferentialPrivacyServerSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm,
                                                                 cfg.sampled)
    elif p.mode == PrivacyMode.CLIENT:
        strategy = fs.DifferentialPrivacyClientSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm,
                                                                 cfg.sampled)
    return strategy


class KilnStrategy(fs.Strategy):
    """Wraps a Flower strategy: replies that carry a compressed update become whole weights
    (global + decoded update) before the inner strategy (and its DP wrapper) sees them; each
    round's aggregated client metrics and failures are kept for the run's metrics."""

    def __init__(self, inner: fs.Strategy, cfg: FederateConfig, round_offset: int = 0,
                 state_dir: Callable[[], Path | None] = lambda: None):
        super().__init__()
        self.inner, self.cfg, self.offset, self.state_dir = inner, cfg, round_offset, state_dir
        self.current: ArrayRecord | None = None
        self.train_metrics: dict[int, dict] = {}
        self.eval_metrics: dict[int, dict] = {}
        self.failures: dict[int, list[str]] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = arrays
        where = self.state_dir()
        if where is not None and self.cfg.compression.error_feedback:
            # the run directory (a fresh run's is renamed after round 1: asked each round)
            config = ConfigRecord({**config, STATE_DIR: str(Path(where).resolve())})
        # the inner strategy sees absolute rounds: FedAdam's bias correction and the clients'
        # seeds depend on them, and a resumed run restarts Flower's count at 1
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def _decode(self, reply: Message) -> None:
        fmt = self.cfg.compression.format
        if fmt == compress.NONE or reply.has_error():
            return
        assert self.current is not None
        wire = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        glob = {k: v.numpy() for k, v in self.current.items()}
        shapes = {k: g.shape for k, g in glob.items() if np.issubdtype(g.dtype, np.floating)}
        update = compress.decode(wire, fmt, shapes)
        weights = {k: (g + update[k].numpy().astype(g.dtype)) if k in update else g for k, g in glob.items()}
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})

    def _check_replies(self, server_round: int, replies: list[Message]) -> list[str]:
        """The round's failures; a client whose code raised stops the run with its one line (it
        would raise again in every round), where a node that is gone only costs its reply."""
        for r in replies:
            if r.has_error() and r.error.reason.startswith(KILN_ERROR):
                raise KilnError(r.error.reason[len(KILN_ERROR):])
        failed = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
        if replies and len(failed) == len(replies):
            raise KilnError(f"round {server_round + self.offset}: every client failed, e.g. {failed[0]}")
        return failed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.failures[server_round + self.offset] = self._check_replies(server_round, replies)
        for r in replies:
            self._decode(r)
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, replies)
        if arrays is not None and self.current is not None:
            # FedAdam's numpy arithmetic promotes to float64: the global model keeps the model's
            # dtypes, as its checkpoint does, so a resumed run continues exactly
            dtypes = {k: v.numpy().dtype for k, v in self.current.items()}
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v.numpy().astype(dtypes.get(k, v.numpy().dtype))))
                                  for k, v in arrays.items()})
        if metrics is not None:
            self.train_metrics[server_round + self.offset] = dict(metrics)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._check_replies(server_round, replies)
        metrics = self.inner.aggregate_evaluate(server_round + self.offset, replies)
        if metrics is not None:
            self.eval_metrics[server_round + self.offset] = dict(metrics)
        return metrics

    def optimizer_state(self) -> dict:
        """FedAdam/FedYogi/FedAdagrad's moments, saved with each round for --resume."""
        inner = getattr(self.inner, "strategy", self.inner)   # through a DP wrapper
        return {k: getattr(inner, k) for k in ("m_t", "v_t") if getattr(inner, k, None) is not None}

    def load_optimizer_state(self, state: dict) -> None:
        inner = getattr(self.inner, "strategy", self.inner)
        for k, v in state.items():
            setattr(inner, k, v)


class CountingGrid(Grid):
    """A Grid that counts the bytes of every message it sends and receives, as serialized by
    Flower's protobuf serde (what travels over gRPC in a deployment, less gRPC's framing)."""

    def __init__(self, inner: Grid, abort: threading.Event | None = None):
        self.inner, self.abort = inner, abort
        self.down, self.up = 0, 0

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))   # the inner grid gives each its id first
        self.down += sum(message_to_proto(m).ByteSize() for m in messages)
        return ids

    def pull_messages(self, message_ids):
        replies = list(self.inner.pull_messages(message_ids))
        self.up += sum(message_to_proto(m).ByteSize() for m in replies if not m.has_error())
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        if self.abort is None:
            messages = list(messages)
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            self.down += sum(message_to_proto(m).ByteSize() for m in messages)
            self.up += sum(message_to_proto(m).ByteSize() for m in replies if not m.has_error())
            return replies
        # Flower's Grid.send_and_receive, polling `abort` too: a Ctrl-C that stops Flower's
        # simulation runtime would otherwise leave the ServerApp waiting for replies forever
        pending = set(self.push_messages(messages))
        end = time.monotonic() + timeout if timeout is not None else None
        replies = []
        while pending and (end is None or time.monotonic() < end):
            if self.abort.is_set():
                raise KeyboardInterrupt
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(0.05)
        return replies


class InProcessGrid(Grid):
    """engine = "inprocess": `clients` virtual nodes called one after another in this process,
    each with its own Context (its state persists across rounds, as a SuperNode's does). Every
    message goes through Flower's serde both ways, as it would over the wire. Kept beside
    Flower's simulation engine (the default, kiln.federated.simulation) for what that engine
    cannot serve here: the fast test tier and sweeps of short runs, where Ray's start-up (about a
    minute on a 2-core machine) would dominate; tests/test_federated_simulation.py checks that
    both give the same global parameters within 1e-6."""

    def __init__(self, client_app, cfg: FederateConfig, run_config: dict):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1   # the ServerApp's identity
        self.app = client_app
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i},
                                        state=RecordDict(), run_config=dict(run_config)) for i in range(cfg.clients)}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        from flwr.supercore.run import Run

        return Run.create_empty(run_id=1)   # run 1, as the nodes' Contexts say

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise KilnError("the in-process grid only sends and receives")

    def pull_messages(self, message_ids):
        raise KilnError("the in-process grid only sends and receives")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            wire = message_from_proto(message_to_proto(msg))
            context = self.nodes[msg.metadata.dst_node_id]
            try:
                reply = self.app(wire, context)
            except KilnError as exc:
                raise KilnError(f"client {context.node_config['partition-id']}: {exc}") from None
            except Exception as exc:
                raise KilnError(f"client {context.node_config['partition-id']} raised {type(exc).__name__}: "
                                f"{first_line(exc)}") from None
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def accountant_epsilon(cfg: FederateConfig, rounds: int) -> float | None:
    """Epsilon at cfg.privacy.delta after `rounds` releases of the Gaussian mechanism with the
    config's noise multiplier, the sampled fraction of clients as the sampling rate (client-level
    DP, McMahan et al. 2018, arXiv 1710.06963), by Opacus's RDP accountant (Mironov 2017).
    Flower samples a fixed number of clients without replacement where the RDP analysis of
    the subsampled Gaussian assumes Poisson sampling: the figure is the usual approximation."""
    p = cfg.privacy
    if p.mode == PrivacyMode.NONE or rounds == 0:
        return None
    if p.noise_multiplier == 0:
        return float("inf")
    from opacus.accountants import RDPAccountant   # heavy: only runs with privacy import it

    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, cfg.sampled / cfg.clients, rounds)]
    return float(acc.get_epsilon(p.delta))
