"""`kiln hardware`: list, show and calibrate hardware profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, progress, si, user_errors, validate, write_json

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
    validate(json_path=json_path)
    from kiln.hardware.profiles import available, load_profile, peak_unit, user_dir

    profiles = [load_profile(name) for name in available()]
    table = Table(title="hardware profiles")
    for col in ("name", "kind", "fp32", "bf16", "int8", "bandwidth", "ridge (FLOP/B)", "description"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.kind, *(si(p.peak_flops.get(k), peak_unit(k)) if k in p.peak_flops else "-"
                                         for k in ("fp32", "bf16", "int8")),
                      si(p.memory_bandwidth, "B/s"), f"{p.ridge():.1f}", p.description)
    console.print(table)
    console.print(f"Add your own as TOML in {user_dir()} (see `kiln hardware show a100` for the format).")
    if json_path:
        write_json(json_path, {"profiles": [_as_dict(p) for p in profiles]})


@app.command()
@user_errors
def show(name: str = typer.Argument(..., help="Profile name or .toml path.")) -> None:
    """Print a profile as TOML, with the source of each figure."""
    from kiln.config import to_toml
    from kiln.hardware.profiles import load_profile, profile_table

    console.print(to_toml(profile_table(load_profile(name))), markup=False, highlight=False)


@app.command()
@user_errors
def calibrate(
    name: str = typer.Option("local", help="Name to save the profile under."),
    size: int = typer.Option(2048, min=64, help="Matrix size of the matmul benchmark."),
    copy_mib: int = typer.Option(512, min=8, help="MiB copied for the bandwidth benchmark."),
    budget: float = typer.Option(5.0, min=0.1, help="Seconds at most per figure; each stops sooner once its best stops improving."),
    force: bool = typer.Option(False, "--force", help="Overwrite a saved profile even where it has higher peaks."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the profile as JSON here."),
) -> None:
    """Measure this machine's peak matmul FLOP/s (OP/s for int8) and memory bandwidth and save a
    profile; a peak is the fastest call, measured until it stops improving."""
    from kiln.hardware.calibrate import calibrate as measure
    from kiln.hardware.profiles import higher_in, load_profile, peak_unit, save_profile, user_dir
    validate(json_path=json_path)
    with progress("calibrating") as update:
        cal = measure(name, size, copy_mib, budget, progress=update)
    profile = cal.profile

    def unit(key: str) -> str:
        return "B/s" if key == "memory_bandwidth" else peak_unit(key)

    for key, peak in cal.peaks.items():
        label = "memory bandwidth" if key == "memory_bandwidth" else f"{key:>5} matmul peak"
        console.print(f"{label}: {si(peak.value, unit(key))} (median call {si(peak.typical, unit(key))}; {peak.describe()})")
    console.print(f"ridge: {profile.ridge():.1f} FLOP/B")
    for line in cal.warnings():
        console.print(f"[yellow]busy machine? {line}[/yellow]")
    saved = user_dir() / f"{name}.toml"
    higher = higher_in(load_profile(str(saved)), profile) if saved.is_file() and not force else {}
    if higher:
        # not an error: the machine keeps its better measurement (and `make demo` goes on)
        worse = ", ".join(f"{k} {si(old, unit(k))} > {si(new, unit(k))}" for k, (old, new) in higher.items())
        console.print(f"[yellow]kept {saved}: it has higher peaks than this run ({worse}); a peak is a maximum, "
                      f"so this run was likely the busier one; --force overwrites it[/yellow]")
    else:
        console.print(f"saved {save_profile(profile)}")
    if json_path:
        peaks = {k: {"best": pk.value, "median_call": pk.typical, "spread": pk.spread, "calls": pk.timing.n,
                     "settled": pk.settled} for k, pk in cal.peaks.items()}
        write_json(json_path, _as_dict(profile) | {"peaks": peaks, "warnings": cal.warnings(), "saved": not higher})
