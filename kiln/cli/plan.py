"""`kiln plan`: choose a parallel plan before spending a cluster; `kiln cluster`: list, show
and calibrate cluster profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, progress, seconds, si, user_errors, validate, write_json

EMITS = ("torchrun", "slurm")


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"


def _hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f} h" if value >= 1 else f"{value * 60:.1f} min" if value >= 1 / 60 else seconds(value * 3600)


@user_errors
def plan(
    spec: str = typer.Argument(..., help="Model spec; hf-config: transformers above 300M parameters are planned from their config, "
                                         "presets and other models too big for memory captured without weights (meta device)."),
    cluster: str = typer.Option(..., "--cluster", help="Cluster profile name or .toml (`kiln cluster`)."),
    devices: int = typer.Option(..., "--devices", help="How many devices (GPUs, TPU chips, local processes)."),
    global_batch: int = typer.Option(0, "--global-batch", help="Samples (sequences) per optimizer step; default 8 per device."),
    seq: Optional[int] = typer.Option(None, "--seq", help="Tokens per sequence (transformers)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps to train (for time and cost)."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Or a token budget (samples for non-sequence models)."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Hours: also find the cheapest plan that finishes in time."),
    instance: Optional[str] = typer.Option(None, "--instance", help="Price as this instance (kiln/plan/prices.toml); default the cheapest matching."),
    from_config: bool = typer.Option(False, "--from-config", help="Plan an hf-config transformer from its config even when small."),
    efficiency: float = typer.Option(1.0, help="Share of the device's peak FLOP/s its kernels reach (measured MFU); 1 = the roofline."),
    top: int = typer.Option(10, min=1, help="How many fitting plans to list."),
    emit: Optional[str] = typer.Option(None, "--emit", help="Write the best plan's launch script: torchrun or slurm."),
    script: Optional[Path] = typer.Option(None, "--script", help="Where --emit writes (default kiln-plan-torchrun.sh / kiln-plan.sbatch)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every plan, rejection and cost as JSON here."),
) -> None:
    """Rank DP, ZeRO/FSDP, pipeline and tensor-parallel plans by predicted step time, with memory, cost and the command."""
    from kiln.errors import KilnError
    from kiln.plan.run import PlanConfig, check_cluster

    if emit is not None and emit not in EMITS:
        raise KilnError(f"--emit {emit!r}: accepted: {', '.join(EMITS)}")
    script = script or (Path("kiln-plan.sbatch" if emit == "slurm" else "kiln-plan-torchrun.sh") if emit else None)
    validate(positive={"--devices": devices, "--seq": seq, "--steps": steps, "--tokens": tokens, "--deadline": deadline},
             non_negative={"--global-batch": global_batch}, outputs=[script], json_path=json_path)
    config = PlanConfig(spec, cluster, devices, global_batch, seq, steps, tokens, deadline, instance, from_config,
                        efficiency)
    cluster_obj, _ = _cluster_and_device(config, check_cluster)
    if emit and cluster_obj.config.device.startswith("tpu"):
        raise KilnError(f"--emit writes torchrun and SLURM launches of GPU and CPU clusters; {cluster_obj.name} runs through XLA")
    from kiln.plan.run import plan as run_plan
    from kiln.plan.workload import load_workload

    if spec.startswith("hf-config:"):   # a config, not a capture: seconds at most, and silent
        workload = load_workload(spec, seq, from_config)
    else:
        with progress(f"analysing {spec}"):
            workload = load_workload(spec, seq, from_config)
    report = run_plan(config, workload)
    _print(report, top)
    best = report.ranking.best
    if emit:
        _emit(report, best, emit, script)
    if json_path:
        write_json(json_path, _json(report))


def _cluster_and_device(config, check_cluster):
    """The cluster checked first; a `local` device profile measured once if missing (as `kiln analyze` does)."""
    from kiln.plan.cluster import load_cluster

    c = load_cluster(config.cluster)
    if c.config.device == "local":
        from kiln.cli.analyze import _hardware

        _hardware("local")
    return check_cluster(config)


def _print(report, top: int) -> None:
    from kiln.plan.emit import command_line

    r, w, c = report.ranking, report.workload, report.cluster
    console.print(f"{w.name}: {si(w.params)} parameters, {si(w.flops_per_sample, 'FLOP')} forward per sample "
                  f"({w.seq} tokens; {w.source}); cluster {c.name}: {c.config.device}, "
                  f"{si(c.config.device_memory, 'B')} per {'node, shared by its processes' if c.config.share_node else 'device'}, "
                  f"{c.config.precision.value}")
    table = Table(title=f"plans that fit ({len(r.fitting)}; fastest first)")
    for col in ("#", "plan", "mode", "step", "compute", "bubble", "tp", "pp", "dp exposed", "memory/device", "time", "cost"):
        table.add_column(col)
    for i, p in enumerate(r.fitting[:top], 1):
        parts = p.parts
        table.add_row(str(i), p.plan.describe(), p.plan.mode, seconds(p.step_s), seconds(parts["compute"]),
                      seconds(parts["bubble"]), seconds(parts["tp"]), seconds(parts["pp"]), seconds(parts["dp"]),
                      si(p.memory.total, "B"), _hours(report.hours(p)), _money(report.dollars(p)))
    console.print(table)
    if r.rejected:
        console.print(f"rejected layouts ({len(r.rejected)}), each by its closest variant:")
        for p in r.rejected[:top]:
            console.print(f"  {p.plan.describe()}: {p.reason}")
    console.print("overlap: DP/ZeRO-1/2 collectives hide behind the last micro-batch's backward, ZeRO-3's behind "
                  "the whole step" + (" (none here: the processes share the cores)" if c.config.share_node else "")
                  + "; TP and pipeline transfers are on the critical path")
    if report.instance:
        i = report.instance
        console.print(f"priced as {i.name} ({i.provider}, {i.devices} x {i.device}) at ${i.usd_per_hour}/h "
                      f"as published on {i.published} ({i.source}; recalled, not re-read: check before spending)")
    best = r.best
    console.print(f"best: {best.plan.describe()}: {seconds(best.step_s)} per step")
    console.print(f"  {command_line(report.command(best))}")
    if report.config.deadline_h is not None:
        ch = report.cheapest
        if ch is None:
            console.print(f"no plan on {', '.join(map(str, report.considered_devices))} devices meets the "
                          f"{report.config.deadline_h:g} h deadline")
        else:
            console.print(f"cheapest within {report.config.deadline_h:g} h: {ch.plan.describe()} on {ch.plan.devices} "
                          f"devices, {_hours(report.hours(ch))}, {_money(report.dollars(ch))}")
            console.print(f"  {command_line(report.command(ch))}")


def _emit(report, best, kind: str, path: Path) -> None:
    from kiln.io import atomic_write_text
    from kiln.plan.emit import Emit, script

    header = (f"kiln plan {report.config.spec} on {report.cluster.name}: {best.plan.describe()}, "
              f"predicted {best.step_s:.4g} s per step")
    text = script(Emit(kind), report.command(best), best.plan, report.cluster.config.devices_per_node, header,
                  report.hours(best), gpus=report.hardware.kind == "gpu")
    atomic_write_text(path, text)
    path.chmod(0o755)
    console.print(f"launch script ({kind}): {path}")


def _json(report) -> dict:
    w, c = report.workload, report.cluster
    best = report.ranking.best
    return {
        "model": report.config.spec, "workload": {"params": w.params, "forward_flops_per_sample": w.flops_per_sample,
                                                  "seq": w.seq, "layers": len(w.layers), "source": w.source},
        "cluster": c.name, "device": c.config.device, "devices": report.config.devices,
        "global_batch": report.config.batch, "steps": report.steps,
        "instance": None if report.instance is None else {
            "name": report.instance.name, "usd_per_hour": report.instance.usd_per_hour,
            "published": report.instance.published, "source": report.instance.source},
        "fitting": [report.row(p) for p in report.ranking.fitting],
        "rejected": [report.row(p) for p in report.ranking.rejected],
        "best": report.row(best) | {"command": report.command(best)},
        "cheapest_within_deadline": None if report.cheapest is None else
        report.row(report.cheapest) | {"command": report.command(report.cheapest)},
    }


# -- kiln cluster -------------------------------------------------------------------------------

cluster_app = typer.Typer(help="Cluster profiles for `kiln plan`.", no_args_is_help=False, invoke_without_command=True)


@cluster_app.callback()
@user_errors
def list_clusters(ctx: typer.Context, json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """List cluster profiles (built-in and yours)."""
    if ctx.invoked_subcommand:
        return
    validate(json_path=json_path)
    from kiln.config import to_dict
    from kiln.plan.cluster import available, load_cluster, user_dir

    clusters = [load_cluster(n) for n in available()]
    table = Table(title="cluster profiles")
    for col in ("name", "device", "memory", "per node", "nodes", "intra", "inter", "description"):
        table.add_column(col)
    for cl in clusters:
        k = cl.config
        link = lambda l: "-" if l is None else f"{si(l.bandwidth, 'B/s')}, {seconds(l.latency_s)}"
        table.add_row(k.name, k.device, si(k.device_memory, "B"), str(k.devices_per_node), str(k.max_nodes),
                      link(k.intra), link(k.inter), k.description)
    console.print(table)
    console.print(f"Add your own as TOML in {user_dir()} (`kiln cluster show dgx-a100` for the format).")
    if json_path:
        write_json(json_path, {"clusters": [to_dict(cl.config) | {"path": cl.path} for cl in clusters]})


@cluster_app.command("show")
@user_errors
def show_cluster(name: str = typer.Argument(..., help="Profile name or .toml path.")) -> None:
    """Print a cluster profile as TOML, with the source of each figure."""
    from kiln.config import to_dict, to_toml
    from kiln.plan.cluster import load_cluster

    c = load_cluster(name)
    console.print(f"# {c.path}", markup=False)
    console.print(to_toml(to_dict(c.config)), markup=False)


@cluster_app.command("calibrate")
@user_errors
def calibrate_cluster(
    processes: str = typer.Option("2,4", help="Process counts to measure, comma-separated."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the raw times and fits here."),
) -> None:
    """Measure this machine's gloo collectives (2 and 4 processes under torchrun) and save the `local` profile."""
    from kiln.errors import KilnError

    try:
        counts = tuple(int(p) for p in processes.split(","))
    except ValueError:
        raise KilnError(f"--processes {processes!r}: expected counts like 2,4") from None
    if not counts or min(counts) < 2:
        raise KilnError(f"--processes {processes!r}: each count must be >= 2 (a collective needs two processes)")
    validate(json_path=json_path)
    from kiln.cli.analyze import _hardware
    from kiln.config import to_dict
    from kiln.plan.calibrate import calibrate
    from kiln.plan.cluster import save_cluster

    _hardware("local")   # the device's own peaks, measured once if missing
    with progress("measuring gloo collectives") as update:
        profile, raw = calibrate(counts, progress=update)
    path = save_cluster(profile)
    table = Table(title="gloo collectives on this machine, messages from 2 MiB (t = latency of all the algorithm's steps + bus factor x bytes / bus bandwidth)")
    for col in ("collective", *(f"{n} processes" for n in counts)):
        table.add_column(col)
    for name, cal in profile.collectives.items():
        table.add_row(name, *(f"{seconds(a)} + {si(b, 'B/s')}" for a, b in zip(cal.latency_s, cal.bus_bandwidth)))
    console.print(table)
    if profile.contention:
        console.print("each process computes " + ", ".join(f"{s:.2f}x slower with {n} at once" for n, s in zip(
            profile.contention.processes, profile.contention.slowdown)) + " than alone (contention for the cores)")
    console.print(f"saved: {path}")
    if json_path:
        write_json(json_path, {"profile": to_dict(profile), "times_s": {str(n): v for n, v in raw.items()}})
