"""How long kiln's analysis takes: `kiln analyze zoo:minilm` end to end, and capture of a
200-layer MLP beside raw torch.export (the baseline it wraps).

    .venv/bin/python benchmarks/analyze_speed.py [--json PATH] [--repeats 3]

End to end is the real command in a fresh process (Python start, imports, load of the real
weights, capture, analysis, measured profile, JSON), median of repeats, on a calibrated
'local' profile (the calibration itself is `kiln hardware calibrate`, run once before).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

from kiln.graph.capture import capture  # noqa: E402
from kiln.models.loaded import LoadedModel  # noqa: E402
from kiln.timing import TimingConfig, measure  # noqa: E402

KILN = os.path.join(os.path.dirname(sys.executable), "kiln")


# whole commands and captures, as a user meets them: no warm-up, no untimed calls between
ONCE_EACH = dict(warmup=0, short_call_s=0.0)


def end_to_end(spec: str, repeats: int) -> list[float]:
    subprocess.run([KILN, "hardware"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda: subprocess.run([KILN, "analyze", spec, "--json", f"{tmp}/a.json"], check=True,  # noqa: E731
                                     capture_output=True)
        return list(measure({"analyze": run}, TimingConfig(rounds=repeats, **ONCE_EACH))["analyze"].samples)


def deep_mlp_capture(repeats: int) -> tuple[list[float], list[float]]:
    model = nn.Sequential(*[m for _ in range(200) for m in (nn.Linear(64, 64), nn.ReLU())]).eval()
    x = torch.randn(8, 64)
    m = measure({"torch.export": lambda: torch.export.export(model, (x,), strict=False),
                 "kiln capture": lambda: capture(LoadedModel("mlp200", model, (x,)))},
                TimingConfig(rounds=repeats, **ONCE_EACH))
    return list(m["kiln capture"].samples), list(m["torch.export"].samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "local" not in subprocess.run([KILN, "hardware"], capture_output=True, text=True).stdout:
        subprocess.run([KILN, "hardware", "calibrate"], check=True)
    e2e = end_to_end("zoo:minilm", args.repeats)
    kiln_t, raw_t = deep_mlp_capture(args.repeats)
    result = {
        "date": date.today().isoformat(), "threads": torch.get_num_threads(),
        "analyze_minilm_end_to_end_s": statistics.median(e2e), "analyze_minilm_runs_s": e2e,
        "capture_mlp200_s": statistics.median(kiln_t), "torch_export_mlp200_s": statistics.median(raw_t),
        "capture_overhead_ratio": statistics.median(kiln_t) / statistics.median(raw_t),
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
