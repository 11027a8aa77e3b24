"""An FPGA resource and latency estimator for kiln hw emit's layers, calibrated against yosys,
so that a search can price a design without synthesizing it.

Structural: it counts what kiln.hw.rtl instantiates and prices each part by its bits. A dense
layer is an input frame buffer (NI codes of IB bits), a gather of PI codes per cycle out of it
(lane j is an n_j:1 multiplexer: KC inputs for a Linear, every frame entry of the channels the
lane visits for a Conv2d, plus its address arithmetic), PO x PI multipliers IB x WB bits and
their adder tree into PO accumulators of AB bits, a weight ROM (G*KC words of PO*PI*WB bits),
PO requantizers (AB x 18-bit multiply, round, clamp; a G:1 choice of multiplier and bias when
G > 1) and an output frame buffer (NO codes of OB bits, one write decoder per entry). A pool
layer is (k*k - 1) comparators (max) or adders (average) of IB bits per output code and its
output frame. Multiplexers and LUT ROMs are counted in the target's LUTs from their structure
(an n:1 mux of one bit: (n-1)/3 LUT6 or n-1 LUT4; a ROM: bits/64 LUT6 or bits/16 LUT4); a PO
that is not a power of two adds a PO:1 choice per output code (the write address has no constant
low bits). Each part's count times a per-target coefficient (the gather's fixed at 1, the rest
fitted by non-negative least squares, relative error) on yosys's counts of
emitted modules (benchmarks/hw_calibrate.py and benchmarks/hw_grid.py write the rows;
estimate_coefficients.json is the fit). DSPs are not fitted: they follow yosys's mapping rules
(a multiplier goes to a DSP when both operands are at least 2 bits and the product reaches the
target's minimum width; wider ones take more), so they come out exact.

Cycles come from the emitter's own structure (kiln.hw.design.predict_cycles): a dense layer is
busy positions x reuse + 3 cycles.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.hw.design import parallelism, predict_cycles, valid_reuse
from kiln.hw.ir import Layer, lower
from kiln.hw.rtl import requant_bits, weight_bits
from kiln.hw.synth import Target

# yosys commands per target, as `kiln hw synth` runs them (kiln.hw.synth.SCRIPTS) on one module
SYNTH = {"xilinx": "synth_xilinx -family xc7", "ice40": "synth_ice40 -dsp"}


def parse_target(text: str) -> Target:
    """xilinx or ice40 (the estimator has no coefficients for `generic`)."""
    if text.lower() not in SYNTH:
        raise KilnError(f"--target {text!r}: expected one of {', '.join(SYNTH)}")
    return Target(text.lower())


def cell_counts(stat: dict, target: str) -> dict:
    """LUTs, flip-flops, DSPs, block RAMs (18 Kb / 4 Kb units) and carry cells from yosys
    `stat -json` (its `design` totals)."""
    cells = stat["design"]["num_cells_by_type"]

    def total(pred) -> int:
        return int(sum(v for k, v in cells.items() if pred(k)))

    if target == "xilinx":
        return {"luts": total(lambda c: c.startswith("LUT")), "ffs": total(lambda c: c.startswith("FD")),
                "dsps": total(lambda c: c.startswith("DSP48")),
                "brams": total(lambda c: c == "RAMB18E1") + 2 * total(lambda c: c == "RAMB36E1"),
                "lutram": total(lambda c: c.startswith(("RAM32", "RAM64", "RAM128", "RAM256"))),
                "carry": total(lambda c: c == "CARRY4")}
    return {"luts": total(lambda c: c == "SB_LUT4"), "ffs": total(lambda c: c.startswith("SB_DFF")),
            "dsps": total(lambda c: c == "SB_MAC16"), "brams": total(lambda c: c.startswith("SB_RAM40")),
            "lutram": 0, "carry": total(lambda c: c == "SB_CARRY")}


def gather_inputs(c: int, h: int, w: int, kernel: int, pi: int, conv: bool) -> int:
    """Multiplexer inputs beyond the first, summed over the PI gather lanes (kiln.hw.rtl._gather):
    a Linear's lane j picks input kc*PI + j (KC choices); a Conv2d's lane j picks any frame
    entry of the channels its kernel offsets kc*PI + j visit (im2col with a moving window)."""
    k = c * kernel * kernel
    kc = k // pi
    if not conv:
        return pi * (kc - 1)
    total = 0
    for j in range(pi):
        channels = {(kk * pi + j) // (kernel * kernel) for kk in range(kc)}
        total += len(channels) * h * w - 1
    return total


def layer_features(rec: dict) -> dict:
    """The structural sizes of one dense layer, from its design.json record."""
    c, h, w = rec["in_shape"]
    n, oh, ow = rec["out_shape"]
    k = c * rec["kernel"] ** 2
    po, pi = rec["po"], rec["pi"]
    conv = rec["kernel"] > 1 or h * w > 1
    return {"k": k, "n": n, "positions": oh * ow, "ni": c * h * w, "no": n * oh * ow, "po": po, "pi": pi,
            "g": n // po, "kc": k // pi, "ib": rec["in_bits"], "wb": rec["weight_bits"], "ab": rec["acc_bits"],
            "ob": rec["out_bits"], "rb": rec["requant_bits"], "reuse": rec["reuse"],
            "conv": int(conv), "shift_only": int(bool(rec.get("shift_only"))),
            "reach": gather_inputs(c, h, w, rec["kernel"], pi, conv)}


def pool_features(rec: dict) -> dict:
    """The structural sizes of one pooling layer, from its design.json record."""
    c, h, w = rec["in_shape"]
    _, oh, ow = rec["out_shape"]
    return {"pool": rec["kind"], "no": c * oh * ow, "window": rec["kernel"] ** 2, "ib": rec["in_bits"],
            "ob": rec["out_bits"], "ni": c * h * w}


def layer_record(lay: Layer) -> dict:
    """What layer_features reads, from an integer layer (design.json's fields)."""
    po, pi = parallelism(lay, lay.reuse)
    return {"in_shape": list(lay.in_shape), "out_shape": list(lay.out_shape), "kernel": lay.kernel[0], "po": po,
            "pi": pi, "in_bits": lay.in_bits, "weight_bits": weight_bits(lay), "acc_bits": lay.acc_bits,
            "out_bits": lay.out_bits, "requant_bits": requant_bits(lay), "reuse": lay.reuse,
            "shift_only": lay.meta.get("shift_only", False)}


def pool_record(lay: Layer) -> dict:
    """What pool_features reads, from an integer pool layer."""
    return {"kind": lay.kind, "in_shape": list(lay.in_shape), "out_shape": list(lay.out_shape),
            "kernel": lay.kernel[0], "in_bits": lay.in_bits, "out_bits": lay.out_bits}


def dsp_count(a_bits: int, b_bits: int, target: Target) -> int:
    """DSP blocks yosys maps one signed a x b multiplier to (techlibs/common/mul2dsp.v with the
    limits synth_xilinx and synth_ice40 -dsp pass): none below 2-bit operands or a product
    narrower than DSP_Y_MINWIDTH (9 on xilinx, 11 on ice40); else one DSP48E1 per 25 x 18
    tile (xilinx; partial A tiles of 18) or one SB_MAC16 per 16 x 16 piece (ice40)."""
    a, b = max(a_bits, b_bits), min(a_bits, b_bits)
    if target is Target.ICE40:
        # split into 16-bit pieces; a piece product below the minimums stays in LUTs (a 21 x 18
        # multiplier: 16x16, 16x2, 5x16 in SB_MAC16s, 5x2 in LUTs: 3)
        pieces = lambda n: [16] * (n // 16) + ([n % 16] if n % 16 else [])   # noqa: E731
        return sum(1 for x in pieces(a) for y in pieces(b) if min(x, y) >= 2 and x + y >= 11)
    if b < 2 or a + b < 9:
        return 0
    if a <= 25 and b <= 18:
        return 1
    return math.ceil(max(a - 25, 0) / 18 + 1) * math.ceil(b / 18)


def lut_multipliers(f: dict, target: Target) -> tuple[int, int]:
    """(data multipliers, requantization multipliers) of a layer that go to LUTs, not DSPs."""
    data = f["po"] * f["pi"] if dsp_count(f["ib"], f["wb"], target) == 0 else 0
    requant = f["po"] if not f["shift_only"] and dsp_count(f["ab"], 18, target) == 0 else 0
    return data, requant


def layer_dsps(f: dict, target: Target) -> int:
    """DSPs of one dense layer: its PO x PI data multipliers, PO requantization multipliers, and
    the weight ROM's address og * KC where KC is not a power of two (a variable times a
    constant; a power of two is a shift, and og is constant 0 when G = 1)."""
    data = f["po"] * f["pi"] * dsp_count(f["ib"], f["wb"], target)
    requant = 0 if f["shift_only"] else f["po"] * dsp_count(f["ab"], 18, target)
    kc = f["kc"]
    address = dsp_count((f["g"] + 1).bit_length() + 1, kc.bit_length(), target) if f["g"] > 1 and kc & (kc - 1) else 0
    return data + requant + address


# Where yosys (memory_libmap) puts a weight ROM, measured on ROMs of kiln's shape (synchronous
# read, $readmemh): synth_ice40 put even a 128 x 80-bit ROM into 5 SB_RAM40_4K (256 x 16 each);
# synth_xilinx left it, and kiln's 256 x 64-bit ones, in LUTs (160 LUT6 for the first: bits / 64) and
# put a 1,024 x 64-bit one in 2 RAMB36E1 and kiln's 25,088 x 64-bit one in 89
# RAMB18E1. xilinx's switch-over lies between; ROM_BRAM_BITS is a guess inside that interval.
ROM_BRAM_BITS = {"xilinx": 32768, "ice40": 0}
# synth_ice40 also left kiln's 64 x 256-bit ROM in LUTs (and put 128- to 256-deep ones in blocks)
ICE40_LUT_ROM_WORDS = 64


def rom_bits(f: dict) -> int:
    return f["g"] * f["kc"] * f["po"] * f["pi"] * f["wb"]


def layer_brams(f: dict, target: Target) -> int:
    """Block RAMs of the weight ROM: RAMB18E1 hold 18 Kb (xilinx); SB_RAM40_4K 256 x 16."""
    bits = rom_bits(f)
    if bits <= ROM_BRAM_BITS[target.value]:
        return 0
    if target is Target.ICE40:
        if f["g"] * f["kc"] <= ICE40_LUT_ROM_WORDS:   # a shallow ROM would fill a quarter of each block
            return 0
        return math.ceil(f["po"] * f["pi"] * f["wb"] / 16) * math.ceil(f["g"] * f["kc"] / 256)
    return math.ceil(bits / 18432)


# LUTs per input of an n:1 multiplexer of one bit: a LUT6 is a 4:1 mux (each one removes 3
# inputs), a LUT4 a 2:1 mux (each removes 1); bits of a ROM one LUT holds (LUT6: 64 x 1, LUT4: 16 x 1)
MUX_LUTS = {"xilinx": 1 / 3, "ice40": 1.0}
LUT_ROM_BITS = {"xilinx": 64, "ice40": 16}


def terms(f: dict, target: Target) -> dict[str, float]:
    """The counts each LUT coefficient multiplies (see the module docstring), in LUTs of the
    target where the structure fixes them (multiplexers, ROMs) and in bits where a fit does."""
    if "pool" in f:
        return pool_terms(f)
    lut_data, lut_req = lut_multipliers(f, target)
    reach = f.get("reach", f["pi"] * (f["kc"] - 1))          # rows recorded before `reach` existed: Linear
    po, t = f["po"], target.value
    return {
        "gather": f["ib"] * reach * MUX_LUTS[t],             # PI lanes, each an n_j:1 mux of IB bits
        "address": f["pi"] * f["conv"],                      # a conv lane's window address and bounds
        "mult": lut_data * f["ib"] * f["wb"],                # multipliers left in LUTs
        "accumulate": po * f["pi"] * f["ab"],                # adder tree and accumulators
        "requant": po * f["rb"] + lut_req * f["ab"] * 18,    # round and clamp; multipliers in LUTs
        # per-output multiplier and bias (18 + 32 bits): a constant table of G entries per lane
        # (none at G = 1), as LUT ROMs indexed by s2_og
        "tables": po * (18 + 32) * (math.ceil(f["g"] / LUT_ROM_BITS[t]) if f["g"] > 1 else 0),
        "outputs": f["no"] * f["ob"],                        # output frame codes (write enables, data)
        # PO not a power of two: the output frame's write address (og*PO + o)*P + pos has no
        # constant low bits, so every entry takes a PO:1 choice among the lanes' codes
        "lanes_npo2": f["no"] * f["ob"] * (po - 1) if po & (po - 1) else 0,
        "rom": 0 if layer_brams(f, target) else rom_bits(f) / LUT_ROM_BITS[t],   # a weight ROM left in LUTs
        "const": 1.0,
    }


def ff_terms(f: dict) -> dict[str, float]:
    """Register bits: the input and output frames, the weight word, the gathered inputs, the
    accumulators; control counters are the constant."""
    if "pool" in f:
        return {"frames": f["no"] * f["ob"], "const": 1.0}
    return {"frames": f["ni"] * f["ib"] + f["no"] * f["ob"], "pipeline": f["po"] * f["pi"] * f["wb"] + f["pi"] * f["ib"],
            "accumulate": f["po"] * f["ab"], "const": 1.0}


def pool_terms(f: dict) -> dict[str, float]:
    """A pool layer's LUT terms: (window - 1) comparators-and-selects (max) or adders (average)
    of IB bits per output code; average pooling adds a constant multiply and rounding per code."""
    return {"compare": f["no"] * (f["window"] - 1) * f["ib"] if f["pool"] == "maxpool" else 0,
            "sum": f["no"] * (f["window"] + 8) * f["ib"] if f["pool"] != "maxpool" else 0, "const": 1.0}


# The terms each target's LUT fit uses (fewer than rows, so a held-out row tests the fit): on
# ice40 ROMs are block RAM; multipliers go to DSPs by dsp_count on both targets.
DENSE_TERMS = ("gather", "address", "mult", "accumulate", "requant", "tables", "outputs", "lanes_npo2", "rom",
               "const")
# terms whose coefficient the structure fixes rather than the fit: a multiplexer's LUTs are its
# inputs times MUX_LUTS (yosys/abc map wide muxes to LUT trees; the fit, left free, traded this
# term against correlated ones on the small MLPs and missed the 784-input layer by 69%)
FIXED_TERMS = {"gather": 1.0}
FIT_TERMS = {"xilinx": DENSE_TERMS, "ice40": DENSE_TERMS}
POOL_TERMS = ("compare", "sum", "const")
# before a fit has seen a pool module: per comparator bit, a compare (carry chain) and a select
POOL_DEFAULT = {"xilinx": {"compare": 1.5, "sum": 1.0}, "ice40": {"compare": 2.0, "sum": 1.0}}
# Least-squares fits (relative error, non-negative) on benchmarks/results/hw_calibration.json:
# yosys 0.70 (SYNTH below) on kiln hw emit's dense layers, one module at a time, written by
# `python benchmarks/hw_cost_models.py --parts estimator --refit` (run it again after changing the
# emitter). {target: {"luts"|"ffs": {term: coefficient}}}
COEFFICIENTS_FILE = "estimate_coefficients.json"
COEFFICIENTS: dict[str, dict[str, dict[str, float]]] = {
    "xilinx": {"luts": {}, "ffs": {}, "pool_luts": {}, "pool_ffs": {}},
    "ice40": {"luts": {}, "ffs": {}, "pool_luts": {}, "pool_ffs": {}},
    **json.loads(resources.files("kiln.hw").joinpath(COEFFICIENTS_FILE).read_text()),
}


@dataclass(frozen=True)
class LayerEstimate:
    name: str
    reuse: int
    multipliers: int
    luts: int
    ffs: int
    dsps: int
    brams: int           # 18 Kb (xilinx) or 4 Kb (ice40) blocks holding the weight ROM
    cycles: int          # busy cycles per frame (kiln.hw.design.predict_cycles)


@dataclass(frozen=True)
class DesignEstimate:
    target: Target
    layers: tuple[LayerEstimate, ...]
    latency: int         # cycles from input handshake to output handshake
    interval: int        # cycles between frames once the pipeline is full

    @property
    def luts(self) -> int:
        return sum(lay.luts for lay in self.layers)

    @property
    def ffs(self) -> int:
        return sum(lay.ffs for lay in self.layers)

    @property
    def dsps(self) -> int:
        return sum(lay.dsps for lay in self.layers)

    @property
    def brams(self) -> int:
        return sum(lay.brams for lay in self.layers)


def _apply(coeffs: dict[str, float], t: dict[str, float]) -> int:
    return int(round(sum(coeffs.get(k, 0.0) * v for k, v in t.items())))


def estimate_features(f: dict, target: Target, coefficients: dict | None = None) -> tuple[int, int, int, int]:
    """(LUTs, FFs, DSPs, block RAMs) of one dense or pool layer from its structural sizes."""
    c = (coefficients or COEFFICIENTS)[target.value]
    if "pool" in f:
        luts = {**POOL_DEFAULT[target.value], **c.get("pool_luts", {})}   # a kind no fit has seen: the default
        ffs = c.get("pool_ffs") or {"frames": 1.0}
        return _apply(luts, pool_terms(f)), _apply(ffs, ff_terms(f)), 0, 0
    return (_apply(c["luts"], terms(f, target)), _apply(c["ffs"], ff_terms(f)), layer_dsps(f, target),
            layer_brams(f, target))


def estimate_layers(layers: list[Layer], target: Target) -> DesignEstimate:
    """Every layer of a lowered design (reuse factors already set), and its cycle counts."""
    cycles = predict_cycles(layers)
    out = []
    for lay in layers:
        if lay.kind != "dense":   # pooling: comparators/adders on the frame, no multiplier
            luts, ffs, _, _ = estimate_features(pool_features(pool_record(lay)), target)
            out.append(LayerEstimate(lay.name, 0, 0, luts, ffs, 0, 0, cycles["per_layer"][lay.name]))
            continue
        f = layer_features(layer_record(lay))
        luts, ffs, dsps, brams = estimate_features(f, target)
        out.append(LayerEstimate(lay.name, lay.reuse, f["po"] * f["pi"], luts, ffs, dsps, brams, cycles["per_layer"][lay.name]))
    return DesignEstimate(target, tuple(out), cycles["latency"], cycles["interval"])


def nearest_reuse(lay: Layer, reuse: int) -> int:
    """`reuse` where the layer takes it, else the largest valid reuse factor below it (0: K)."""
    if reuse == 0:
        return lay.k
    return max((r for r in valid_reuse(lay) if r <= reuse), default=1)


def estimate_model(qmodel: nn.Module, example: torch.Tensor, target: Target, reuse: int = 0) -> DesignEstimate:
    """Resources and cycles of the design kiln hw emit would make of a quantized model."""
    layers = lower(qmodel, example)
    for lay in layers:
        if lay.kind == "dense":
            lay.reuse = nearest_reuse(lay, reuse)
    return estimate_layers(layers, target)


def fit(rows: list[dict], target: str, what: str) -> dict[str, float]:
    """Non-negative coefficients minimising the relative error of `what` (luts, ffs, pool_luts or
    pool_ffs) over calibration rows of one target (dense rows, or pool rows for pool_*)."""
    import numpy as np
    from scipy.optimize import nnls   # calibration only: scipy is not needed to estimate

    tgt = Target(target)
    pool = what.startswith("pool_")
    what = what.removeprefix("pool_")
    rows = [r for r in rows if r["target"] == target and ("pool" in r["features"]) == pool]
    if not rows:
        return {}
    if pool:
        make = pool_terms if what == "luts" else ff_terms
        names = list(POOL_TERMS) if what == "luts" else ["frames", "const"]
    else:
        make = (lambda f: terms(f, tgt)) if what == "luts" else ff_terms
        names = list(FIT_TERMS[target]) if what == "luts" else list(ff_terms(rows[0]["features"]))
    fixed = FIXED_TERMS if not pool and what == "luts" else {}
    names = [n for n in names if n not in fixed]
    a = np.array([[make(r["features"])[n] for n in names] for r in rows], dtype=float)
    y = np.array([r[what] - sum(c * make(r["features"])[n] for n, c in fixed.items()) for r in rows], dtype=float)
    w = 1.0 / np.maximum(np.array([r[what] for r in rows], dtype=float), 1.0)
    coef, _ = nnls(a * w[:, None], y * w)
    return {**{n: float(c) for n, c in zip(names, coef) if c > 0}, **fixed}


def write_coefficients(coefficients: dict) -> Path:
    """Store a refit where COEFFICIENTS is read from (the package's own file)."""
    path = Path(__file__).with_name(COEFFICIENTS_FILE)
    path.write_text(json.dumps(coefficients, indent=1, sort_keys=True) + "\n")
    return path
