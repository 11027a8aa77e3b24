"""`kiln hw`: RTL for a quantized network (emit), its simulation against the integer model
(verify) and its synthesis (synth)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kiln.cli.common import console, err_console, user_errors, validate, write_json
from kiln.errors import KilnError

app = typer.Typer(help="Hardware: emit, verify and synthesize RTL for a quantized network.", no_args_is_help=True)


def parse_reuse(values: List[str]) -> tuple[int, tuple[tuple[str, int], ...]]:
    """`--reuse R` (every dense layer) and `--reuse LAYER=R` (one layer) -> (default, overrides)."""
    default, over = 0, []
    for v in values:
        name, _, num = v.rpartition("=")
        try:
            r = int(num)
        except ValueError:
            raise KilnError(f"--reuse takes R or LAYER=R with R a positive integer, got {v!r}") from None
        if r < 1:
            raise KilnError(f"--reuse must be >= 1, got {v!r}")
        if name:
            over.append((name, r))
        else:
            default = r
    return default, tuple(over)


@app.command("emit")
@user_errors
def emit(
    src: str = typer.Argument(..., help="A quantized kiln run directory (from `kiln quantize`)."),
    out: Path = typer.Option(..., "--out", help="Design directory to write (must not exist or be empty)."),
    reuse: List[str] = typer.Option([], "--reuse", help="Reuse factor R for every dense layer, or LAYER=R; "
                                    "default: K (one multiplier per output channel)."),
    check_samples: int = typer.Option(256, "--check-samples", help="Test samples the integer model is compared "
                                      "on with the fake-quantized model (0: none)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write design.json's content here."),
) -> None:
    """Synthesizable SystemVerilog for a quantized network, its weight ROMs and integer model."""
    validate(new_dirs=[out], json_path=json_path, non_negative={"--check-samples": check_samples})
    from kiln.hw.design import EmitConfig, emit as emit_design   # (torch: kept out of the CLI's start-up)

    default, over = parse_reuse(reuse)
    design = emit_design(src, out, EmitConfig(default, over, check_samples))
    table = Table(title=f"emitted {out}")
    for col in ("layer", "kind", "in", "out", "reuse", "mults", "acc bits", "busy cycles"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for rec in design["layers"]:
        table.add_row(rec["name"], rec.get("op", rec["kind"]), "x".join(map(str, rec["in_shape"])),
                      "x".join(map(str, rec["out_shape"])), str(rec.get("reuse", "-")), str(rec.get("multipliers", "-")),
                      str(rec.get("acc_bits", "-")), str(design["cycles"]["per_layer"][rec["name"]]))
    console.print(table)
    cyc, chk = design["cycles"], design["fake_quant_check"]
    console.print(f"predicted: latency {cyc['latency']} cycles, a new frame every {cyc['interval']} cycles")
    if chk:
        console.print(f"integer model vs fake-quantized model on {chk['samples']} test samples: argmax agreement "
                      f"{chk['argmax_agreement']:.2%}, output max difference {chk['output_max_diff_lsb']:.2f} LSB")
    if json_path:
        write_json(json_path, design)


@app.command("verify")
@user_errors
def verify(
    design_dir: Path = typer.Argument(..., help="A design directory from `kiln hw emit`."),
    samples: int = typer.Option(100, "--samples", help="Test samples to run through the RTL."),
    split: str = typer.Option("test", "--split", help="test, val, or heldout (the test split, then val)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Run real test samples through the RTL in Icarus Verilog (cocotb); compare every output bit
    with the integer model and the cycles with the prediction."""
    validate(json_path=json_path, positive={"--samples": samples})
    from kiln.hw.design import load_design
    from kiln.hw.verify import SPLITS, VerifyConfig, verify as run_verify

    if split not in SPLITS:
        raise KilnError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")

    load_design(design_dir)      # a wrong directory is refused before the simulation starts
    err_console.print(f"[dim]simulating {samples} samples in Icarus Verilog...[/dim]")
    rep = run_verify(design_dir, VerifyConfig(samples=samples, split=split))
    lat, ii = rep["latency_cycles"], rep["interval_cycles"]
    console.print(f"bit-exact: {rep['bit_exact']}/{rep['samples']} outputs equal the integer model's")
    console.print(f"accuracy: RTL {rep['accuracy_rtl']:.4f}, integer model {rep['accuracy_integer_model']:.4f}, "
                  f"fake-quantized model {rep.get('accuracy_fake_quant', float('nan')):.4f}")
    console.print(f"latency: {lat['measured']} cycles (predicted {lat['predicted']}); "
                  f"interval {ii['measured']} (predicted {ii['predicted']}); simulator {rep['simulator']}")
    if json_path:
        write_json(json_path, rep)
    if rep["bit_exact"] != rep["samples"]:
        raise KilnError(f"{rep['samples'] - rep['bit_exact']} of {rep['samples']} RTL outputs differ from the integer "
                        f"model (first at sample {rep['first_mismatch']})")


@app.command("synth")
@user_errors
def synth(
    design_dir: Path = typer.Argument(..., help="A design directory from `kiln hw emit`."),
    target: str = typer.Option("xilinx", "--target", help="xilinx, ice40 or generic."),
    pnr: bool = typer.Option(True, "--pnr/--no-pnr", help="ice40: place and route with nextpnr for fmax."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Synthesize with yosys: LUTs, flip-flops, DSPs and block RAMs per layer and in total."""
    validate(json_path=json_path)
    from kiln.hw.synth import SynthConfig, Target, synth as run_synth

    try:
        tgt = Target(target)
    except ValueError:
        raise KilnError(f"--target must be one of {', '.join(t.value for t in Target)}, got {target!r}") from None
    from kiln.hw.design import load_design

    load_design(design_dir)
    err_console.print(f"[dim]yosys {tgt.value} synthesis (WebAssembly: minutes for large designs)...[/dim]")
    rep = run_synth(design_dir, SynthConfig(target=tgt, pnr=pnr))
    table = Table(title=f"{rep['yosys']}, {rep['script']}")
    for col in ("layer", "reuse", "LUT", "FF", "DSP", "BRAM", "carry", "LUTRAM"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in [*rep["layers"], {"layer": "total", **rep["total"]}]:
        table.add_row(row["layer"], str(row.get("reuse") or "-"),
                      *(f"{row[k]:,}" for k in ("lut", "ff", "dsp", "bram", "carry", "lutram")))
    console.print(table)
    if "nextpnr" in rep:
        p = rep["nextpnr"]
        console.print(f"nextpnr-ice40 {p['device']}: " + (f"fmax {p['fmax_mhz']:.1f} MHz" if p["fits"] and p["fmax_mhz"]
                                                          else "fits, no clock path reported" if p["fits"] else "does not fit"))
    if json_path:
        write_json(json_path, rep)
