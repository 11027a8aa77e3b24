"""Non-integer number formats against exact oracles: minifloats by brute force over every bit pattern
(and torch's own casts), MX and BFP blocks recomputed from the spec's formulas, log by exact ratio
comparisons, binary and ternary by exact means; plus a conformance suite every preset runs."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.quant.block import BlockFloat, MXFormat
from kiln.quant.formats import PRESETS, parse_format
from kiln.quant.logbin import Binary, LogFormat, Ternary
from kiln.quant.minifloat import MiniFloat

CLASSES = {"minifloat": MiniFloat, "mx": MXFormat, "bfp": BlockFloat, "log": LogFormat, "binary": Binary,
           "ternary": Ternary}
OURS = sorted(n for n, t in PRESETS.items() if t["format"] in CLASSES)
BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4, "fp16": 16, "bf16": 16,
        "mxint8": 8.25, "mxfp8": 8.25, "mxfp8_e4m3": 8.25, "mxfp8_e5m2": 8.25, "mxfp6": 6.25,
        "mxfp6_e3m2": 6.25, "mxfp6_e2m3": 6.25, "mxfp4": 4.25, "bfp8": 8.5, "bfp6": 6.5, "bfp4": 4.5,
        "log4": 4, "log8": 8, "binary": 1, "binary_scaled": 1, "ternary": 2}


def same(got: torch.Tensor, want) -> None:
    """Bitwise-equal values (NaN where NaN, the sign of zero included)."""
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~got.isnan()
    assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())


# ---- minifloats: an independent decoder and a brute-force nearest-even search over its table ----

def decode(exp, man, bias, special, denormals=True):
    """(value, code) for every finite non-negative bit pattern, in code order (= value order)."""
    table = []
    for code in range(2 ** (exp + man)):
        e, m = code >> man, code & (2 ** man - 1)
        if (special == "ieee" and e == 2 ** exp - 1) or (special == "fn" and code == 2 ** (exp + man) - 1):
            continue
        if e == 0 and m and not denormals:
            continue
        table.append((math.ldexp(m, 1 - bias - man) if e == 0 else math.ldexp(2 ** man + m, e - bias - man), code))
    return table


def spec(fmt: MiniFloat):
    bias = 2 ** (fmt.exp - 1) - 1 if fmt.bias is None else fmt.bias
    table = decode(fmt.exp, fmt.man, bias, fmt.special, fmt.denormals)
    top, code = table[-1]
    # One step past the largest value, with the next code's parity: where overflow starts (inf, NaN or
    # the value "none" formats would have had).
    table.append((top + math.ldexp(1, math.frexp(top)[1] - 1 - fmt.man), code + 1))
    return table


def oracle(fmt: MiniFloat, x: np.ndarray) -> np.ndarray:
    """Nearest value of the table; past the table -> overflow. Ties go to 0 if it is a candidate, else to the
    even code (the even mantissa); with no mantissa bits (man = 0) to the larger value, as rounding the
    significand 1.1b half to even gives 10b. The distances are exact in float64: neighbours lo <= a <= hi
    satisfy hi <= 2 lo (or lo = 0)."""
    table = spec(fmt)
    vals, codes = np.array([v for v, _ in table]), np.array([c for _, c in table])
    a = np.abs(x.astype(np.float64))
    i = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    lo, hi, dlo, dhi = vals[i - 1], vals[i], a - vals[i - 1], vals[i] - a
    up = (dhi < dlo) | ((dhi == dlo) & (lo > 0) & ((fmt.man == 0) | (codes[i] % 2 == 0)))
    r = np.where(a > vals[-1], vals[-1], np.where(up, hi, lo))
    overflow = vals[-2] if fmt.saturate or fmt.special == "none" else (np.inf if fmt.special == "ieee" else np.nan)
    r = np.where(r == vals[-1], overflow, r)
    return np.where(np.isnan(a), np.nan, np.copysign(r, x))


def probes(fmt: MiniFloat, seed=0) -> torch.Tensor:
    """Every value, every midpoint and its float32 neighbours, beyond max, tiny, random; both signs."""
    v = np.array([v for v, _ in spec(fmt)])
    mid = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    assert np.all(mid == (v[:-1] + v[1:]) / 2)        # midpoints are float32 numbers: the ties are real
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal(2000) * 2.0 ** rng.uniform(np.log2(v[1]) - 2, np.log2(v[-2]) + 2, 2000)
    extra = [0.0, v[-2] * 1.5, 1e30, np.inf, np.nan, 1e-45, 1e-40, 2.0 ** -130]
    with np.errstate(over="ignore"):                  # past float32's range is inf, itself a probe
        pos = np.concatenate([v.astype(np.float32), mid, np.nextafter(mid, np.float32(np.inf)),
                              np.nextafter(mid, np.float32(0)), rand.astype(np.float32), np.float32(extra)])
    return torch.from_numpy(np.concatenate([pos, -pos]))


MINIFLOATS = [parse_format(n) for n in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp16",
                                        "bf16")] + [
    MiniFloat(exp=4, man=3, special="fn", denormals=False), MiniFloat(exp=5, man=2, special="ieee", saturate=False),
    MiniFloat(exp=4, man=3, special="fn", saturate=False), MiniFloat(exp=3, man=2, special="none", bias=1),
    MiniFloat(exp=2, man=0, special="none"), MiniFloat(exp=3, man=0, special="fn"),
    MiniFloat(exp=1, man=2, special="none"),
    MiniFloat(exp=5, man=2, special="ieee", denormals=False, saturate=False)]


@pytest.mark.parametrize("fmt", MINIFLOATS, ids=lambda f: f.describe())
def test_minifloat_matches_brute_force(fmt):
    x = probes(fmt)
    same(fmt.quantize(x), oracle(fmt, x.numpy()))
    same(fmt.quantize(x.double()), oracle(fmt, x.numpy()))
    s = torch.tensor(0.37)                                # a scale: round(x / s) * s
    same(fmt.quantize(x, scale=s), torch.from_numpy(oracle(fmt, (x / s).numpy())).float() * s)
    table = [v for v, _ in decode(fmt.exp, fmt.man, 2 ** (fmt.exp - 1) - 1 if fmt.bias is None else fmt.bias,
                                  fmt.special, fmt.denormals)]
    same(fmt.values(), sorted(set(table) | {-v for v in table if v}))
    assert fmt.qmax == table[-1] and fmt.bits == 1 + fmt.exp + fmt.man


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
                                        ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_minifloat_matches_torch_casts(name, dtype):
    fmt = parse_format(name)
    x = probes(fmt)
    x = x[x.abs() <= fmt.qmax]                            # in range: torch's own overflow rules differ
    same(fmt.quantize(x), x.to(dtype).float())


def test_minifloat_known_answers():
    e4m3, e5m2, e2m1 = (parse_format(n) for n in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"))
    fp6 = [parse_format("fp6_e3m2"), parse_format("fp6_e2m3")]
    assert [f.qmax for f in (e4m3, e5m2, e2m1, *fp6)] == [448, 57344, 6, 28, 7.5]
    assert [len(f.values()) for f in (e4m3, e5m2, e2m1)] == [253, 247, 15]
    assert parse_format("fp16").qmax == 65504 and parse_format("bf16").qmax == (2 - 2 ** -7) * 2.0 ** 127
    same(e4m3.quantize(torch.tensor([464.0, 17, 19, 2 ** -10, 3 * 2 ** -11, 1e30, -0.0])),
         [448, 16, 20, 0, 2 ** -9, 448, -0.0])           # ties to the even mantissa; 1e30 saturates
    same(e2m1.quantize(torch.tensor([5.0, 0.25, 0.75, 7, -100])), [4, 0, 1, 6, -6])
    same(MiniFloat(exp=5, man=2, special="ieee", saturate=False).quantize(torch.tensor([61439.0, 61440])),
         [57344, math.inf])
    same(MiniFloat(exp=4, man=3, denormals=False).quantize(torch.tensor([2 ** -7, 2 ** -8, 0.6 * 2 ** -6])),
         [0, 0, 2 ** -6])                                 # below 2^-6: nearer of 0 and 2^-6, ties to 0


# ---- MX and BFP: blocks recomputed by hand ----

def mx_oracle(x: torch.Tensor, element: str, block: int) -> torch.Tensor:
    """OCP MX v1.0 section 6.3: X = 2^(floor(log2 max|V|) - emax_elem), exponent clamped to E8M0's
    [-127, 127]; P = V / X rounded (nearest even, saturating) to the element; result P * X."""
    fp = None if element == "int8" else MXFormat(element=element)._fp
    emax = 0 if fp is None else math.frexp(spec(fp)[-2][0])[1] - 1
    out = []
    for row in x.double().reshape(-1, block).numpy():
        amax = np.abs(row).max()
        s = min(max(math.frexp(amax)[1] - 1 - emax, -127), 127) if amax > 0 else 0
        p = row / 2.0 ** s
        p = np.clip(np.round(p * 64), -127, 127) / 64 if fp is None else oracle(fp, p)
        out.append(p * 2.0 ** s)
    return torch.from_numpy(np.stack(out)).reshape(x.shape)


@pytest.mark.parametrize("element", ["int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_mx_matches_hand_computed_blocks(element):
    fmt, rng = MXFormat(element=element), np.random.default_rng(1)
    scales = 2.0 ** rng.integers(-150, 120, size=(40, 1))            # exercises the clamp at 2^-127
    x = torch.from_numpy((rng.standard_normal((40, 32)) * scales).astype(np.float32))
    x[3] = 0                                                          # an all-zero block stays zero
    grid = fmt.values().numpy()                                       # a block of element-grid ties
    x[4] = torch.from_numpy(np.resize(np.append(grid[-1], (grid[:-1] + grid[1:]) / 2), 32) * 2.0 ** -5)
    x = x.reshape(20, 64)
    same(fmt.quantize(x).double(), mx_oracle(x, element, 32))
    assert torch.all(fmt.quantize(x)[1, 32:] == 0)
    xd = x.double() * 2.0 ** 150                                      # float64 reaches the 2^127 clamp
    same(fmt.quantize(xd), mx_oracle(xd, element, 32))


def test_mx_known_answers_and_torch_cast():
    row = torch.zeros(32)
    row[:3] = torch.tensor([1.0, 0.3, -0.2])                 # amax 1: X = 2^(0 - 2); V/X = 4, 1.2, -0.8
    same(parse_format("mxfp4").quantize(row)[:4], [1.0, 0.25, -0.25, 0.0])
    same(parse_format("mxint8").quantize(row)[:3], [1.0, 19 / 64, -13 / 64])
    big = torch.full((32,), 2.0 ** 200, dtype=torch.float64)  # s = 200 - 8 clamps to 127; 2^73 saturates
    same(parse_format("mxfp8").quantize(big), torch.full((32,), 448 * 2.0 ** 127, dtype=torch.float64))
    same(parse_format("mxfp8").quantize(torch.full((32,), 2.0 ** -140)), torch.zeros(32))
    nan_block = torch.ones(64)
    nan_block[40] = math.inf                                 # E8M0's NaN scale: the whole block is NaN
    q = parse_format("mxfp8").quantize(nan_block)
    assert q[:32].eq(1).all() and q[32:].isnan().all()
    x = torch.randn(8, 64) * 3                               # MXFP8 through torch's float8 cast
    amax = x.reshape(-1, 32).abs().amax(1, keepdim=True)
    X = 2.0 ** (torch.floor(torch.log2(amax)) - 8)
    want = ((x.reshape(-1, 32) / X).clamp(-448, 448).to(torch.float8_e4m3fn).float() * X).reshape(8, 64)
    same(parse_format("mxfp8").quantize(x), want)


@pytest.mark.parametrize("fmt", [MXFormat(), BlockFloat()], ids=["mx", "bfp"])
def test_block_must_divide_last_dim(fmt):
    with pytest.raises(KilnError, match=rf"block size {fmt.block} does not divide the last dimension \(20\)"):
        fmt.quantize(torch.randn(3, 20))


def test_bfp_hand_computed_and_mxint8():
    rng = np.random.default_rng(2)
    x = torch.from_numpy((rng.standard_normal((6, 64)) * 2.0 ** rng.integers(-20, 20, (6, 1))).astype(np.float32))
    for man, block, exp in [(8, 16, 8), (4, 16, 8), (6, 8, 3), (2, 4, 8)]:
        top, rows = 2 ** (exp - 1) - 1, x.double().reshape(-1, block).numpy()
        s = np.clip(np.frexp(np.abs(rows).max(1, keepdims=True))[1] - 1, -top, top)
        step = 2.0 ** (s - man + 2)
        k = np.clip(np.round(rows / step), -(2 ** (man - 1) - 1), 2 ** (man - 1) - 1)
        want = torch.from_numpy(k * step).reshape(x.shape)
        same(BlockFloat(man=man, block=block, exp=exp).quantize(x).double(), want)
    same(BlockFloat(man=8, block=32).quantize(x), parse_format("mxint8").quantize(x))
    row = torch.zeros(16)
    row[:4] = torch.tensor([1.0, 0.3, -0.6, 0.1])           # step 2^(0 - 4 + 2) = 0.25
    same(parse_format("bfp4").quantize(row)[:4], [1.0, 0.25, -0.5, 0.0])
    same(BlockFloat(man=4, block=2, exp=2).quantize(torch.tensor([100.0, 1.0])), [3.5, 1.0])  # s clamps to 1


# ---- log, binary, ternary ----

def log_oracle(fmt: LogFormat, y: float) -> float:
    """The power of two nearest in ratio (exact Fractions); 0 at or below 2^(emin-1)."""
    if y != y or math.isinf(y):
        return y if y != y else math.copysign(1.0, y)
    a = Fraction(abs(y))
    if a <= Fraction(2) ** (fmt.emin - 1):
        return math.copysign(0.0, y)
    best = max((Fraction(2) ** e for e in range(fmt.emin, 1)), key=lambda c: min(a / c, c / a))
    return math.copysign(float(best), y)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_log_matches_brute_force(bits):
    fmt, rng = LogFormat(bits_=bits), np.random.default_rng(3)
    geo = np.float32(2.0 ** (np.arange(fmt.emin - 2, 2) + 0.5))           # the log-domain midpoints
    edge = np.float32([2.0 ** (fmt.emin - 1), 1.0, 0.0, 5.0, np.inf, np.nan])
    rand = np.float32(2.0 ** rng.uniform(fmt.emin - 2, 1, 300))
    pos = np.concatenate([geo, np.nextafter(geo, np.float32(0)), np.nextafter(geo, np.float32(np.inf)), edge,
                          np.nextafter(edge[:2], np.float32(np.inf)), rand])
    x = torch.from_numpy(np.concatenate([pos, -pos]))
    same(fmt.quantize(x), [log_oracle(fmt, float(v)) for v in x])
    same(fmt.quantize(x, scale=torch.tensor(3.0)), torch.tensor([log_oracle(fmt, float(v)) for v in x / 3]) * 3)
    assert fmt.values().tolist() == sorted({0.0} | {s * 2.0 ** e for e in range(fmt.emin, 1) for s in (1, -1)})


def exact_mean(values) -> float:
    values = [Fraction(float(v)) for v in values]
    return float(sum(values) / len(values)) if values else 0.0


def test_binary():
    same(Binary().quantize(torch.tensor([0.0, 2.0, -3.0, -1e-30])), [1, 1, -1, -1])   # sign(0) = +1
    x = torch.tensor([[1.0, -2, 3], [0.5, 0.5, -0.5]])                               # alpha 2 and 0.5
    same(Binary(alpha=True).quantize(x), [[2.0, -2, 2], [0.5, 0.5, -0.5]])
    x = torch.randn(3, 5, 4)
    alpha = torch.tensor([exact_mean(c.abs().flatten()) for c in x]).float().reshape(3, 1, 1)
    same(Binary(alpha=True).quantize(x), torch.where(x >= 0, alpha, -alpha))
    v = torch.randn(7)                                                                # 1-D: per tensor
    alpha = torch.tensor(exact_mean(v.abs())).float()
    same(Binary(alpha=True).quantize(v), torch.where(v >= 0, alpha, -alpha))


def ternary_oracle(row):
    a = [abs(float(v)) for v in row]
    delta = 0.7 * exact_mean(a)
    alpha = exact_mean([v for v in a if v > delta])
    return [math.copysign(alpha, float(v)) if abs(float(v)) > delta else 0.0 for v in row]


def test_ternary():
    same(Ternary().quantize(torch.tensor([[1.0, -2, 0.1, 3]])), [[0.0, -2.5, 0, 2.5]])  # delta 1.0675
    same(Ternary(threshold=0.5).quantize(torch.tensor([2.0, 1, 0.5, -0.5])), [1.5, 1.5, 0, 0])  # |x| = delta: 0
    x = torch.randn(4, 3, 8)
    x[2] = 0                                                                          # no survivors: zeros
    same(Ternary().quantize(x), torch.tensor([ternary_oracle(c.flatten()) for c in x]).reshape(x.shape))
    v = torch.randn(50)
    same(Ternary().quantize(v), ternary_oracle(v))


# ---- the conformance suite every preset runs ----

@pytest.mark.parametrize("name", OURS)
def test_preset_conformance(name):
    fmt = parse_format(name)
    assert isinstance(fmt, CLASSES[PRESETS[name]["format"]]) and fmt == parse_format({"format": name})
    assert fmt.bits == BITS[name]
    v = fmt.values()
    assert v.dtype == torch.float64 and v.dim() == 1 and torch.all(v[1:] > v[:-1])
    assert v[-1] == fmt.qmax and v[0] == fmt.qmin
    if fmt.scaled:
        same(fmt.quantize(v.float()), v.float())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        q = fmt.quantize(x.to(dtype))
        assert q.dtype == dtype and q.shape == x.shape
        same(fmt.quantize(q), q)                                                       # idempotent
    xg = x.clone().requires_grad_()
    fmt.quantize(xg).sum().backward()
    same(xg.grad, torch.ones_like(x))                                                  # straight-through


def test_parse_format_errors_and_overrides():
    assert parse_format({"format": "mxfp4", "block": 16}) == MXFormat(element="fp4_e2m1", block=16)
    assert parse_format({"format": "log", "bits": 3}) == LogFormat(bits_=3)
    bad = [({"format": "minifloat", "exponent": 4}, "unknown key 'exponent'"),
           ({"format": "log", "bits": 9}, r"bits must be in \[2, 8\], got 9"),
           ({"format": "minifloat", "exp": 0}, r"exp must be in \[2, 8\]"),
           ({"format": "minifloat", "man": 11}, r"man must be in \[0, 10\], got 11"),
           ({"format": "minifloat", "bias": 500}, r"bias must be in \[-112, 147\]"),
           ({"format": "minifloat", "special": "ocp"}, "special must be one of ieee, fn, none, got 'ocp'"),
           ({"format": "mx", "element": "fp7"}, "element must be one of int8, fp8_e4m3, .*fp4_e2m1, got 'fp7'"),
           ({"format": "mx", "block": 0}, r"block must be in \[1, 4096\], got 0"),
           ({"format": "bfp", "man": 1}, r"man must be in \[2, 16\], got 1"),
           ({"format": "ternary", "threshold": 2}, r"threshold must be in \[0, 1\]"),
           ("mxfp3", "unknown format 'mxfp3'")]
    for table, message in bad:
        with pytest.raises(KilnError, match=message):
            parse_format(table)
