"""The FPGA estimator against yosys (the rows benchmarks/hw_calibrate.py recorded from yosys
0.70 on kiln hw emit's layers), and the hardware objectives of `kiln search` against the models
they come from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.hw.estimate import COEFFICIENTS, Target, dsp_count, estimate_features

ROOT = Path(__file__).resolve().parents[1]


def _grid_rows() -> list[dict]:
    """benchmarks/hw_grid.py's whole designs, one row per module (also fitted on)."""
    path = ROOT / "benchmarks/results/hw_grid.json"
    rows = []
    for key, row in (json.loads(path.read_text())["grid"]["rows"] if path.exists() else {}).items():
        design, target = key.rsplit(" ", 1)
        rows += [{"design": design, "layer": lay["layer"], "target": target, "features": lay["features"], **lay["yosys"]}
                 for lay in row["layers"] if "key" in lay]
    return rows


ALL_ROWS = json.loads((ROOT / "benchmarks/results/hw_calibration.json").read_text())["rows"] + _grid_rows()
ROWS = [r for r in ALL_ROWS if not r.get("validation")]      # what the coefficients were fitted on
SMALL = f"py:{ROOT / 'benchmarks/hw_small_mlp.py'}:small_mlp"


def _id(row: dict) -> str:
    return f"{row['target']}-{row['design']}-{row['layer']}"


# known misses (benchmarks/hw_cost_models.py prints them): the last layer (16-bit output codes) at
# reuse K (G = 1) with PO not a power of two synthesizes to more DSPs than the multipliers need
# (xilinx head: 36 DSPs against 20; the jet MLP's last layer: 16 against 10 on xilinx, 23 against
# 20 on ice40): the index arithmetic (og*PO + o) that is no shift there (benchmarks/notes/hw-rtl.md).
# Its LUTs are priced by the lanes_npo2 term.
KNOWN_OFF = {"xilinx-w8a8-layers.0=64-head=32-head", "xilinx-jet int8 R=K-7", "ice40-jet int8 R=K-7",
             "xilinx-jet int8 R=K/4-7"}
# LUT misses: none in the fit's rows since the multiplexers are priced in LUTs; the jet MLP at
# reuse K/4 was synthesized after the fit (its design +0.4%, this module +20%)
LUT_OFF = {"xilinx-jet int8 R=K/4-5"}


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                 if _id(r) in KNOWN_OFF else r for r in ALL_ROWS], ids=_id)
def test_dsps_are_exactly_yosys_and_block_rams_within_one_in_ten(row):
    luts, ffs, dsps, brams = estimate_features(row["features"], Target(row["target"]))
    assert dsps == row["dsps"]
    assert abs(brams - row["brams"]) <= 0.1 * row["brams"]     # yosys mixes RAMB18 aspect ratios


CASES = [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss")) if _id(r) in LUT_OFF else r
         for r in ROWS]


@pytest.mark.parametrize("row", CASES, ids=_id)
def test_luts_are_within_15_percent_of_yosys_on_the_calibration_rows(row):
    luts = estimate_features(row["features"], Target(row["target"]))[0]
    assert abs(luts - row["luts"]) <= 0.15 * row["luts"]


def test_dsp_mapping_follows_yosys_mul2dsp_widths():
    # synth_xilinx: DSP_A_MINWIDTH=2, DSP_B_MINWIDTH=2, DSP_Y_MINWIDTH=9, 25 x 18 per DSP48E1
    assert dsp_count(8, 8, Target.XILINX) == 1
    assert dsp_count(4, 4, Target.XILINX) == 0          # an 8-bit product: LUTs
    assert dsp_count(24, 18, Target.XILINX) == 1
    assert dsp_count(1, 16, Target.XILINX) == 0
    # synth_ice40 -dsp: DSP_Y_MINWIDTH=11, 16 x 16 per SB_MAC16
    assert dsp_count(4, 4, Target.ICE40) == 0 and dsp_count(8, 8, Target.ICE40) == 1
    assert dsp_count(21, 18, Target.ICE40) == 3          # 16x16, 16x2, 5x16; 5x2 is LUTs


@pytest.fixture(scope="module")
def quantized_small(tmp_path_factory):
    from kiln.quant.config import parse_config
    from kiln.quant.run import quantize_run

    out = tmp_path_factory.mktemp("q") / "q4"
    cfg = parse_config({"targets": ["Linear"], "weight": {"format": "int", "bits": 4, "granularity": "channel"},
                        "input": {"format": "int", "bits": 4, "granularity": "tensor", "calib": "minmax"}})
    quantize_run(SMALL, cfg, out, dataset="digits", calib_batches=1, evaluate=False)
    return out


@pytest.mark.skipif(not COEFFICIENTS["xilinx"]["luts"], reason="estimator not calibrated yet")
def test_estimating_a_quantized_run_prices_the_design_emit_writes(quantized_small, tmp_path):
    from kiln.hw.design import EmitConfig, emit, load_design
    from kiln.hw.estimate import estimate_layers, estimate_model
    from kiln.runs.artifact import load_source

    design = emit(str(quantized_small), tmp_path / "d", EmitConfig(reuse=0, check_samples=0))
    from_design = estimate_layers(load_design(tmp_path / "d")[1], Target.ICE40)
    source = load_source(str(quantized_small))
    from_model = estimate_model(source.model, source.example_inputs[0], Target.ICE40, reuse=0)
    assert from_design == from_model
    assert from_model.latency == design["cycles"]["latency"]     # the emitter's own prediction


def test_systolic_objectives_are_the_models_per_layer_sums():
    from kiln.graph.capture import capture
    from kiln.hw.gemms import graph_gemms
    from kiln.hw.systolic import ArrayConfig, Dataflow, layer_cost
    from kiln.models.spec import load
    from kiln.search.objectives import HwConfig, systolic_scores

    gemms = graph_gemms(capture(load(SMALL)))
    bits = {"layers.0": 4, "head": 8}
    got = systolic_scores(gemms, bits, {"systolic_cycles", "systolic_energy_uj"}, HwConfig(array="8x8", dataflow="os"))
    costs = [layer_cost(g, ArrayConfig(8, 8, Dataflow.OS, word_bits=bits[g.name])) for g in gemms]
    assert got["systolic_cycles"] == sum(c.cycles for c in costs)
    assert got["systolic_energy_uj"] == pytest.approx(sum(c.energy_pj for c in costs) * 1e-6)
    # narrower operands: the same cycles, less energy
    wide = systolic_scores(gemms, {"layers.0": 8, "head": 8}, {"systolic_energy_uj"}, HwConfig(array="8x8", dataflow="os"))
    assert wide["systolic_energy_uj"] > got["systolic_energy_uj"]


def test_gather_multiplexers_are_counted_from_the_emitted_structure():
    from kiln.hw.estimate import gather_inputs

    # a Linear: lane j picks input kc*PI + j, KC choices per lane
    assert gather_inputs(784, 1, 1, 1, pi=4, conv=False) == 4 * (196 - 1)
    assert gather_inputs(64, 1, 1, 1, pi=64, conv=False) == 0          # R = 1: wires, no multiplexer
    # a 3x3 conv on 2x5x5 (K = 18) with PI = 9: lane j sees kernel offsets j and 9 + j, one
    # channel each, so each lane chooses among both channels' 25 entries
    assert gather_inputs(2, 5, 5, 3, pi=9, conv=True) == 9 * (2 * 25 - 1)
    # PI = 18: every lane stays in one channel
    assert gather_inputs(2, 5, 5, 3, pi=18, conv=True) == 18 * (25 - 1)
    # brute force over the emitter's own lane -> kernel offset map (kiln.hw.rtl._gather)
    import numpy as np
    c, k, pi = 3, 3, 3
    ks = np.arange(c * k * k).reshape(-1, pi)
    want = sum(len(set((ks[:, j] // (k * k)).tolist())) * 16 - 1 for j in range(pi))
    assert gather_inputs(c, 4, 4, k, pi=pi, conv=True) == want


def test_pool_layers_are_priced_by_their_comparators_and_frame():
    from kiln.hw.estimate import pool_features

    small = pool_features({"kind": "maxpool", "in_shape": [4, 8, 8], "out_shape": [4, 4, 4], "kernel": 2,
                           "in_bits": 8, "out_bits": 8})
    big = dict(small, no=small["no"] * 4, ni=small["ni"] * 4)
    for target in (Target.XILINX, Target.ICE40):
        luts, ffs, dsps, brams = estimate_features(small, target)
        assert luts > 0 and ffs >= small["no"] * small["ob"] * 0.5 and dsps == 0 and brams == 0
        assert estimate_features(big, target)[0] > 3 * luts      # linear in the output codes
