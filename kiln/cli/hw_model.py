"""`kiln hw systolic` and `kiln hw estimate`: accelerator cost models without synthesis.

`register(app)` adds both commands to a Typer group (the `kiln hw` group of kiln/cli/hw.py);
`app` is a group holding just these two, for use on its own.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kiln.cli.common import console, progress, si, user_errors, validate, write_json

SPEC_HELP = "zoo:NAME, hf:PATH, hf-config:TYPE[?k=v&...], py:FILE.py:FACTORY or a run directory"


@user_errors
def systolic(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    array: str = typer.Option("16x16", "--array", help="ROWSxCOLS of multiply-accumulate units."),
    dataflow: str = typer.Option("ws", "--dataflow", help="ws (weight-), is (input-) or os (output-stationary)."),
    ifmap_kb: float = typer.Option(64.0, "--ifmap-kb", help="Input SRAM, KB."),
    filter_kb: float = typer.Option(64.0, "--filter-kb", help="Weight SRAM, KB."),
    ofmap_kb: float = typer.Option(64.0, "--ofmap-kb", help="Output (partial-sum) SRAM, KB."),
    bandwidth: float = typer.Option(16.0, "--bandwidth", help="DRAM words per cycle."),
    bits: int = typer.Option(8, "--bits", help="Operand width (weights and activations), bits."),
    clock_mhz: float = typer.Option(1000.0, "--clock-mhz", help="Clock, for the latency in seconds."),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="DIMS or NAME=DIMS; repeatable."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every layer's figures as JSON here (- for stdout)."),
) -> None:
    """Cycles, utilisation, SRAM/DRAM traffic and energy of every matrix product of a model on a
    systolic array (SCALE-Sim's compute model; kiln.hw.systolic says how)."""
    from kiln.hw.systolic import ArrayConfig, parse_array, parse_dataflow

    validate(positive={"--ifmap-kb": ifmap_kb, "--filter-kb": filter_kb, "--ofmap-kb": ofmap_kb,
                       "--bandwidth": bandwidth, "--bits": bits, "--clock-mhz": clock_mhz}, json_path=json_path)
    rows, cols = parse_array(array)
    cfg = ArrayConfig(rows, cols, parse_dataflow(dataflow), ifmap_kb, filter_kb, ofmap_kb, bandwidth, bits, clock_mhz)
    from kiln.hw.gemms import source_gemms
    from kiln.hw.systolic import model_cost
    from kiln.models.inputs import parse_shape

    for item in input_shape or []:
        parse_shape(item.rpartition("=")[2])
    with progress(f"capturing {spec}"):
        gemms = source_gemms(spec, list(input_shape or []))
    cost = model_cost(gemms, cfg)
    _print_systolic(spec, cost)
    if json_path:
        write_json(json_path, {"spec": spec, **cost.to_json()})


def _print_systolic(spec: str, cost) -> None:
    a = cost.array
    table = Table(title=f"{spec} on a {a.rows}x{a.cols} {a.dataflow.value.upper()} array")
    for col in ("layer", "M x N x K", "folds", "cycles", "util", "SRAM reads", "DRAM words", "energy"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for lc in cost.layers:
        g, t = lc.gemm, lc.traffic
        shape = f"{g.m} x {g.n} x {g.k}" + (f" (x{g.count})" if g.count > 1 else "")
        bound = "" if lc.cycles == lc.compute_cycles else " (memory)"
        table.add_row(g.name, shape, f"{lc.folds:,}", f"{lc.cycles:,}{bound}", f"{lc.utilisation:.1%}",
                      si(t.ifmap_reads + t.filter_reads), si(t.dram_reads + t.dram_writes), f"{lc.energy_pj * 1e-6:,.2f} uJ")
    console.print(table)
    console.print(f"total: {cost.cycles:,} cycles ({cost.latency_s * 1e6:.1f} us at {a.clock_mhz:g} MHz), "
                  f"{cost.macs:,} MACs, utilisation {cost.utilisation:.1%}, energy {cost.energy_pj * 1e-6:,.2f} uJ")


@user_errors
def estimate(
    src: str = typer.Argument(..., help="A design directory of `kiln hw emit`, or a quantized run (`kiln quantize`)."),
    target: str = typer.Option("xilinx", "--target", help="xilinx (7-series) or ice40."),
    reuse: int = typer.Option(0, "--reuse", help="For a quantized run: every dense layer's reuse factor "
                              "(0: K; a factor a layer does not take becomes its largest valid one below)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the estimate as JSON here (- for stdout)."),
) -> None:
    """LUTs, flip-flops, DSPs and cycles of kiln hw emit's design, estimated without synthesis
    (kiln.hw.estimate: calibrated on yosys)."""
    from kiln.errors import KilnError
    from kiln.hw.estimate import parse_target

    validate(non_negative={"--reuse": reuse}, json_path=json_path)
    tgt = parse_target(target)
    from kiln.hw.design import DESIGN_FILE, load_design
    from kiln.hw.estimate import estimate_layers, estimate_model
    from kiln.runs.artifact import load_source

    if (Path(src) / DESIGN_FILE).is_file():
        if reuse:
            raise KilnError(f"--reuse applies to a quantized run; {src} is an emitted design with its own "
                            f"reuse factors (emit it again with `kiln hw emit --reuse`)")
        est = estimate_layers(load_design(src)[1], tgt)
    else:
        with progress(f"lowering {src}"):
            source = load_source(src)
            if not source.quantized:
                raise KilnError(f"{src} is not quantized: give a `kiln quantize` run or a `kiln hw emit` design")
            est = estimate_model(source.model.eval(), source.example_inputs[0], tgt, reuse)
    table = Table(title=f"{src}: estimated for {tgt.value} (no synthesis)")
    for col in ("layer", "reuse", "multipliers", "LUTs", "FFs", "DSPs", "BRAMs", "cycles"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for lay in est.layers:
        table.add_row(lay.name, str(lay.reuse or "-"), str(lay.multipliers), f"{lay.luts:,}", f"{lay.ffs:,}",
                      str(lay.dsps), str(lay.brams), f"{lay.cycles:,}")
    console.print(table)
    console.print(f"total: {est.luts:,} LUTs, {est.ffs:,} FFs, {est.dsps} DSPs, {est.brams} block RAMs; latency {est.latency:,} cycles, "
                  f"a frame every {est.interval:,}")
    if json_path:
        write_json(json_path, {"source": src, "target": tgt.value, "luts": est.luts, "ffs": est.ffs, "dsps": est.dsps,
                               "brams": est.brams, "latency_cycles": est.latency, "interval_cycles": est.interval,
                               "layers": [asdict(lay) for lay in est.layers]})


def register(app: typer.Typer) -> None:
    """Add `systolic` and `estimate` to a Typer group (the `kiln hw` group)."""
    app.command("systolic")(systolic)
    app.command("estimate")(estimate)


app = typer.Typer(help="Hardware cost models: systolic arrays and FPGA resources.", no_args_is_help=True)
register(app)
