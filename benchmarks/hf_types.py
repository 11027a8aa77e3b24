"""Every transformers model type through hf-config: does it capture with torch.export, and are its
forward FLOPs exact against torch.utils.flop_counter?

    .venv/bin/python benchmarks/hf_types.py [--types llama,bert] [--timeout 180] [--generic]

The reference is kiln.analysis.oracle.flop_counter_flops: flop_counter on the eager model, given
the CPU fused attention formula and mixture-of-experts experts run as the eager loop (and oneDNN
off, so an LSTM's cells count). Where kiln and that reference differ, the reference is taken
again on the code path torch.export takes (some models branch on torch.compiler.is_exporting();
the row says reference_path=export, the summary lists them). Each type runs in a worker process with a per-type time limit (a worker that crashes or hangs is killed
and replaced; the type is recorded as such). Rows are appended to benchmarks/results/
hf_types.jsonl as they finish, so a run that stops resumes where it stopped; types go in a
seeded random order, so a partial survey is a uniform sample. At the end the summary goes to
benchmarks/results/hf_types.json and the per-type verdicts to kiln/models/hf_config/survey.json,
which `kiln models --hf` reads. `--generic` builds the types that have a hand-written recipe
through the generic path too, to see which recipes it makes unnecessary. `--carry SURVEY.json`
keeps an earlier survey's verdict for each type the rows lack (marked carried, with its date):
for a partial pass on a busy machine. A list given with --types runs in its order.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS = ROOT / "benchmarks/results/hf_types.jsonl"
SUMMARY = ROOT / "benchmarks/results/hf_types.json"
SURVEY = ROOT / "kiln/models/hf_config/survey.json"


def measure(model_type: str, generic: bool) -> dict:
    """One type: build, capture, FLOPs against the oracle. Runs in the worker."""
    import torch

    from kiln.analysis.cost import AnnotateCost
    from kiln.analysis.oracle import flop_counter_flops
    from kiln.errors import KilnError
    from kiln.graph.capture import capture
    from kiln.models.hf_config import SUPPORTED, load_hf_config

    row = {"type": model_type, "recipe": model_type in SUPPORTED and not generic, "generic": generic}
    t0 = time.perf_counter()
    try:
        loaded = load_hf_config(model_type, {}, f"hf-config:{model_type}", generic=generic)
    except KilnError as exc:
        return row | {"stage": _load_stage(str(exc)), "error": str(exc), "seconds": time.perf_counter() - t0}
    modal = {"input_ids", "pixel_values", "input_values", "input_features", "pixel_values_videos"}
    accepted = set(inspect.signature(loaded.model.forward).parameters)
    row |= {"family": loaded.family, "params": sum(p.numel() for p in loaded.model.parameters()),
            "unused_modalities": sorted((modal & accepted) - set(loaded.example_kwargs)),
            "inputs": {k: list(v.shape) for k, v in loaded.example_kwargs.items() if isinstance(v, torch.Tensor)}}
    try:
        graph = capture(loaded)
    except KilnError as exc:
        return row | {"stage": "capture", "error": str(exc), "seconds": time.perf_counter() - t0}
    try:
        kiln_flops = AnnotateCost()(graph).record.flops
        reference = flop_counter_flops(loaded)
    except Exception as exc:  # a FLOP rule or the oracle itself failing is a finding, not a crash
        return row | {"stage": "flops", "error": f"{type(exc).__name__}: {exc}"[:300],
                      "seconds": time.perf_counter() - t0}
    if kiln_flops != reference:
        # a model that branches on torch.compiler.is_exporting(): the oracle on the exported path
        with contextlib.suppress(Exception):
            on_export_path = flop_counter_flops(loaded, export_path=True)
            if on_export_path != reference:
                row |= {"eager_path_flops": reference, "reference_path": "export"}
                reference = on_export_path
    row |= {"kiln_flops": kiln_flops, "reference_flops": reference, "seconds": time.perf_counter() - t0,
            "rel_error": abs(kiln_flops - reference) / reference if reference else float(kiln_flops != 0)}
    row["stage"] = "ok" if kiln_flops == reference else "flops"
    if row["stage"] == "flops":
        row["error"] = f"FLOPs differ: kiln {kiln_flops} vs flop_counter {reference}"
    return row


def _load_stage(message: str) -> str:
    for words, stage in (("rejected the config", "config"), ("with its defaults failed", "config"),
                         ("building", "build"), ("no example input", "inputs"), ("forward failed", "forward")):
        if words in message:
            return stage
    return "load"


def worker(types: list[str], rows: Path, timeout: int, generic: bool) -> None:
    """Measure `types` in order, one JSON line each; SIGALRM bounds each type."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    def on_alarm(signum, frame):
        raise TimeoutError(f"over {timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for model_type in types:
        print(f"START {model_type}", flush=True)
        signal.alarm(timeout)
        try:
            row = measure(model_type, generic)
        except TimeoutError as exc:
            row = {"type": model_type, "generic": generic, "stage": "timeout", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - anything else the model raised is the type's verdict
            row = {"type": model_type, "generic": generic, "stage": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            signal.alarm(0)
        with rows.open("a") as f:
            f.write(json.dumps(row) + "\n")


def done_rows(rows: Path) -> dict[tuple[str, bool], dict]:
    out = {}
    if rows.is_file():
        for line in rows.read_text().splitlines():
            if line.strip():
                row = normalise(json.loads(line))
                out[(row["type"], row.get("generic", False))] = row
    return out


def run_all(types: list[str], rows: Path, timeout: int, generic: bool) -> None:
    """Workers over the types not yet in `rows`; a dead or hung worker's type is recorded and skipped."""
    while True:
        left = [t for t in types if (t, generic) not in done_rows(rows)]
        if not left:
            return
        cmd = [sys.executable, __file__, "--worker", "--timeout", str(timeout), "--rows", str(rows),
               "--types", ",".join(left)] + (["--generic"] if generic else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        current, started = None, time.monotonic()
        os.set_blocking(proc.stdout.fileno(), False)
        while proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("START "):
                current, started = line.split()[1], time.monotonic()
                print(f"[{len(done_rows(rows))}/{len(types)}] {current}", file=sys.stderr, flush=True)
            elif current and time.monotonic() - started > 2 * timeout:
                proc.kill()  # stuck in native code where SIGALRM cannot reach
            else:
                time.sleep(0.2)
        if current and (current, generic) not in done_rows(rows):
            stage = "timeout" if time.monotonic() - started > 2 * timeout else "crash"
            with rows.open("a") as f:
                f.write(json.dumps({"type": current, "generic": generic, "stage": stage,
                                    "error": f"worker exited with {proc.returncode}"}) + "\n")


def normalise(row: dict) -> dict:
    """A time limit that fired inside torch.export reads as a capture failure: call it a timeout."""
    if "TimeoutError: over" in row.get("error", ""):
        return row | {"stage": "timeout"}
    return row


def cause(row: dict) -> str:
    """The failure group: stage and exception type (or the missing library)."""
    text = row.get("error", "")
    if "requires the timm library" in text:
        return f"{row['stage']}: needs timm (not installed: it pulls torchvision and another torch)"
    missing = re.search(r"requires the (\w+) library", text)
    if missing:
        return f"{row['stage']}: needs {missing.group(1)} (an optional package, not installed)"
    argument = re.search(r"forward argument '(\w+)'", text)
    if argument:
        return f"inputs: the forward needs {argument.group(1)!r}, which kiln does not build"
    exported = re.search(r"torch\.export: (\w+)", text)
    if exported:
        return f"capture: {exported.group(1)}"
    if row["stage"] == "timeout":
        return "timeout: over the per-type limit (machine shared)"
    found = re.search(r"(\w+(Error|Exception|Exit)|TimeoutError|Unsupported)\b", text)
    kind = found.group(1) if found else text.split(":")[0][:40]
    return f"{row['stage']}: {kind}"


def carried_rows(path: Path, rows: dict, types: list[str]) -> dict:
    """Rows for the types `rows` lacks, from an earlier survey.json's verdicts (marked carried:
    a partial pass on a busy machine keeps the earlier measurement of the types it did not reach)."""
    data = json.loads(path.read_text())
    meta, found = data.get("survey", {}), data.get("types", {})
    out = {}
    for t in types:
        if (t, False) not in rows and t in found:
            verdict = found[t]
            # a verdict the earlier survey itself carried keeps the date it was measured
            out[(t, False)] = {"type": t, "generic": False,
                               "carried": verdict.get("carried") or meta.get("date", "earlier survey"),
                               "stage": verdict["stage"], "error": verdict.get("error", ""),
                               "family": verdict.get("family", ""), "kiln_flops": None}
            if verdict["stage"] == "ok":
                out[(t, False)]["rel_error"] = 0.0
    return out


def summarise(rows: dict, types: list[str]) -> dict:
    main = [rows[(t, False)] for t in types if (t, False) in rows]
    captured = [r for r in main if r["stage"] in ("ok", "flops") and "kiln_flops" in r]
    ok = [r for r in main if r["stage"] == "ok"]
    blocked = [r for r in main if r["stage"] != "ok" and ("(not installed" in cause(r) or "optional package" in cause(r))]
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "types_total": len(types), "types_surveyed": len(main),
        "types_measured_in_this_pass": sum(not r.get("carried") for r in main),
        "types_carried_from_an_earlier_survey": sorted(r["type"] for r in main if r.get("carried")),
        "captured": len(captured), "captured_and_exact": len(ok),
        "share_exact_of_surveyed": round(len(ok) / max(len(main), 1), 4),
        "blocked_by_a_missing_package": len(blocked),
        "share_exact_of_the_buildable": round(len(ok) / max(len(main) - len(blocked), 1), 4),
        "within_1pct": sum(r.get("rel_error", 1) <= 0.01 for r in captured),
        "exact_with_a_modality_unused": sorted(r["type"] for r in ok if r.get("unused_modalities")),
        "exact_on_the_export_path": sorted(r["type"] for r in ok if r.get("reference_path") == "export"),
        "failures_by_cause": dict(Counter(cause(r) for r in main if r["stage"] != "ok").most_common()),
        "recipes_the_generic_path_matches": sorted(t for t in types if rows.get((t, True), {}).get("stage") == "ok"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: every type)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per type")
    parser.add_argument("--rows", default=str(ROWS))
    parser.add_argument("--generic", action="store_true", help="also build recipe types the generic way")
    parser.add_argument("--no-write", action="store_true", help="leave the summary and survey.json alone")
    parser.add_argument("--report", action="store_true", help="measure nothing: summarise the rows so far")
    parser.add_argument("--retry", default="", help="comma-separated stages whose rows are measured again")
    parser.add_argument("--shard", default="0/1", help="I/N: only every N-th type from the I-th (for N runs at once)")
    parser.add_argument("--carry", help="survey.json whose verdicts stand in for the types the rows lack")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = Path(args.rows)
    if args.worker:
        worker(args.types.split(","), rows, args.timeout, args.generic)
        return
    from common import write_with_history

    from kiln.models.hf_config import SUPPORTED, all_types

    types = args.types.split(",") if args.types else all_types()
    if not args.types:
        random.Random(0).shuffle(types)  # a partial survey is a uniform sample; a given list runs in its order
    rows.parent.mkdir(parents=True, exist_ok=True)
    index, count = map(int, args.shard.split("/"))
    if args.retry and rows.is_file():
        again = set(args.retry.split(","))
        keep = [line for line in rows.read_text().splitlines()
                if line.strip() and normalise(json.loads(line))["stage"] not in again]
        rows.write_text("".join(line + "\n" for line in keep))
    if not args.report:
        run_all(types[index::count], rows, args.timeout, False)
    if args.generic and not args.report:
        run_all([t for t in types if t in SUPPORTED], rows, args.timeout, True)
    found = done_rows(rows)
    if args.carry:
        found |= carried_rows(Path(args.carry), found, types)
    summary = summarise(found, types)
    print(json.dumps(summary, indent=2))
    if args.no_write or args.types:
        return
    write_with_history(str(SUMMARY), {"summary": summary})
    verdicts = {t: {"stage": r["stage"], "cause": "" if r["stage"] == "ok" else cause(r),
                    "error": r.get("error", "")[:300], "family": r.get("family", "")}
                | ({"carried": r["carried"]} if r.get("carried") else {})
                for (t, generic), r in sorted(found.items()) if not generic}
    meta = {k: summary[k] for k in ("date", "torch", "transformers", "machine", "types_total", "types_surveyed",
                                    "types_measured_in_this_pass")}
    SURVEY.write_text(json.dumps({"survey": meta, "types": verdicts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
