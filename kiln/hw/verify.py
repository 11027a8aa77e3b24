"""`kiln hw verify`: real test samples through the emitted RTL in Icarus Verilog (driven by
cocotb), every output bit compared with the integer model, cycles read from the simulation."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.data import load_dataset
from kiln.errors import KilnError
from kiln.hw import intmodel
from kiln.hw.design import load_design
from kiln.hw.tools import icarus_runner, tool_version
from kiln.runs.artifact import load_source

TB_MODULE = "kiln.hw.cocotb_tb"


@dataclass(frozen=True)
class VerifyConfig:
    samples: int = 100
    fake_quant: bool = True      # also run kiln's fake-quantized model for its accuracy
    split: str = "test"          # test, val, or heldout (test then val: neither is trained on)


SPLITS = ("test", "val", "heldout")


def pack(frames: np.ndarray, bits: int) -> list[str]:
    """Each row of codes -> one hex word, element i at bits [i*bits, (i+1)*bits) (two's complement)."""
    mask = (1 << bits) - 1
    out = []
    for row in frames.reshape(frames.shape[0], -1):
        word = 0
        for i, v in enumerate(row.tolist()):
            word |= (int(v) & mask) << (i * bits)
        out.append(format(word, "x"))
    return out


def unpack(word: str, n: int, bits: int) -> np.ndarray:
    w, mask, sign = int(word, 16), (1 << bits) - 1, 1 << (bits - 1)
    vals = [(w >> (i * bits)) & mask for i in range(n)]
    return np.array([v - (1 << bits) if v & sign else v for v in vals], dtype=np.int64)


def simulate(design_dir: str | Path, frames: np.ndarray, max_cycles: int) -> dict:
    """Run input code frames (B, ...) through kiln_top in Icarus; the raw results of cocotb_tb."""
    design, layers = load_design(design_dir)
    runner = icarus_runner()
    rtl = Path(design_dir) / "rtl"
    with tempfile.TemporaryDirectory(prefix="kiln-hw-sim-") as tmp:
        work = Path(tmp)
        for mem in rtl.glob("*.mem"):      # $readmemh reads relative to the simulator's directory
            shutil.copy(mem, work / mem.name)
        (work / "vectors.hex").write_text("\n".join(pack(frames, layers[0].in_bits)) + "\n")
        sources = [rtl / f"{m}.sv" for m in design["modules"]] + [rtl / "kiln_top.sv"]
        try:
            runner.build(sources=sources, hdl_toplevel="kiln_top", build_dir=work / "build", timescale=("1ns", "1ps"),
                         always=True, log_file=work / "build.log")
        except SystemExit as exc:       # cocotb's runner exits on a compile error
            log = (work / "build.log").read_text() if (work / "build.log").exists() else ""
            raise KilnError(f"iverilog failed: {next((ln for ln in log.splitlines() if 'error' in ln.lower()), exc)}") from None
        env = {"KILN_HW_VECTORS": str(work / "vectors.hex"), "KILN_HW_RESULTS": str(work / "results.json"),
               "KILN_HW_MAX_CYCLES": str(max_cycles),
               "PYTHONPATH": os.pathsep.join([str(Path(kiln.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
        runner.test(test_module=TB_MODULE, hdl_toplevel="kiln_top", build_dir=work / "build", test_dir=work,
                    extra_env=env, log_file=work / "sim.log")
        if not (work / "results.json").exists():
            raise KilnError("the simulation wrote no results: " + (work / "sim.log").read_text().strip().splitlines()[-1])
        return json.loads((work / "results.json").read_text())


def _inputs(design: dict, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples of the design's dataset split (heldout: the test split, then val)."""
    if split not in SPLITS:
        raise KilnError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not design.get("dataset"):
        raise KilnError(f"the design in {design.get('source')} records no dataset to take test samples from "
                        "(emit it from a kiln run directory)")
    splits = load_dataset(design["dataset"], seed=design["data_seed"])
    parts = {"test": [splits.test], "val": [splits.val], "heldout": [splits.test, splits.val]}[split]
    items = [ds[i] for ds in parts for i in range(len(ds))][:n]
    xs, ys = zip(*items)
    return torch.stack(xs), torch.as_tensor(ys)


def input_codes(design: dict, x: torch.Tensor) -> np.ndarray:
    """The first layer's input codes, rounded as kiln.quant rounds (float32 x / scale, half to even)."""
    inp = design["input"]
    q = torch.clamp(torch.round(x.float() / torch.tensor(inp["scale"], dtype=torch.float32)), inp["lo"], inp["hi"])
    return q.to(torch.int64).numpy().reshape(x.shape[0], *inp["shape"])


def verify(design_dir: str | Path, config: VerifyConfig = VerifyConfig()) -> dict:
    """The report: bit-exactness, accuracies, cycles measured and predicted."""
    if config.samples < 1:
        raise KilnError(f"--samples must be >= 1, got {config.samples}")
    design, layers = load_design(design_dir)
    x, labels = _inputs(design, config.samples, config.split)
    frames = input_codes(design, x)
    expect = intmodel.run(frames, layers)
    cyc = design["cycles"]
    res = simulate(design_dir, frames, max_cycles=cyc["latency"] + cyc["interval"] * (len(frames) + 2) + 100)
    n_out, ob = expect.shape[1], layers[-1].out_bits
    got = np.stack([unpack(w, n_out, ob) for w in res["outputs"]]) if res["outputs"] else np.zeros((0, n_out), np.int64)
    if len(got) < len(frames):
        raise KilnError(f"the RTL produced {len(got)} of {len(frames)} outputs within {res['edges']} cycles")
    exact = [a == b for a, b in zip(res["outputs"], pack(expect, ob))]
    lat = [o - i for i, o in zip(res["in_edges"], res["out_edges"])]
    gaps = np.diff(res["out_edges"]).tolist()
    lab = labels.numpy()
    report = {"design": str(design_dir), "simulator": tool_version("iverilog"), "samples": len(frames),
              "dataset": design["dataset"], "split": config.split,
              "bit_exact": int(sum(exact)), "bit_exact_fraction": sum(exact) / len(frames),
              "first_mismatch": next((i for i, e in enumerate(exact) if not e), None),
              "accuracy_rtl": float((got.argmax(1) == lab).mean()),
              "accuracy_integer_model": float((expect.argmax(1) == lab).mean()),
              # the first frame meets an empty pipeline (the latency); later ones may queue
              # behind the slowest layer (their in-to-out time grows until the interval settles)
              "latency_cycles": {"measured": lat[0], "predicted": cyc["latency"], "with_queueing_max": max(lat)},
              "interval_cycles": {"measured": max(gaps[1:]) if len(gaps) > 1 else (gaps[0] if gaps else None),
                                  "predicted": cyc["interval"]}}
    report["cycles_match"] = lat[0] == cyc["latency"] and \
        (report["interval_cycles"]["measured"] in (None, cyc["interval"]))
    if config.fake_quant:
        model = load_source(design["source"]).model.eval()
        with torch.no_grad():
            report["accuracy_fake_quant"] = float((model(x).argmax(1).numpy() == lab).mean())
    return report
