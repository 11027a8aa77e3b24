"""A small systolic array as RTL: kiln emits it for one GEMM and runs it in Icarus Verilog, so
the cost model's cycle counts can be checked against a cycle-accurate simulation.

Weight-stationary and output-stationary arrays are SystemVerilog templates
(kiln/hw/templates/systolic_*.sv); input-stationary is the weight-stationary array with the
operands' roles swapped (out^T = b^T a^T: a^T's tiles stay in the PEs while b^T streams), which
is what input-stationary means. Operands are signed integers of `bits` bits, read by
`$readmemh` from files Python writes; the testbench counts the cycles the array is busy and
writes out every result, which Python compares with numpy's exact integer product.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.hw.systolic import Dataflow
from kiln.hw.tools import run_tool

ACC_BITS = 32

TESTBENCH = """`timescale 1ns/1ps
module tb;
    reg clk = 0, rst = 1, start = 0;
    wire busy, done;
    integer cycles = 0, f, idx;
    kiln_systolic_@DF@ #(.R(@R@), .C(@C@), .M(@M@), .N(@N@), .K(@K@), .W(@W@), .ACC(@ACC@)) dut (
        .clk(clk), .rst(rst), .start(start), .busy(busy), .done(done));
    always #5 clk = ~clk;
    always @(posedge clk) if (busy) cycles <= cycles + 1;
    initial begin
        $readmemh("a.hex", dut.a_mem);
        $readmemh("b.hex", dut.b_mem);
        @(posedge clk); @(posedge clk);
        rst <= 0; start <= 1;
        @(posedge clk);
        start <= 0;
        wait (done);
        #1;
        f = $fopen("out.hex", "w");
        for (idx = 0; idx < @M@ * @N@; idx = idx + 1) $fdisplay(f, "%h", dut.o_mem[idx]);
        $fclose(f);
        $display("cycles %0d", cycles);
        $finish;
    end
    initial begin
        #@TIMEOUT@;
        $display("timeout");
        $finish;
    end
endmodule
"""


@dataclass(frozen=True)
class SimResult:
    cycles: int            # cycles the array was busy, start to the last result written
    out: np.ndarray        # the M x N product it computed (int64)


def _hex(values: np.ndarray, bits: int) -> str:
    digits = (bits + 3) // 4
    return "".join(f"{int(v) & ((1 << bits) - 1):0{digits}x}\n" for v in values.reshape(-1))


def emit(dataflow: Dataflow, rows: int, cols: int, a: np.ndarray, b: np.ndarray, out_dir: Path,
         bits: int = 8) -> Path:
    """Write the array's RTL, a testbench and the operand files for out = a @ b into `out_dir`;
    returns the directory. Input-stationary emits the weight-stationary array on (b^T, a^T)."""
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise KilnError(f"systolic RTL: a is {m}x{k} but b is {k2}x{n}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if a.min(initial=0) < lo or a.max(initial=0) > hi or b.min(initial=0) < lo or b.max(initial=0) > hi:
        raise KilnError(f"systolic RTL: operands must be signed {bits}-bit integers in [{lo}, {hi}]")
    if k * (1 << (2 * bits - 2)) >= (1 << (ACC_BITS - 1)):
        raise KilnError(f"systolic RTL: K={k} products of {bits}-bit operands could overflow {ACC_BITS}-bit sums")
    if dataflow is Dataflow.IS:
        a, b, m, n = b.T, a.T, n, m
    template = "systolic_os.sv" if dataflow is Dataflow.OS else "systolic_ws.sv"
    out_dir.mkdir(parents=True, exist_ok=True)
    rtl = resources.files("kiln.hw").joinpath("templates", template).read_text()
    (out_dir / template).write_text(rtl)
    tb = TESTBENCH
    for key, value in {"DF": "os" if dataflow is Dataflow.OS else "ws", "R": rows, "C": cols, "M": m, "N": n,
                       "K": k, "W": bits, "ACC": ACC_BITS, "TIMEOUT": 10 * (4 + m * n * k + (m + n + k) * 64)}.items():
        tb = tb.replace(f"@{key}@", str(value))
    (out_dir / "tb.sv").write_text(tb)
    (out_dir / "a.hex").write_text(_hex(np.ascontiguousarray(a), bits))
    (out_dir / "b.hex").write_text(_hex(np.ascontiguousarray(b), bits))
    (out_dir / "shape.txt").write_text(f"{dataflow.value} {m} {n} {k}\n")
    return out_dir


def simulate(out_dir: Path) -> SimResult:
    """Compile and run an emitted array in Icarus; its busy cycles and its product."""
    df, m, n, _ = (out_dir / "shape.txt").read_text().split()
    m, n = int(m), int(n)
    sources = [p.name for p in sorted(out_dir.glob("systolic_*.sv"))] + ["tb.sv"]
    stdout = _icarus(out_dir, sources)
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("cycles", "timeout"))]
    if not lines or lines[-1] == "timeout":
        raise KilnError(f"systolic RTL in {out_dir}: the simulation never finished")
    cycles = int(lines[-1].split()[1])
    raw = np.array([int(v, 16) for v in (out_dir / "out.hex").read_text().split()], dtype=np.int64)
    out = np.where(raw >= 1 << (ACC_BITS - 1), raw - (1 << ACC_BITS), raw).reshape(m, n)
    return SimResult(cycles, out.T.copy() if df == Dataflow.IS.value else out)


def _icarus(cwd: Path, sources: list[str]) -> str:
    """iverilog then vvp in `cwd`; the simulation's standard output."""
    run_tool("iverilog", ["-g2012", "-o", "sim.vvp", *sources], cwd=cwd, timeout=300)
    return run_tool("vvp", ["-n", "sim.vvp"], cwd=cwd, timeout=600)
