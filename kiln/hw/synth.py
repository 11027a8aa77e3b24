"""`kiln hw synth`: yosys on an emitted design; LUTs, flip-flops, DSPs, block RAMs per layer
and in total (`stat -json`), and for ice40 nextpnr's maximum clock frequency where it fits.

Hierarchy is kept (no flatten), so each layer module is counted on its own; kiln_top only
wires them. Targets: xilinx (`synth_xilinx`, 7-series: LUT6, FD*, DSP48E1, RAMB18/36),
ice40 (`synth_ice40 -dsp`, iCE40 UltraPlus: SB_LUT4, SB_DFF*, SB_MAC16, SB_RAM40_4K; placed and
routed by nextpnr-ice40 on an up5k), generic (`synth -lut 6`: 6-input LUTs and DFFs, no
hard blocks).
"""
from __future__ import annotations

import enum
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.hw.design import load_design
from kiln.hw.tools import nextpnr_ice40, run_yosys, yosys_version


class Target(enum.Enum):
    XILINX = "xilinx"
    ICE40 = "ice40"
    GENERIC = "generic"


@dataclass(frozen=True)
class SynthConfig:
    target: Target = Target.XILINX
    pnr: bool = True             # ice40: place and route with nextpnr for the clock frequency
    device: str = "up5k"         # ice40 device nextpnr places on
    timeout_s: float = 3600.0


SCRIPTS = {
    Target.XILINX: "synth_xilinx -top kiln_top -family xc7",
    Target.ICE40: "synth_ice40 -top kiln_top -dsp -noflatten -json netlist.json",
    Target.GENERIC: "synth -top kiln_top -lut 6",
}


def classify(cell: str) -> str | None:
    """The resource a yosys cell type counts as: lut, ff, dsp, bram, carry, lutram, or None."""
    c = cell.lstrip("\\$")
    if c.startswith("LUT") and c[3:].isdigit() or c in ("SB_LUT4", "lut"):
        return "lut"
    if c.startswith(("FD", "SB_DFF", "_DFF", "_SDFF", "_DFFE", "_SDFFE", "_SDFFCE", "_ALDFF", "_DLATCH")):
        return "ff"
    if c.startswith(("DSP48", "SB_MAC16")):
        return "dsp"
    if c.startswith(("RAMB", "SB_RAM40", "SB_SPRAM")):
        return "bram"
    if c in ("CARRY4", "CARRY8", "SB_CARRY"):
        return "carry"
    if c.startswith(("RAM", "SRL")):
        return "lutram"
    return None


def resources(cells: dict[str, int]) -> dict[str, int]:
    out = {"lut": 0, "ff": 0, "dsp": 0, "bram": 0, "carry": 0, "lutram": 0}
    for cell, n in cells.items():
        kind = classify(cell)
        if kind:
            out[kind] += int(n)
    out["cells"] = int(sum(cells.values()))
    return out


def _read_stat(path: Path) -> dict[str, dict[str, int]]:
    """module name -> its own cells by type (stat -json's per-module counts)."""
    data = json.loads(path.read_text())
    return {name.lstrip("\\"): mod.get("num_cells_by_type", {}) for name, mod in data.get("modules", {}).items()}


def synth(design_dir: str | Path, config: SynthConfig = SynthConfig()) -> dict:
    """Synthesize DIR/rtl with yosys for `config.target`; the resource report."""
    design, _ = load_design(design_dir)
    rtl = Path(design_dir) / "rtl"
    version = yosys_version()
    with tempfile.TemporaryDirectory(prefix="kiln-hw-synth-") as tmp:
        work = Path(tmp)
        for f in rtl.iterdir():
            (work / f.name).write_bytes(f.read_bytes())     # $readmemh paths are relative
        files = " ".join(f"{m}.sv" for m in design["modules"]) + " kiln_top.sv"
        script = (f"read_verilog -sv {files}\n{SCRIPTS[config.target]}\n"
                  "tee -q -o stat.json stat -json\n")
        run_yosys(script, cwd=work, timeout=config.timeout_s)
        per_module = _read_stat(work / "stat.json")
        layers = []
        for rec, mod in zip(design["layers"], design["modules"]):
            cells = next((c for name, c in per_module.items() if name == mod or name.startswith(mod + "_") or
                          name.startswith(f"$paramod\\{mod}")), {})
            layers.append({"layer": rec["name"], "module": mod, "kind": rec["kind"], "reuse": rec.get("reuse"),
                           **resources(cells)})
        total = {k: sum(lay[k] for lay in layers) for k in ("lut", "ff", "dsp", "bram", "carry", "lutram", "cells")}
        top = resources(per_module.get("kiln_top", {}))
        total = {k: total[k] + top[k] for k in total}
        report = {"design": str(design_dir), "target": config.target.value, "yosys": version,
                  "script": SCRIPTS[config.target], "layers": layers, "total": total,
                  "cycles": design["cycles"]}
        if config.target is Target.ICE40 and config.pnr:
            pnr = nextpnr_ice40(work / "netlist.json", device=config.device, cwd=work, timeout=config.timeout_s)
            report["nextpnr"] = {"device": config.device, "fits": pnr["fits"], "fmax_mhz": pnr["fmax_mhz"]}
    return report
