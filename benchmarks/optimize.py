"""`kiln optimize` against its peers: speedup over fp32 eager at a 1-point absolute accuracy
drop, the drop itself, and the wall time of the whole command, side by side in one run.

    TORCHINDUCTOR_COMPILE_THREADS=1 flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/optimize.py \
        [--models runs/cnn,runs/resnet20,runs/minilm-rt] [--seeds 0,1,2] [--budget 10] [--json PATH] [--smoke]

The models are trained first (a drop from an untrained model's 10 % says nothing):
    kiln train zoo:cnn --epochs 12 --lr 2e-3 --out runs/cnn
    kiln train zoo:resnet20 --epochs 3 --lr 2e-3 --out runs/resnet20
    kiln train --config configs/train/minilm.toml --out runs/minilm-rt

For each model (a trained run directory or a spec) and seed:
- kiln optimize SRC --target local --max-drop 0.01 --budget B (a subprocess, timed whole);
  its speedup is the side-by-side ratio the command itself measured (kiln.timing), its drop the
  test metric of the deployable against fp32's;
- kiln int8 only: kiln quantize with configs/quant/w8a8.toml, then kiln compile --precision int8
  (the best single technique kiln has), timed beside fp32 eager;
- the peers (benchmarks/optimize_peers.py in the peers' own environment, `make peers-venv`):
  Intel Neural Compressor's `autotune` (tolerable_loss 0.01 absolute), NNCF's
  `quantize_with_accuracy_control` on the ONNX export run in OpenVINO (max_drop 0.01 absolute),
  OpenVINO fp32 and OpenVINO int8 (nncf.quantize), each timed beside fp32 eager in its own
  process. A peer that is not installed or fails is a row with its reason, not a crash.
Every row says whether its test drop is within the 1-point tolerance (`met`), and kiln
optimize's which layer types its chosen point quantized, pruned or factorised.
--smoke: the MNIST CNN (untrained unless a run is given), one seed, a 2-minute budget, peers
only where installed: checks the script, not the figures.
Figures are taken by the lead on a quiet machine; BENCHMARKS.md keeps them with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")   # compile workers would fight the 2 cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_with_history  # noqa: E402

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def _kiln(*args: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode, time.perf_counter() - t0, lines[-1] if lines else ""


def kiln_optimize(src: str, seed: int, budget: float, work: Path, backend: str) -> dict:
    out = work / f"optimize-{seed}"
    js = work / f"optimize-{seed}.json"
    rc, wall, last = _kiln("optimize", src, "--target", "local", "--max-drop", "0.01", "--budget", f"{budget:g}",
                           "--seed", str(seed), "--backend", backend, "--out", str(out), "--json", str(js))
    if rc != 0:
        return {"method": "kiln optimize", "seed": seed, "error": last, "wall_s": wall}
    r = json.loads(js.read_text())
    side = r["deploy"].get("side_by_side", {})
    changed = [d for d in r.get("decisions", []) if d["bits"] != 32 or d["sparsity"] > 0 or d["budget"] < 1]
    return {"method": "kiln optimize", "seed": seed, "wall_s": wall, "speedup_vs_baseline": side.get("speedup"),
            "baseline_backend": json.loads((out / "optimize.json").read_text())["baseline"]["backend"],
            "backend": r["deploy"]["chosen_backend"], "drop_test": r["confirm"]["drop_test"],
            "met": r["confirm"]["drop_test"] <= 0.01 + 1e-9,
            "drop_val": r["confirm"]["drop_val"], "eager_speedup": _eager_speedup(r),
            "changed_layers": {t: sum(t in d.get("types", []) for d in changed) for t in ("Linear", "Conv2d")}}


def _eager_speedup(r: dict) -> float | None:
    """The deployable's compiled latency against fp32 eager from the final compile's own table
    (its candidates are timed interleaved, eager among them)."""
    cands = {c["backend"]: c for c in r["deploy"]["compile"]["candidates"]}
    chosen, eager = cands.get(r["deploy"]["chosen_backend"]), cands.get("eager")
    if chosen and eager and chosen.get("latency_s") and eager.get("latency_s"):
        return eager["latency_s"] / chosen["latency_s"]
    return None


def kiln_int8(src: str, work: Path, backend: str = "auto") -> dict:
    q = work / "int8"
    rc, wall, last = _kiln("quantize", src, "--config", str(ROOT / "configs/quant/w8a8.toml"), "--out", str(q))
    if rc != 0:
        return {"method": "kiln int8 only", "error": last}
    js = work / "int8-compile.json"
    rc2, wall2, last = _kiln("compile", str(q), "--precision", "int8", "--backend", backend, "--json", str(js))
    if rc2 != 0:
        return {"method": "kiln int8 only", "error": last}
    report = json.loads(js.read_text())
    metrics = json.loads((q / "metrics.json").read_text())
    cands = {c["backend"]: c for c in report["candidates"]}
    return {"method": "kiln int8 only", "wall_s": wall + wall2, "backend": report["chosen"],
            "eager_speedup": cands["eager"]["latency_s"] / cands[report["chosen"]]["latency_s"],
            "drop_test": metrics["before"] - metrics["after"], "met": metrics["before"] - metrics["after"] <= 0.01 + 1e-9}


def peers(src: str, work: Path) -> list[dict]:
    if not PEERS_PYTHON.is_file():
        return [{"method": m, "error": "peers environment missing: make peers-venv"}
                for m in ("INC autotune", "NNCF accuracy control + OpenVINO", "OpenVINO fp32", "OpenVINO int8")]
    js = work / "peers.json"
    proc = subprocess.run([str(PEERS_PYTHON), str(ROOT / "benchmarks/optimize_peers.py"), src, "--max-drop", "0.01",
                           "--json", str(js)], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    if proc.returncode != 0 or not js.is_file():
        return [{"method": "peers", "error": (proc.stderr or proc.stdout).strip()[-300:]}]
    return json.loads(js.read_text())["rows"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="runs/cnn,runs/resnet20,runs/minilm-rt")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/optimize.json"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    models, seeds, budget, backend = a.models.split(","), [int(s) for s in a.seeds.split(",")], a.budget, a.backend
    if a.smoke:
        models, seeds, budget, backend = [m for m in models if "cnn" in m][:1] or ["zoo:cnn"], [0], 2.0, "eager+onnxruntime"
        models = [m if (m.startswith("zoo:") or Path(m).is_dir()) else "zoo:cnn" for m in models]
    rows = []
    for src in models:
        with tempfile.TemporaryDirectory(prefix="kiln-optimize-bench-") as tmp:
            work = Path(tmp)
            for seed in seeds:
                rows.append({"model": src} | kiln_optimize(src, seed, budget, work, backend))
                print(rows[-1], flush=True)
            rows.append({"model": src} | kiln_int8(src, work, "eager+onnxruntime:dtype=int8" if a.smoke else "auto"))
            rows += [{"model": src} | r for r in peers(src, work)]
    result = {"summary": {"date": str(date.today()), "smoke": a.smoke, "budget_min": budget, "seeds": seeds,
                          "threads": os.cpu_count(), "command": " ".join(sys.argv)}, "rows": rows}
    if a.smoke:
        print(json.dumps(result, indent=2))
        return
    write_with_history(a.json, result)


if __name__ == "__main__":
    main()
