"""`kiln bench SRC --scenario S`: the model under MLPerf LoadGen, beside its roofline bound."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import check_fits, console, count, progress, seconds, user_errors, validate, write_json


def _parse(scenario: str, mode: str):
    from kiln.errors import KilnError
    from kiln.bench.loadgen import Mode, Scenario

    try:
        return Scenario(scenario), Mode(mode)
    except ValueError:
        raise KilnError(f"unknown scenario {scenario!r} or mode {mode!r}; scenarios: "
                        f"{', '.join(s.value for s in Scenario)}; modes: {', '.join(m.value for m in Mode)}") from None


def print_result(r: dict) -> None:
    accuracy_run = r["mode"] == "accuracy"   # LoadGen's validity rules are about performance runs
    verdict = "" if accuracy_run else f": {'VALID' if r['valid'] else 'INVALID'}"
    table = Table(title=f"MLPerf LoadGen {r['scenario']} ({r['mode']}), {r['backend']}, "
                        f"model batch {r['model_batch']}{verdict}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, label in (("result_samples_per_second", "samples/s"), ("result_completed_samples_per_sec", "completed samples/s"),
                       ("result_qps_with_loadgen_overhead", "queries/s"), ("result_mean_latency_ns", "mean latency"),
                       ("result_50.00_percentile_latency_ns", "p50 latency"), ("result_90.00_percentile_latency_ns", "p90 latency"),
                       ("result_99.00_percentile_latency_ns", "p99 latency"), ("result_query_count", "queries")):
        if key in r:
            v = r[key]
            table.add_row(label, seconds(v / 1e9) if key.endswith("_ns") else count(v) if key.endswith("_count")
                          else f"{v:,.1f}")
    if "accuracy" in r:
        table.add_row(f"accuracy ({r['accuracy_samples']} samples)", f"{r['accuracy']:.4f}")
    roof = r.get("roofline", {})
    if roof.get("roofline_s"):
        table.add_row(f"roofline per call ({roof['hardware']})", seconds(roof["roofline_s"]))
        fraction = r.get("roofline_fraction")
        table.add_row("achieved fraction of roofline", _no_fraction(r) if fraction is None
                      else f"{fraction:.1%}" + ("!" if fraction > 1 else ""))
    console.print(table)
    if roof.get("note"):
        console.print(f"[yellow]!: {roof['note']}[/yellow]")
    if not r["valid"] and not accuracy_run:
        reason = r.get("early_stopping_result") or r.get("result_invalid_reason") or ""
        console.print(f"[yellow]invalid under {r['scenario']}'s rules:[/yellow] {' '.join(reason.split())}")


def _no_fraction(r: dict) -> str:
    """Why a run has no time per model call to hold against the roofline."""
    if r["mode"] == "accuracy":
        return "- (accuracy mode is not timed)"
    if r["scenario"] == "Server":
        return "- (Server latencies include queueing)"
    return "- (no time per call)"


@user_errors
def bench(
    src: str = typer.Argument(..., help="A `kiln compile` directory, a model spec, a run or an artifact directory."),
    scenario: str = typer.Option("Offline", help="SingleStream, MultiStream, Server or Offline."),
    backend: str = typer.Option("", help="Backend for a spec or run (default eager); a compile directory brings its own."),
    mode: str = typer.Option("performance", help="performance, or accuracy (every sample once, the task metric)."),
    batch: int = typer.Option(0, help="Offline/Server: samples per model call (default 32 / 1)."),
    samples_per_query: int = typer.Option(0, help="MultiStream: samples per query (default 8)."),
    target_qps: float = typer.Option(0.0, help="Server: the Poisson arrival rate."),
    target_latency_ms: float = typer.Option(0.0, help="Server: the latency bound for a valid run."),
    expected_qps: float = typer.Option(0.0, help="Offline: LoadGen's hint (default: measured before the run)."),
    min_duration: float = typer.Option(10.0, help="Seconds (MLPerf submissions use 600)."),
    min_queries: int = typer.Option(0, help="Minimum queries for a valid run (0: LoadGen's default)."),
    max_samples: int = typer.Option(1024, help="Samples of the test split in the QSL."),
    dataset: Optional[str] = typer.Option(None, help="Dataset (default: the source's)."),
    hardware: str = typer.Option("local", "--hardware", "-H", help="Profile for the roofline bound."),
    log_dir: Optional[Path] = typer.Option(None, help="Keep LoadGen's logs here."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result here."),
) -> None:
    """Drive a model through MLPerf LoadGen on its real test data; LoadGen's summary and the
    roofline bound of this machine."""
    from kiln.cli.analyze import _hardware
    from kiln.bench.run import bench_run
    from kiln.bench.loadgen import BenchConfig, Mode
    validate(positive={"--max-samples": max_samples, "--min-duration": min_duration},
             non_negative={"--batch": batch, "--samples-per-query": samples_per_query, "--target-qps": target_qps,
                           "--target-latency-ms": target_latency_ms, "--expected-qps": expected_qps,
                           "--min-queries": min_queries},
             out_dirs=[log_dir], json_path=json_path)
    check_fits(src, dataset)
    if backend:
        from kiln.compile.backends import parse_backend

        parse_backend(backend)   # an unknown backend or option fails before the model and data load
    sc, md = _parse(scenario, mode)
    config = BenchConfig(sc, md, batch, samples_per_query, target_qps, target_latency_ms, expected_qps,
                         0.0, min_duration, min_queries, max_samples)
    profile = _hardware(hardware)
    timed = config.min_duration_s if md is Mode.PERFORMANCE else None
    with progress(f"LoadGen {sc.value} on {src}") as update:
        result = bench_run(src, config, backend or None, dataset, profile, log_dir,
                           progress=lambda s: update(s, expected_s=timed if s.startswith("LoadGen") else None))
    if json_path:   # first: the result is kept whatever the table does
        write_json(json_path, result)
    print_result(result)
