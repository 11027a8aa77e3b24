"""A systolic-array cost model: cycles, utilisation, SRAM and DRAM traffic and energy per GEMM.

The compute model is SCALE-Sim's (Samajdar et al., arXiv 1811.02883; v3: arXiv 2504.15377):
a GEMM of M x K times K x N maps onto an R x C array by dataflow as

    dataflow            array rows take   array columns take   streamed through (T)
    weight-stationary   K (Sr)            N (Sc)               M
    input-stationary    K                 M                    N
    output-stationary   M                 N                    K

and runs ceil(Sr / R) * ceil(Sc / C) folds one after another, each fold taking

    WS, IS: 2R + C + T - 2   (R cycles to load the stationary tile, then T inputs skewed
                              over R rows and drained over C columns)
    OS:     R + C + T - 2    (operands skewed in from two edges; each PE holds its sum)

cycles, partially filled folds taking as long as full ones. SCALE-Sim's `systolic_compute_*`
classes, called directly, give exactly these counts (benchmarks/hw_cost_models.py checks a grid).

SRAM traffic (words) is SCALE-Sim's demand-matrix count: the streamed operand is read once per
fold of the other array dimension, the stationary one once, and partial sums are written once
per fold of the reduction dimension (K). DRAM traffic is a first-order bound kiln adds:
an operand whose whole matrix fits its SRAM is fetched once, else every SRAM read of it is a
DRAM read; partial sums that do not fit the output SRAM go out and come back. Memory is
double-buffered, so a layer takes max(compute cycles, DRAM words / bandwidth) cycles.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from kiln.errors import KilnError


class Dataflow(enum.Enum):
    WS = "ws"     # weight-stationary (TPU v1)
    IS = "is"     # input-stationary
    OS = "os"     # output-stationary (ShiDianNao)


@dataclass(frozen=True)
class Energy:
    """Energy per access in pJ (45 nm, 0.9 V): Horowitz, "Computing's energy problem",
    ISSCC 2014, table on slide 33: 8-bit multiply 0.2 pJ, 32-bit multiply 3.1 pJ (so roughly
    quadratic in bits), 8-bit add 0.03 pJ, 32-bit add 0.1 pJ; a 64-bit SRAM read 10 pJ at
    8 KB, 20 pJ at 32 KB, 100 pJ at 1 MB; a 64-bit DRAM access 1.3 to 2.6 nJ (the low end
    here). Eyeriss (Chen et al., ISCA 2016, fig. 5) gives the same ladder in ratios:
    DRAM 200x, global buffer 6x, register file 1x a MAC."""

    mult_8bit_pj: float = 0.2
    add_32bit_pj: float = 0.1
    sram_64bit_8kb_pj: float = 10.0
    sram_64bit_1mb_pj: float = 100.0
    dram_64bit_pj: float = 1300.0

    def mac_pj(self, bits: int) -> float:
        """One multiply (bits x bits, cost ~ bits^2 from the 8- and 32-bit points) and one
        32-bit accumulate."""
        return self.mult_8bit_pj * (bits / 8) ** 2 + self.add_32bit_pj

    def sram_byte_pj(self, size_kb: float) -> float:
        """Per byte of a 64-bit read, on the power law through Horowitz's 8 KB and 1 MB points
        (exponent log(10)/log(128) = 0.475; it gives 19.3 pJ at 32 KB against his 20)."""
        slope = math.log(self.sram_64bit_1mb_pj / self.sram_64bit_8kb_pj) / math.log(1024 / 8)
        return self.sram_64bit_8kb_pj * (max(size_kb, 1.0) / 8) ** slope / 8

    def dram_byte_pj(self) -> float:
        return self.dram_64bit_pj / 8


@dataclass(frozen=True)
class ArrayConfig:
    """An R x C array of MACs with three SRAMs (operands, partial sums) and a DRAM link of
    `bandwidth` words per cycle."""

    rows: int = 16
    cols: int = 16
    dataflow: Dataflow = Dataflow.WS
    ifmap_sram_kb: float = 64.0
    filter_sram_kb: float = 64.0
    ofmap_sram_kb: float = 64.0
    bandwidth: float = 16.0      # DRAM words per cycle
    word_bits: int = 8           # operand width; partial sums are 32-bit words
    clock_mhz: float = 1000.0
    energy: Energy = field(default_factory=Energy)

    def __post_init__(self):
        if not isinstance(self.dataflow, Dataflow):
            raise KilnError(f"dataflow must be one of ws, is, os, got {self.dataflow!r}")
        for name in ("rows", "cols"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise KilnError(f"array {name} must be an integer > 0, got {getattr(self, name)!r}")
        for name in ("ifmap_sram_kb", "filter_sram_kb", "ofmap_sram_kb", "bandwidth", "clock_mhz"):
            if not getattr(self, name) > 0:
                raise KilnError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.word_bits <= 32:
            raise KilnError(f"word_bits must be in 1..32, got {self.word_bits}")


@dataclass(frozen=True)
class Gemm:
    """One matrix product of a model: (M x K) @ (K x N), repeated `count` times (batched
    matmuls, convolution groups, attention heads)."""

    name: str
    m: int
    n: int
    k: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class Traffic:
    """Words moved by one layer: SRAM reads of each operand and partial-sum writes (SCALE-Sim's
    counts), and DRAM words in and out."""

    ifmap_reads: int
    filter_reads: int
    ofmap_writes: int
    dram_reads: int
    dram_writes: int


@dataclass(frozen=True)
class LayerCost:
    gemm: Gemm
    folds: int
    compute_cycles: int          # SCALE-Sim's compute model
    memory_cycles: int           # DRAM words / bandwidth
    cycles: int                  # max of the two (double-buffered)
    utilisation: float           # MACs / (R * C * cycles)
    mapping_efficiency: float    # mapped PEs / (R * C), averaged over folds
    traffic: Traffic
    energy_pj: float


def mapping(g: Gemm, dataflow: Dataflow) -> tuple[int, int, int]:
    """(Sr, Sc, T): what the array's rows and columns take, and what streams through."""
    return {Dataflow.WS: (g.k, g.n, g.m), Dataflow.IS: (g.k, g.m, g.n), Dataflow.OS: (g.m, g.n, g.k)}[dataflow]


def fold_cycles(rows: int, cols: int, t: int, dataflow: Dataflow) -> int:
    """Cycles of one fold (SCALE-Sim's compute model; see the module docstring)."""
    return (rows + cols + t - 2) + (0 if dataflow is Dataflow.OS else rows)


def compute_cycles(g: Gemm, rows: int, cols: int, dataflow: Dataflow) -> int:
    """Cycles of one GEMM (times its count) on an R x C array, without memory stalls."""
    sr, sc, t = mapping(g, dataflow)
    return math.ceil(sr / rows) * math.ceil(sc / cols) * fold_cycles(rows, cols, t, dataflow) * g.count


def sram_traffic(g: Gemm, rows: int, cols: int, dataflow: Dataflow) -> tuple[int, int, int]:
    """(ifmap reads, filter reads, ofmap writes) in words, as SCALE-Sim's demand matrices count
    them; ifmap is the M x K operand, filter the K x N one."""
    m, n, k = g.m, g.n, g.k
    if dataflow is Dataflow.WS:
        out = (m * k * math.ceil(n / cols), k * n, m * n * math.ceil(k / rows))
    elif dataflow is Dataflow.IS:
        out = (m * k, k * n * math.ceil(m / cols), m * n * math.ceil(k / rows))
    else:
        out = (m * k * math.ceil(n / cols), k * n * math.ceil(m / rows), m * n)
    return tuple(v * g.count for v in out)


def _words(kb: float, bits: int) -> int:
    return int(kb * 1024 * 8 // bits)


def layer_cost(g: Gemm, cfg: ArrayConfig) -> LayerCost:
    """Cycles, utilisation, traffic and energy of one GEMM on one array."""
    r, c, df = cfg.rows, cfg.cols, cfg.dataflow
    sr, sc, _ = mapping(g, df)
    folds = math.ceil(sr / r) * math.ceil(sc / c)
    compute = compute_cycles(g, r, c, df)
    ifr, fir, ofw = sram_traffic(g, r, c, df)
    a_words, b_words, o_words = g.m * g.k * g.count, g.k * g.n * g.count, g.m * g.n * g.count
    # an operand that fits its SRAM comes from DRAM once; else every SRAM read goes to DRAM
    dram_in = (a_words if a_words <= _words(cfg.ifmap_sram_kb, cfg.word_bits) else ifr) \
        + (b_words if b_words <= _words(cfg.filter_sram_kb, cfg.word_bits) else fir)
    psums_fit = o_words <= _words(cfg.ofmap_sram_kb, 32)
    spill = 0 if psums_fit else ofw - o_words      # partial sums written out and read back
    dram_reads, dram_writes = dram_in + spill, o_words + spill
    memory = math.ceil((dram_reads + dram_writes) / cfg.bandwidth)
    cycles = max(compute, memory)
    e = cfg.energy
    word_b = cfg.word_bits / 8
    energy = (g.macs * e.mac_pj(cfg.word_bits)
              + ifr * word_b * e.sram_byte_pj(cfg.ifmap_sram_kb)
              + fir * word_b * e.sram_byte_pj(cfg.filter_sram_kb)
              + ofw * 4 * e.sram_byte_pj(cfg.ofmap_sram_kb)
              + (dram_in * word_b + (dram_writes + spill) * 4) * e.dram_byte_pj())
    return LayerCost(g, folds * g.count, compute, memory, cycles, g.macs / (r * c * cycles),
                     sr * sc / (folds * r * c), Traffic(ifr, fir, ofw, dram_reads, dram_writes), energy)


@dataclass(frozen=True)
class ModelCost:
    array: ArrayConfig
    layers: tuple[LayerCost, ...]

    @property
    def cycles(self) -> int:
        return sum(lc.cycles for lc in self.layers)

    @property
    def macs(self) -> int:
        return sum(lc.gemm.macs for lc in self.layers)

    @property
    def utilisation(self) -> float:
        return self.macs / (self.array.rows * self.array.cols * self.cycles) if self.cycles else 0.0

    @property
    def energy_pj(self) -> float:
        return sum(lc.energy_pj for lc in self.layers)

    @property
    def latency_s(self) -> float:
        return self.cycles / (self.array.clock_mhz * 1e6)

    def to_json(self) -> dict:
        a = self.array
        return {
            "array": {"rows": a.rows, "cols": a.cols, "dataflow": a.dataflow.value, "ifmap_sram_kb": a.ifmap_sram_kb,
                      "filter_sram_kb": a.filter_sram_kb, "ofmap_sram_kb": a.ofmap_sram_kb,
                      "bandwidth_words_per_cycle": a.bandwidth, "word_bits": a.word_bits, "clock_mhz": a.clock_mhz},
            "cycles": self.cycles, "macs": self.macs, "utilisation": self.utilisation,
            "energy_pj": self.energy_pj, "latency_s": self.latency_s,
            "layers": [{"name": lc.gemm.name, "m": lc.gemm.m, "n": lc.gemm.n, "k": lc.gemm.k, "count": lc.gemm.count,
                        "folds": lc.folds, "compute_cycles": lc.compute_cycles, "memory_cycles": lc.memory_cycles,
                        "cycles": lc.cycles, "utilisation": lc.utilisation,
                        "mapping_efficiency": lc.mapping_efficiency, "energy_pj": lc.energy_pj,
                        **{f: getattr(lc.traffic, f) for f in Traffic.__dataclass_fields__}}
                       for lc in self.layers],
        }


def model_cost(gemms: list[Gemm], cfg: ArrayConfig) -> ModelCost:
    """Every GEMM of a model on one array, run one after another."""
    return ModelCost(cfg, tuple(layer_cost(g, cfg) for g in gemms))


def parse_array(text: str) -> tuple[int, int]:
    """'16x16' -> (16, 16); anything else, or a size <= 0, is a KilnError."""
    parts = text.lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise KilnError(f"--array {text!r}: expected ROWSxCOLS, e.g. 16x16") from None
    if rows <= 0 or cols <= 0:
        raise KilnError(f"--array {text!r}: rows and columns must be > 0")
    return rows, cols


def parse_dataflow(text: str) -> Dataflow:
    try:
        return Dataflow(text.lower())
    except ValueError:
        raise KilnError(f"--dataflow {text!r}: expected one of {', '.join(d.value for d in Dataflow)}") from None
