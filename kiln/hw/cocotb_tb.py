"""The cocotb testbench of an emitted design (run by kiln.hw.verify inside Icarus Verilog).

It streams the input frames of the vector file back to back (in_valid held while frames
remain), keeps out_ready high, and records every output frame and the clock edge of every
input and output handshake. Signals are sampled at falling edges (between the rising edges
where the design samples them) and driven just after rising edges.
"""
import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge


@cocotb.test()
async def stream(dut):
    frames = [int(line, 16) for line in open(os.environ["KILN_HW_VECTORS"]) if line.strip()]
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.in_valid.value = 0
    dut.out_ready.value = 1
    dut.in_data.value = frames[0]
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    dut.in_valid.value = 1
    sent, outputs, in_edges, out_edges, edge = 0, [], [], [], 0
    limit = int(os.environ["KILN_HW_MAX_CYCLES"])
    while len(outputs) < len(frames) and edge < limit:
        await FallingEdge(dut.clk)
        took_in = sent < len(frames) and int(dut.in_ready.value) == 1
        if int(dut.out_valid.value) == 1:
            outputs.append(format(int(dut.out_data.value), "x"))
            out_edges.append(edge)
        await RisingEdge(dut.clk)
        if took_in:
            in_edges.append(edge)
            sent += 1
            if sent < len(frames):
                dut.in_data.value = frames[sent]
            else:
                dut.in_valid.value = 0
        edge += 1
    with open(os.environ["KILN_HW_RESULTS"], "w") as f:
        json.dump({"outputs": outputs, "in_edges": in_edges, "out_edges": out_edges, "edges": edge}, f)
