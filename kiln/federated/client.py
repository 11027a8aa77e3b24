"""The Flower ClientApp: local training on the client's partition, the update it sends (whole
weights, or a compressed update), client-side evaluation, and the malicious-client fixture.

A node knows which partition it holds from its node config (`partition-id`), as Flower's
SuperNodes do (`flower-supernode --node-config "partition-id=0"`), and the federation's config
from the run config (`kiln-config`: a TOML file), so one app serves the simulation and the
deployment engine.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from kiln.config import load_toml
from kiln.errors import KilnError, first_line
from kiln.io import atomic_write
from kiln.federated import compress
from kiln.federated.config import Attack, FederateConfig
from kiln.federated.task import Federation, client_dataset, evaluate_split, federation, local_train

KILN_ERROR = "kiln: "         # the reason of an error reply kiln's client made (one line)
RESIDUAL = "kiln-residual"   # the context-state record holding a client's error-feedback residual
STATE_DIR = "kiln-state-dir"  # train config: the run directory, where clients keep their residuals


def partition_id(context: Context, fed: Federation) -> int:
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int) or not 0 <= pid < fed.cfg.clients:
        raise KilnError(f"node {context.node_id}: node config partition-id {pid!r} is not a client "
                        f"in 0..{fed.cfg.clients - 1}")
    return pid


def _load_global(fed: Federation, msg: Message) -> dict[str, torch.Tensor]:
    state = msg.content["arrays"].to_torch_state_dict()
    fed.load_shared(state)
    return {k: v.clone() for k, v in state.items()}


def _attack(fed: Federation, pid: int, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attack = fed.cfg.attack
    if pid >= attack.clients or attack.kind in (Attack.NONE, Attack.LABEL_FLIP):
        return update
    factor = -attack.scale if attack.kind == Attack.SIGN_FLIP else attack.scale
    return {k: u * factor for k, u in update.items()}


def train_reply(fed: Federation, msg: Message, context: Context) -> Message:
    """One round of one client: train from the global weights, send the update."""
    pid = partition_id(context, fed)
    round_ = int(msg.content["config"]["server-round"])
    start = _load_global(fed, msg)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))   # FedProx's configure_train sends it
    metrics = local_train(fed, pid, round_, start, mu)
    trained = fed.shared_state()
    update = _attack(fed, pid, {k: trained[k] - start[k] for k in fed.float_keys()})
    comp = fed.cfg.compression
    if comp.format == compress.NONE:
        weights = {k: (start[k] + update[k]) if k in update else trained[k] for k, v in trained.items()}
        arrays = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in weights.items()})
    else:
        store = msg.content["config"].get(STATE_DIR, "")
        store = ResidualStore(Path(store), pid) if store and comp.error_feedback else None
        residual = None
        if store is not None:
            residual = store.load(round_)
        elif comp.error_feedback and RESIDUAL in context.state:
            residual = context.state[RESIDUAL].to_torch_state_dict()
        wire, left = compress.compress_update(update, comp.format, comp.topk_fraction, residual)
        if comp.error_feedback:
            context.state[RESIDUAL] = ArrayRecord({k: Array(v.numpy()) for k, v in left.items()})
        if store is not None:
            store.save(round_, left)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in wire.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


class ResidualStore:
    """A client's error-feedback residuals in the run directory (`clients/<partition>/round-R.pt`,
    the residual left after round R), so that --resume continues exactly: the Context state that
    Flower keeps for a node dies with the process. A round the server did not checkpoint (Ctrl-C)
    is redone on resume, so a round R starts from the newest residual before R, and the newest
    two files are kept (at most one round is ever uncheckpointed)."""

    def __init__(self, root: Path, partition: int):
        self.dir = root / "clients" / str(partition)

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("round-*.pt"))

    def load(self, round_: int) -> dict[str, torch.Tensor] | None:
        before = [r for r in self._rounds() if r < round_]
        return torch.load(self.dir / f"round-{before[-1]}.pt", weights_only=True) if before else None

    def save(self, round_: int, residual: dict[str, torch.Tensor]) -> None:
        atomic_write(self.dir / f"round-{round_}.pt", lambda tmp: torch.save(residual, tmp))
        rounds = self._rounds()
        keep = [r for r in rounds if r <= round_][-2:]
        for r in rounds:
            if r not in keep:
                (self.dir / f"round-{r}.pt").unlink(missing_ok=True)


def evaluate_reply(fed: Federation, msg: Message, context: Context) -> Message:
    """The global model on the client's own training rows (its data never leaves it)."""
    pid = partition_id(context, fed)
    _load_global(fed, msg)
    acc, loss = evaluate_split(fed, client_dataset(fed, pid))
    metrics = {"num-examples": len(fed.rows[pid]), "client_accuracy": acc, "client_loss": loss}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(cfg: FederateConfig | None = None) -> ClientApp:
    """A ClientApp for `cfg`, or (cfg None) one that reads `kiln-config` from the run config."""
    fixed = cfg

    def fed_of(context: Context) -> Federation:
        return federation(fixed if fixed is not None else _config_file(str(context.run_config["kiln-config"])))

    app = ClientApp(mods=[clip_when_asked])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return replying_errors(train_reply, fed_of, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return replying_errors(evaluate_reply, fed_of, msg, context)

    return app


def replying_errors(handler, fed_of, msg: Message, context: Context) -> Message:
    """The handler's reply, or an error reply whose reason is one line naming the client and
    the exception: the server stops the run on it (a client that raises would raise again in
    every round) where a node that disappears only costs its round (see KilnStrategy)."""
    try:
        return handler(fed_of(context), msg, context)
    except Exception as exc:
        who = f"client {context.node_config.get('partition-id', context.node_id)}"
        if isinstance(exc, KilnError):
            what = first_line(exc) if str(exc).startswith("client ") else f"{who}: {first_line(exc)}"
        else:
            what = f"{who} raised {type(exc).__name__}: {first_line(exc)}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{KILN_ERROR}{what}"), reply_to=msg)


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod on the training messages whose config carries a clipping norm
    (those of DifferentialPrivacyClientSideFixedClipping); every other message passes."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@functools.lru_cache(maxsize=4)
def _config_file(path: str) -> FederateConfig:
    return load_toml(FederateConfig, path)


# the app a SuperNode loads (`kiln.federated.client:app`): the federation comes from the run config
app = make_client_app(None)
