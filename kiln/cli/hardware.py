"""`kiln hardware`: list, show and calibrate hardware profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, err_console, si, user_errors
from kiln.io import atomic_write_json

app = typer.Typer(help="Hardware profiles for rooflines.", no_args_is_help=False, invoke_without_command=True)


def _as_dict(p) -> dict:
    return {"name": p.name, "description": p.description, "kind": p.kind, "peak_flops": p.peak_flops,
            "memory_bandwidth": p.memory_bandwidth, "fallback": p.fallback, "sources": p.sources,
            "ridge_flop_per_byte": p.ridge(), "path": p.path}


@app.callback()
@user_errors
def list_profiles(
    ctx: typer.Context,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the profiles as JSON here."),
) -> None:
    """List hardware profiles (built-in and yours)."""
    if ctx.invoked_subcommand:
        return
    from kiln.hardware.profiles import available, load_profile, user_dir

    profiles = [load_profile(name) for name in available()]
    table = Table(title="hardware profiles")
    for col in ("name", "kind", "fp32", "bf16", "int8", "bandwidth", "ridge (FLOP/B)", "description"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.kind, *(si(p.peak_flops.get(k), "FLOP/s") if k in p.peak_flops else "-"
                                         for k in ("fp32", "bf16", "int8")),
                      si(p.memory_bandwidth, "B/s"), f"{p.ridge():.1f}", p.description)
    console.print(table)
    console.print(f"Add your own as TOML in {user_dir()} (see `kiln hardware show a100` for the format).")
    if json_path:
        atomic_write_json(json_path, {"profiles": [_as_dict(p) for p in profiles]})


@app.command()
@user_errors
def show(name: str = typer.Argument(..., help="Profile name or .toml path.")) -> None:
    """Print a profile as TOML, with the source of each figure."""
    from kiln.hardware.profiles import load_profile

    console.print(load_profile(name).to_toml(), markup=False, highlight=False)


@app.command()
@user_errors
def calibrate(
    name: str = typer.Option("local", help="Name to save the profile under."),
    size: int = typer.Option(2048, min=64, help="Matrix size of the matmul benchmark."),
    copy_mib: int = typer.Option(512, min=8, help="MiB copied for the bandwidth benchmark."),
    repeats: int = typer.Option(5, min=1),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the profile as JSON here."),
) -> None:
    """Measure this machine's peak matmul FLOP/s and memory bandwidth and save a profile."""
    from kiln.hardware.calibrate import calibrate as measure
    from kiln.hardware.profiles import save_profile

    with err_console.status("calibrating") as status:
        profile = measure(name, size, copy_mib, repeats, progress=lambda s: status.update(f"calibrating: {s}"))
    path = save_profile(profile)
    for key, value in profile.peak_flops.items():
        console.print(f"{key:>5} matmul peak: {si(value, 'FLOP/s')}")
    console.print(f"memory bandwidth: {si(profile.memory_bandwidth, 'B/s')}   ridge: {profile.ridge():.1f} FLOP/B")
    console.print(f"saved {path}")
    if json_path:
        atomic_write_json(json_path, _as_dict(profile))
