"""The `kiln` command."""
from __future__ import annotations

import logging

import typer

from kiln.cli import (analyze, bench, compare, compile, early_exit, federate, hardware, hw, hw_model, lowrank, models,
                      nas, optimize, plan, prune, quantize, search, train)
from kiln.cli.common import KilnGroup

app = typer.Typer(
    cls=KilnGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="kiln: see how a PyTorch model maps onto hardware, and make it smaller and faster.",
)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Also print torch's own diagnostics (graph dumps, shape warnings).")) -> None:
    # the `kiln` logger's level is how deeper layers (graph capture) learn about --verbose
    logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.NOTSET)


app.command("models")(models.models)
app.command("analyze")(analyze.analyze)
app.command("train")(train.train)
app.command("eval")(train.evaluate)
app.command("merge")(train.merge)
app.command("datasets")(train.datasets)
app.command("quantize")(quantize.quantize)
app.command("compile")(compile.compile)
app.command("bench")(bench.bench)
app.command("search")(search.search)
app.command("prune")(prune.prune)
app.command("lowrank")(lowrank.lowrank)
app.command("early-exit")(early_exit.early_exit)
app.command("nas")(nas.nas)
app.command("optimize")(optimize.optimize)
app.command("plan")(plan.plan)
app.command("federate")(federate.federate)
app.command("compare")(compare.compare)
app.add_typer(hardware.app, name="hardware")
app.add_typer(plan.cluster_app, name="cluster")
hw_model.register(hw.app)     # kiln hw systolic / estimate beside emit / verify / synth
app.add_typer(hw.app, name="hw")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
