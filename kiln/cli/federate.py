"""`kiln federate`: federated learning on Flower (strategies, partitions, privacy, compressed updates)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kiln.cli.common import console, err_console, progress, user_errors, validate, write_json


def load_config(config: Path, overrides: dict):
    """The TOML with the flags given on top of it."""
    from kiln.config import from_dict, read_toml
    from kiln.federated.config import FederateConfig

    data = read_toml(config)
    data |= {k: v for k, v in overrides.items() if v is not None}
    return from_dict(FederateConfig, data, str(config))


@user_errors
def federate(
    config: Optional[Path] = typer.Option(None, "--config", help="Federation TOML (FederateConfig: model, dataset, "
                                          "rounds, clients, [partition], [strategy], [local], [compression], "
                                          "[privacy], [attack])."),
    out: Optional[Path] = typer.Option(None, help="Run directory for the global model, metrics and plots."),
    resume: bool = typer.Option(False, help="Continue the run in --out after its last completed round."),
    deployment: bool = typer.Option(False, "--deployment", help="A SuperLink and one SuperNode per client as "
                                    "processes on this machine (Flower's deployment engine)."),
    superlink: Optional[str] = typer.Option(None, help="host:port of a SuperLink already running (deployment)."),
    inprocess: bool = typer.Option(False, "--inprocess", help="Call the apps in this process instead of Flower's "
                                   "simulation engine (no Ray start-up; the same parameters within 1e-6)."),
    secagg: Optional[bool] = typer.Option(None, "--secagg/--no-secagg", help="Flower's SecAgg+ secure aggregation "
                                          "(FedAvg only)."),
    rounds: Optional[int] = typer.Option(None, help="Override `rounds` (with --resume: the new total)."),
    seed: Optional[int] = typer.Option(None, help="Override `seed`."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the final metrics here."),
) -> None:
    """Train a model across simulated (or deployed) clients with a Flower strategy; each round's
    test accuracy, client metrics and bytes each way go to the terminal and to metrics.json."""
    validate(positive={"--rounds": rounds}, non_negative={"--seed": seed},
             new_dirs=[None if resume else out], json_path=json_path)
    from kiln.errors import KilnError

    if config is None:
        if not (resume and out and (out / "config.toml").is_file()):
            raise KilnError("no federation config: give --config fl.toml (or --resume --out RUN)")
        config = out / "config.toml"
    if inprocess and (deployment or superlink):
        raise KilnError("--inprocess and --deployment/--superlink exclude each other")
    overrides = {"rounds": rounds, "seed": seed, "superlink": superlink, "secagg": secagg,
                 "engine": "deployment" if deployment or superlink else "inprocess" if inprocess else None}
    cfg = load_config(config, overrides)
    from kiln.federated.config import Engine
    from kiln.federated.run import federate as run_federation, prepare

    deployed = cfg.engine == Engine.DEPLOYMENT
    if deployed:
        from kiln.federated.deploy import check_superlink, run_deployment

        if out is None:
            raise KilnError("the deployment engine needs --out: its ServerApp process writes the run there")
        if cfg.superlink:
            check_superlink(cfg.superlink)
    prepare(cfg)   # a model, dataset or partition that cannot work is refused before any output

    with progress("federate") as update:
        def log(line: str) -> None:
            err_console.print(line, highlight=False, soft_wrap=True)
            if line.startswith("round "):
                done, total = line.split()[1].split("/")
                update(f"round {done} of {total}", fraction=int(done) / int(total) or None)

        if deployed:
            run_deployment(cfg, out, resume, log)
            import json

            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = run_federation(cfg, out, resume=resume, log=log)
    console.print(f"test accuracy: {metrics['before']:.4f} -> {metrics['after']:.4f} after {metrics['rounds']} rounds; "
                  f"uplink {metrics['bytes_up'] / 1e6:.2f} MB, downlink {metrics['bytes_down'] / 1e6:.2f} MB"
                  + (f"; epsilon {metrics['epsilon']:.3g} at delta {metrics['delta']:g}" if metrics["epsilon"] else ""))
    if out:
        console.print(f"run: {out}")
    if json_path:
        write_json(json_path, metrics)
