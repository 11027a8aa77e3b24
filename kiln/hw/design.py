"""`kiln hw emit`: a quantized kiln run -> a directory with the RTL, its weight ROMs, the integer
layers (for the integer model) and design.json (shapes, widths, reuse factors, predicted cycles).

    DIR/design.json     what was emitted, from what, with the cycle prediction and the check
                        of the integer model against the fake-quantized model
    DIR/layers.npz      the integer layers (weights, multipliers, biases), for kiln hw verify
    DIR/rtl/*.sv        one module per layer and kiln_top; DIR/rtl/*.mem the $readmemh ROMs
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.hw import rtl
from kiln.hw.check import compare, first_op
from kiln.hw.ir import Layer, lower, quant_grid
from kiln.io import atomic_dir, json_text
from kiln.runs.artifact import load_source
from kiln.train.evaluation import source_splits

DESIGN_FILE = "design.json"
LAYERS_FILE = "layers.npz"
MAX_BITS = 62      # acc * m + b must fit the integer model's int64 (and a sane RTL adder)


@dataclass(frozen=True)
class EmitConfig:
    """reuse: every dense layer's reuse factor (0: K, one multiplier per output channel);
    layer_reuse: (layer name, reuse) overrides; check_samples: test samples the integer model
    is compared on with the fake-quantized model."""

    reuse: int = 0
    layer_reuse: tuple[tuple[str, int], ...] = ()
    check_samples: int = 256


def valid_reuse(lay: Layer) -> list[int]:
    """Reuse factors a dense layer takes: divisors of K (PO = N), or K times a divisor of N."""
    k, n = lay.k, lay.n
    return [r for r in range(1, k + 1) if k % r == 0] + [k * d for d in range(2, n + 1) if n % d == 0]


def parallelism(lay: Layer, reuse: int) -> tuple[int, int]:
    """(PO, PI) for a reuse factor: R <= K gives PI = K / R inputs per cycle for all N outputs;
    R = K * d gives one input per cycle for N / d outputs."""
    k, n = lay.k, lay.n
    if reuse <= k and k % reuse == 0:
        return n, k // reuse
    if reuse > k and reuse % k == 0 and n % (reuse // k) == 0:
        return n // (reuse // k), 1
    ok = valid_reuse(lay)
    shown = ", ".join(map(str, ok[:12])) + (", ..." if len(ok) > 12 else "")
    raise KilnError(f"reuse factor {reuse} does not divide layer {lay.name} (K={k} inputs x N={n} outputs); "
                    f"it takes a divisor of K or K times a divisor of N: {shown}")


def predict_cycles(layers: list[Layer]) -> dict:
    """Cycles from the RTL's structure (kiln.hw.rtl): per layer busy = P*R + 3 (dense) or 0 (pool);
    latency = sum(busy + 1) edges from the input handshake to the output handshake; a new frame
    every max(busy + 2) cycles once the pipeline is full."""
    busy = [lay.positions * lay.reuse + 3 if lay.kind == "dense" else 0 for lay in layers]
    return {"latency": sum(b + 1 for b in busy), "interval": max(b + 2 for b in busy),
            "per_layer": {lay.name: b for lay, b in zip(layers, busy)}}


def _assign_reuse(layers: list[Layer], config: EmitConfig) -> None:
    names = {lay.name for lay in layers if lay.kind == "dense"}
    for name, _ in config.layer_reuse:
        if name not in names:
            raise KilnError(f"--reuse names layer {name!r}, which is not a dense layer; layers: {', '.join(sorted(names))}")
    over = dict(config.layer_reuse)
    for lay in layers:
        if lay.kind == "dense":
            lay.reuse = over.get(lay.name, config.reuse or lay.k)
            parallelism(lay, lay.reuse)


def _check_widths(layers: list[Layer]) -> None:
    for lay in layers:
        if lay.kind != "dense":
            continue
        bits = rtl.requant_bits(lay)
        if bits > MAX_BITS or lay.acc_bits > 53:
            raise KilnError(f"layer {lay.name}: the accumulator needs {lay.acc_bits} bits and acc*m+b {bits} bits "
                            f"(from its input range [{lay.in_lo}, {lay.in_hi}] and weights), beyond the "
                            f"{MAX_BITS}-bit limit (53 for the accumulator): it would overflow; use fewer bits")


def _layer_record(lay: Layer) -> dict:
    rec = {"name": lay.name, "kind": lay.kind, "in_shape": list(lay.in_shape), "out_shape": list(lay.out_shape),
           "in_range": [lay.in_lo, lay.in_hi], "out_range": [lay.out_lo, lay.out_hi],
           "kernel": lay.kernel[0], "stride": lay.stride, "padding": lay.padding, "shift": lay.shift,
           "relu": lay.relu, "in_bits": lay.in_bits, "out_bits": lay.out_bits, **lay.meta}
    if lay.kind == "dense":
        po, pi = parallelism(lay, lay.reuse)
        rec |= {"reuse": lay.reuse, "po": po, "pi": pi, "multipliers": po * pi, "acc_range": list(lay.acc_range()),
                "acc_bits": lay.acc_bits, "weight_bits": rtl.weight_bits(lay), "requant_bits": rtl.requant_bits(lay)}
    return rec


def _write_rtl(rtl_dir: Path, layers: list[Layer]) -> list[str]:
    rtl_dir.mkdir()
    names = []
    for i, lay in enumerate(layers):
        name = f"layer{i}_{lay.kind}"
        names.append(name)
        if lay.kind == "dense":
            po, pi = parallelism(lay, lay.reuse)
            rom = f"{name}_w.mem"
            (rtl_dir / rom).write_text("\n".join(rtl.weight_rom(lay, po, pi)) + "\n")
            text = rtl.dense_module(name, lay, po, pi, rom)
        else:
            text = rtl.pool_module(name, lay)
        (rtl_dir / f"{name}.sv").write_text(f"`timescale 1ns/1ps\n{text}")
    (rtl_dir / "kiln_top.sv").write_text(f"`timescale 1ns/1ps\n{rtl.top_module(names, layers)}")
    return names


def _test_samples(source, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test-split samples (inputs, labels) of the run's dataset."""
    test = source_splits(source).test
    n = min(n, len(test))
    xs, ys = zip(*[test[i] for i in range(n)])
    return torch.stack(xs), torch.as_tensor(ys)


def emit(src: str, out: str | Path, config: EmitConfig = EmitConfig()) -> dict:
    """The whole command; returns design.json's content. `out` is complete or absent."""
    source = load_source(src)
    if not source.quantized:
        raise KilnError(f"{src} is not quantized: make it a kiln run with `kiln quantize {src} --out DIR`")
    samples = _test_samples(source, config.check_samples) if config.check_samples > 0 else None
    # a run directory is recorded absolute: verify reloads it from wherever it runs
    origin = {"source": str(Path(src).resolve()) if Path(src).is_dir() else str(src), "spec": source.spec, "dataset": source.dataset, "data_seed": source.data_seed}
    return emit_model(source.model, source.example_inputs[0], out, config, origin, samples)


def emit_model(model: torch.nn.Module, example: torch.Tensor, out: str | Path, config: EmitConfig = EmitConfig(),
               origin: dict | None = None, samples: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Emit an in-memory quantized model (kiln.quant); `samples` (inputs, labels) for the check
    against the fake-quantized model; `origin` (source, spec, dataset, data_seed) for verify."""
    model = model.eval()
    layers = lower(model, example)
    _assign_reuse(layers, config)
    _check_widths(layers)
    op = first_op(model)
    check = compare(model, layers, *samples) if samples is not None else None
    xg = quant_grid(op.input_q, "the first layer's input", per_channel_ok=False)
    design = {**(origin or {"source": None, "spec": None, "dataset": None, "data_seed": 0}),
              "input": {"scale": float(xg.scale[0]), "lo": layers[0].in_lo, "hi": layers[0].in_hi,
                        "shape": list(layers[0].in_shape)},
              "output": {"scale": layers[-1].meta.get("out_scale"), "bits": layers[-1].out_bits},
              "layers": [_layer_record(lay) for lay in layers], "cycles": predict_cycles(layers),
              "fake_quant_check": check}
    with atomic_dir(out) as tmp:
        design["modules"] = _write_rtl(Path(tmp) / "rtl", layers)
        arrays = {}
        for i, lay in enumerate(layers):
            for key in ("weight", "mult", "bias"):
                if getattr(lay, key) is not None:
                    arrays[f"{i}_{key}"] = getattr(lay, key)
        np.savez(Path(tmp) / LAYERS_FILE, **arrays)
        (Path(tmp) / DESIGN_FILE).write_text(json_text(design))
    return design


def load_design(directory: str | Path) -> tuple[dict, list[Layer]]:
    """design.json and the integer layers of an emitted design."""
    d = Path(directory)
    if not (d / DESIGN_FILE).is_file():
        raise KilnError(f"{d} is not a kiln hw design (no {DESIGN_FILE}): make one with `kiln hw emit SRC --out DIR`")
    design = json.loads((d / DESIGN_FILE).read_text())
    arrays = np.load(d / LAYERS_FILE)
    layers = []
    for i, rec in enumerate(design["layers"]):
        k = rec["kernel"]
        lay = Layer(rec["name"], rec["kind"], tuple(rec["in_shape"]), tuple(rec["out_shape"]), *rec["in_range"],
                    *rec["out_range"], kernel=(k, k), stride=rec["stride"], padding=rec["padding"],
                    shift=rec["shift"], relu=rec["relu"], reuse=rec.get("reuse", 1))
        for key in ("weight", "mult", "bias"):
            if f"{i}_{key}" in arrays:
                setattr(lay, key, arrays[f"{i}_{key}"])
        layers.append(lay)
    return design, layers
