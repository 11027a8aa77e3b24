"""The cocotb testbench of an emitted design (run by kiln.hw.verify inside Icarus Verilog).

It streams the input frames of the vector file back to back (in_valid held while frames
remain), keeps out_ready high, and records every output frame and the clock edge of every
input and output handshake. Signals are sampled at falling edges (between the rising edges
where the design samples them) and driven just after rising edges.

Edge k is the k-th falling edge after reset is released, read from the simulation time (a
10 ns clock), so the testbench wakes only where something happens: a handshake signal
(in_ready, out_valid) changes or a handshake completes. A frame takes hundreds of cycles, so
Python runs a few times per frame instead of twice per cycle; the edges recorded are the
same as sampling every cycle: a handshake signal is examined at every falling edge where it
is high (it can rise only at a rising edge, and the testbench waits for that change).
"""
import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import Event, FallingEdge, First, RisingEdge, Timer
from cocotb.utils import get_sim_time

PERIOD_NS = 10


@cocotb.test()
async def stream(dut):
    with open(os.environ["KILN_HW_VECTORS"]) as f:
        frames = [int(line, 16) for line in f if line.strip()]
    limit = int(os.environ["KILN_HW_MAX_CYCLES"])
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.rst.value = 1
    dut.in_valid.value = 0
    dut.out_ready.value = 1
    dut.in_data.value = frames[0]
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    dut.in_valid.value = 1
    await FallingEdge(dut.clk)
    t0 = get_sim_time("ns")                  # edge 0

    def edge() -> int:
        return int(round((get_sim_time("ns") - t0) / PERIOD_NS))

    outputs, in_edges, out_edges = [], [], []
    done = Event()

    async def feed():
        sent, first = 0, True
        while sent < len(frames):
            if not first:
                await FallingEdge(dut.clk)
            first = False
            if int(dut.in_ready.value) != 1:
                await RisingEdge(dut.in_ready)
                await FallingEdge(dut.clk)
            e = edge()
            await RisingEdge(dut.clk)        # the handshake
            in_edges.append(e)
            sent += 1
            if sent < len(frames):
                dut.in_data.value = frames[sent]
            else:
                dut.in_valid.value = 0

    async def collect():
        first = True
        while len(outputs) < len(frames):
            if not first:
                await FallingEdge(dut.clk)
            first = False
            if int(dut.out_valid.value) != 1:
                await RisingEdge(dut.out_valid)
                await FallingEdge(dut.clk)
            outputs.append(format(int(dut.out_data.value), "x"))
            out_edges.append(edge())
        done.set()

    cocotb.start_soon(feed())
    cocotb.start_soon(collect())
    await First(done.wait(), Timer(limit * PERIOD_NS, unit="ns"))
    with open(os.environ["KILN_HW_RESULTS"], "w") as f:
        json.dump({"outputs": outputs, "in_edges": in_edges, "out_edges": out_edges, "edges": edge() + 1}, f)
