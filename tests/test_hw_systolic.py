"""The systolic-array model against its oracles: SCALE-Sim's compute model (published anchors,
and the scalesim package itself where installed), torch.utils.flop_counter for the GEMMs a
captured model holds, and Icarus simulations of the arrays kiln emits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.hw.gemms import graph_gemms
from kiln.hw.systolic import (ArrayConfig, Dataflow, Energy, Gemm, compute_cycles, layer_cost, model_cost,
                              parse_array, parse_dataflow, sram_traffic)
from kiln.models.spec import load

# SCALE-Sim 3.0's compute model on M, N, K = 64, 32, 16 and an 8 x 8 array (shared ENGINES.md,
# measured by calling systolic_compute_{ws,is,os} directly): cycles and its SRAM request counts
ANCHORS = {Dataflow.WS: (688, (4096, 512, 4096)), Dataflow.IS: (864, (1024, 4096, 4096)),
           Dataflow.OS: (960, (4096, 4096, None))}   # OS ofmap writes: SCALE-Sim adds R + C per fold


@pytest.mark.parametrize("df", list(Dataflow))
def test_cycles_and_sram_reads_equal_scalesims_published_anchors(df):
    g = Gemm("anchor", 64, 32, 16)
    cycles, reads = ANCHORS[df]
    assert compute_cycles(g, 8, 8, df) == cycles
    ours = sram_traffic(g, 8, 8, df)
    assert [o for o, r in zip(ours, reads) if r is not None] == [r for r in reads if r is not None]


def _scalesim_cycles(df: Dataflow, m: int, n: int, k: int, rows: int, cols: int) -> int:
    cfg_mod = pytest.importorskip("scalesim.scale_config", reason="scalesim not installed (pip install scalesim)")
    mod = pytest.importorskip(f"scalesim.compute.systolic_compute_{df.value}")
    cfg = cfg_mod.scale_config()
    cfg.set_arr_dims(rows, cols)
    cfg.valid_conf_flag = True     # set by read_conf_file, which the CLI calls
    sim = getattr(mod, f"systolic_compute_{df.value}")()
    sim.set_params(config_obj=cfg, ifmap_op_mat=np.arange(m * k).reshape(m, k),
                   filter_op_mat=np.arange(k * n).reshape(k, n) + m * k,
                   ofmap_op_mat=np.arange(m * n).reshape(m, n) + m * k + k * n)
    sim.create_demand_matrices()
    return sim.ifmap_demand_matrix.shape[0]


@pytest.mark.parametrize("df", list(Dataflow))
@pytest.mark.parametrize("m,n,k,rows,cols", [(10, 7, 5, 4, 3), (3, 3, 3, 8, 8), (33, 17, 9, 4, 8)])
def test_cycles_equal_scalesims_compute_model(df, m, n, k, rows, cols):
    assert compute_cycles(Gemm("g", m, n, k), rows, cols, df) == _scalesim_cycles(df, m, n, k, rows, cols)


def test_is_is_ws_on_the_transposed_product():
    # out^T = b^T a^T: input-stationary on (M, N, K) runs what weight-stationary runs on (N, M, K)
    for m, n, k in [(64, 32, 16), (7, 50, 9)]:
        assert compute_cycles(Gemm("g", m, n, k), 8, 4, Dataflow.IS) == compute_cycles(Gemm("g", n, m, k), 8, 4, Dataflow.WS)


def test_a_full_fold_is_utilised_as_its_formula_says():
    # one fold, every PE mapped: utilisation = T / (2R + C + T - 2) (WS), T / (R + C + T - 2) (OS)
    cfg = ArrayConfig(8, 8, Dataflow.WS, bandwidth=1e9)
    assert layer_cost(Gemm("g", 100, 8, 8), cfg).utilisation == pytest.approx(100 / (16 + 8 + 100 - 2))
    cfg = ArrayConfig(8, 8, Dataflow.OS, bandwidth=1e9)
    assert layer_cost(Gemm("g", 8, 8, 100), cfg).utilisation == pytest.approx(100 / (8 + 8 + 100 - 2))


def test_dram_traffic_is_each_operand_once_when_it_fits_and_bandwidth_bounds_cycles():
    g = Gemm("g", 64, 32, 16)
    lc = layer_cost(g, ArrayConfig(8, 8, Dataflow.WS, bandwidth=1e9))
    assert (lc.traffic.dram_reads, lc.traffic.dram_writes) == (64 * 16 + 16 * 32, 64 * 32)
    assert lc.cycles == lc.compute_cycles == 688
    slow = layer_cost(g, ArrayConfig(8, 8, Dataflow.WS, bandwidth=0.5))
    assert slow.cycles == slow.memory_cycles == math.ceil((64 * 16 + 16 * 32 + 64 * 32) / 0.5)
    # a 1 KB input SRAM cannot hold the 1 KB + of ifmap: every SRAM read of it comes from DRAM
    small = layer_cost(g, ArrayConfig(8, 8, Dataflow.WS, ifmap_sram_kb=0.5, bandwidth=1e9))
    assert small.traffic.dram_reads == small.traffic.ifmap_reads + 16 * 32


def test_energy_is_the_sum_of_sourced_per_access_energies():
    e = Energy()
    assert e.mac_pj(8) == pytest.approx(0.2 + 0.1)           # Horowitz: 8-bit multiply, 32-bit add
    assert e.mac_pj(32) == pytest.approx(3.2 + 0.1)          # ~ his 3.1 pJ 32-bit multiply
    assert 8 * e.sram_byte_pj(32) == pytest.approx(20, rel=0.05)   # his 32 KB point, off the 8 KB-1 MB fit
    g = Gemm("g", 64, 32, 16)
    lc = layer_cost(g, ArrayConfig(8, 8, Dataflow.WS, bandwidth=1e9))
    t = lc.traffic
    expect = (g.macs * e.mac_pj(8) + (t.ifmap_reads + t.filter_reads) * e.sram_byte_pj(64)
              + t.ofmap_writes * 4 * e.sram_byte_pj(64) + (t.dram_reads + 4 * t.dram_writes) * e.dram_byte_pj())
    assert lc.energy_pj == pytest.approx(expect)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_a_captured_models_gemms_are_its_flop_counter_flops(name):
    from kiln.analysis.oracle import flop_counter_flops

    loaded = load(f"zoo:{name}")
    gemms = graph_gemms(capture(loaded))
    assert gemms and 2 * sum(g.macs for g in gemms) == flop_counter_flops(loaded)
    cost = model_cost(gemms, ArrayConfig(16, 16, Dataflow.OS))
    assert cost.cycles == sum(compute_cycles(g, 16, 16, Dataflow.OS) for g in gemms) and 0 < cost.utilisation <= 1


def test_bad_arrays_and_dataflows_are_one_line_errors():
    assert parse_array("16x8") == (16, 8)
    for text in ("0x8", "16", "axb", "-4x4"):
        with pytest.raises(KilnError, match="--array"):
            parse_array(text)
    with pytest.raises(KilnError, match="ws, is, os"):
        parse_dataflow("rs")
    with pytest.raises(KilnError, match="rows"):
        ArrayConfig(0, 4)


@pytest.mark.parametrize("df", list(Dataflow))
@pytest.mark.parametrize("m,n,k,rows,cols", [(8, 8, 8, 4, 4), (10, 7, 5, 4, 3)])
def test_emitted_array_is_exact_and_takes_the_models_cycles_in_icarus(tmp_path, df, m, n, k, rows, cols):
    from kiln.hw.systolic_rtl import emit, simulate

    rng = np.random.default_rng(m * 100 + n)
    a, b = rng.integers(-128, 128, (m, k)), rng.integers(-128, 128, (k, n))
    sim = simulate(emit(df, rows, cols, a, b, tmp_path))
    assert np.array_equal(sim.out, a @ b)
    assert sim.cycles == compute_cycles(Gemm("g", m, n, k), rows, cols, df)
