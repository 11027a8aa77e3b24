"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020, arXiv 2009.08576), which Flower
1.42 has only on its legacy path: a ServerApp running `DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))` around a legacy FedAvg, and a ClientApp of a NumPyClient behind
`secaggplus_mod`. The server sees only the masked sum of the clients' weighted models.

What SecAgg+ changes in the numbers: each client scales its model by q_i / T (q_i =
round(n_i / max_weight * T), T = quantization_range = 2**22), clips it to [-c, c] (c =
clipping_range = 8) and rounds it stochastically onto T levels; the server divides the sum by
sum(q_i) / T. So the aggregate differs from FedAvg's sum(n_i x_i) / sum(n_i) by at most
k * (2c / T) * T / sum(q_i) = 2ck / sum(q_i) per element for k clients (one quantization step
each), plus the rounding of the weights q_i (relative 1 / (2 q_i)). With max_weight = the
number of training rows, sum(q_i) = T and the bound is 2ck / T (k = 3: 1.1e-5).

Only FedAvg aggregates a sum, so only fedavg is accepted; compressed updates, client-side DP
and malicious-client fixtures are refused (SecAgg+ quantizes and hides each update itself).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid

from kiln.errors import KilnError
from kiln.federated import compress
from kiln.federated.client import _config_file, partition_id
from kiln.federated.config import Attack, FederateConfig, PrivacyMode, StrategyName
from kiln.federated.server import CountingGrid
from kiln.federated.task import Federation, federation, local_train
from kiln.io import atomic_write_json
from kiln.train.evaluation import evaluate_model

CLIPPING_RANGE = 8.0          # Flower's default: |parameter * q_i / T| must stay below it
QUANTIZATION_RANGE = 2 ** 22  # Flower's default T


def check(cfg: FederateConfig) -> None:
    """What SecAgg+ cannot be combined with, refused in one line."""
    bad = [(cfg.strategy.name != StrategyName.FEDAVG, f"strategy {cfg.strategy.name} (only fedavg aggregates a sum)"),
           (cfg.compression.format != compress.NONE, "compressed updates (SecAgg+ quantizes the model itself)"),
           (cfg.privacy.mode != PrivacyMode.NONE, f"privacy.mode {cfg.privacy.mode}"),
           (cfg.attack.kind != Attack.NONE, "an attack fixture"),
           (bool(cfg.lora), "lora (its legacy client sends the whole model)"),
           (cfg.sampled < 2, "fewer than 2 clients per round (a sum of one is that client's model)")]
    for is_bad, what in bad:
        if is_bad:
            raise KilnError(f"secagg = true cannot be combined with {what}")


def bound(cfg: FederateConfig) -> float:
    """The per-element bound on |SecAgg+ aggregate - FedAvg aggregate| from its quantization."""
    return 2 * CLIPPING_RANGE * cfg.sampled / QUANTIZATION_RANGE


def _arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _load(model: torch.nn.Module, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    new = {k: torch.as_tensor(np.asarray(a)).to(state[k].dtype).reshape(state[k].shape) for k, a in zip(state, arrays)}
    model.load_state_dict(new)
    return {k: v.clone() for k, v in new.items()}


def make_client_app(cfg: FederateConfig | None = None):
    """The legacy ClientApp behind secaggplus_mod: kiln's local training in a NumPyClient."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp


    class KilnClient(NumPyClient):
        def __init__(self, fed: Federation, pid: int):
            self.fed, self.pid = fed, pid

        def fit(self, parameters, config):
            start = _load(self.fed.model, parameters)
            metrics = local_train(self.fed, self.pid, int(config["server-round"]), start, 0.0)
            return _arrays(self.fed.model), len(self.fed.rows[self.pid]), metrics

    def client_fn(context: Context):
        fed = federation(cfg if cfg is not None else _config_file(str(context.run_config["kiln-config"])))
        return KilnClient(fed, partition_id(context, fed)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class _Record:
    """What kiln's run record reads from a strategy (kiln.federated.run._Run.record)."""

    def __init__(self):
        self.train_metrics, self.eval_metrics, self.failures = {}, {}, {}

    def optimizer_state(self) -> dict:
        return {}


def serve(cfg: FederateConfig, fed: Federation, run, out: Path | None, given: Grid,
          abort: threading.Event | None = None) -> dict:
    """kiln's rounds on Flower's legacy DefaultWorkflow with SecAggPlusWorkflow as its fit step;
    each round's global model is evaluated, recorded and checkpointed as in run._serve."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from kiln.federated.run import _seed_round   # run imports this module: at the top it would be a cycle

    done = run.state["round"]
    remaining = cfg.rounds - done
    if remaining <= 0:
        raise KilnError(f"{out} has done {done} rounds already: raise rounds to continue it")
    if not done:
        run.write_partition()
    grid = CountingGrid(given, abort)
    grid.up, grid.down = run.state["bytes_up"], run.state["bytes_down"]
    record = _Record()

    def evaluate(server_round: int, arrays, config):
        round_ = server_round + done
        _load(fed.model, arrays)
        _, acc = evaluate_model(fed.model, fed.splits, batch_size=cfg.eval_batch_size)
        fed.model.train()
        if server_round == 0:
            run.initial(round_, acc)
        else:
            if round_ not in record.train_metrics:
                # the workflow halts a round with too few answers and goes on to the next: stop instead
                raise KilnError(f"SecAgg+ aggregated nothing in round {round_}: fewer clients answered than its "
                                f"reconstruction threshold (a client that raises, or nodes that left)")
            row = run.record(round_, acc, record, grid)
            run.checkpoint(record, acc)
            run.log(f"round {round_}/{cfg.rounds}  test accuracy {acc:.4f}  up {row['bytes_up'] / 1e6:.3f} MB"
                    f"  down {row['bytes_down'] / 1e6:.3f} MB  secagg+  {row['wall_s']:.1f} s")
        _seed_round(cfg, round_ + 1)
        return 0.0, {"accuracy": acc}

    def fit_metrics(results):
        n = sum(k for k, _ in results)
        merged = {key: sum(k * m[key] for k, m in results) / n for key in ("train_loss", "train_accuracy")
                  if all(key in m for _, m in results)}
        record.train_metrics[run.state["round"] + 1] = merged   # the round being aggregated
        return merged

    s = cfg.strategy
    strategy = FedAvg(fraction_fit=s.fraction_train, min_fit_clients=s.min_train_clients,
                      min_available_clients=cfg.clients, fraction_evaluate=0.0, min_evaluate_clients=0,
                      evaluate_fn=evaluate, on_fit_config_fn=lambda r: {"server-round": r + done},
                      initial_parameters=ndarrays_to_parameters(_arrays(fed.model)),
                      fit_metrics_aggregation_fn=fit_metrics, accept_failures=True)
    max_weight = float(len(fed.labels))   # every n_i / max_weight <= 1, and sum(q_i) = T for all clients
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=cfg.sampled if cfg.sampled > 2 else 1.0, reconstruction_threshold=max(2, cfg.sampled // 2 + 1),
        max_weight=max_weight, clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE))
    context = LegacyContext(context=Context(run_id=0, node_id=0, node_config={}, state=_empty_record(), run_config={}),
                            config=ServerConfig(num_rounds=remaining), strategy=strategy)
    workflow(grid, context)
    run.plot()
    metrics = run.metrics(run.state["history"][-1]["test_accuracy"])
    if run.path is not None:

        atomic_write_json(run.path / "metrics.json", metrics)
    return metrics


def _empty_record():
    from flwr.app import RecordDict

    return RecordDict()


# the ClientApp a SuperNode loads for a secagg deployment (`kiln.federated.secagg:client_app`)
client_app = make_client_app(None)
