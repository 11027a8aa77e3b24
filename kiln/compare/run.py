"""`compare_run`: the whole matrix, cell by cell, resumable, then the report.

OUT/
  config.json                     the CompareConfig (a resumed run must train the same way)
  base/MODEL/                     the base run of each model (kiln run directory)
  cells/MODEL/OPT/                each optimisation's artifact
  cells/MODEL/OPT.json            the cell's record, written atomically once it is measured:
                                  its presence is what "done" means (OPT 'none' is the baseline);
                                  a cell measured without latency gets one, and only that, when
                                  a run with latency on resumes it (build the matrix under load
                                  with --no-latency, add the latencies on a quiet machine)
  compare.json, report.html/.md/.json, figures/   the results, rewritten at the end
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from kiln.compare.cell import costs, make_artifact, make_base, measure, measure_latency, slug
from kiln.compare.config import BASELINE, OPTIMIZATIONS, CompareConfig
from kiln.compare.observe import observations
from kiln.compare.render import render
from kiln.config import to_dict
from kiln.errors import KilnError, first_line
from kiln.hardware.calibrate import calibrate
from kiln.hardware.profiles import available, load_profile
from kiln.io import atomic_write_json, check_new_dir
from kiln.models.zoo import ZOO

CONFIG_FILE = "config.json"
RESULTS_FILE = "compare.json"
# what must match for a resumed run's finished cells to stand beside new ones
SAME_ON_RESUME = ("train_steps", "train_lr", "finetune_steps", "finetune_lr", "batch_size", "calib_batches",
                  "recipes")


def cell_path(out: Path, model: str, opt: str) -> Path:
    return out / "cells" / slug(model) / f"{slug(opt)}.json"


def load_profiles(names: tuple[str, ...], log: Callable[[str], None]) -> dict:
    """Each named profile; 'local' is this machine's saved calibration, else a quick one kept to
    this run (not saved: a busy machine's peaks must not become the profile)."""
    profiles = {}
    for name in names:
        if name == "local" and "local" not in available():
            log("no saved 'local' profile: calibrating this machine for 2 s (not saved)")
            profiles[name] = calibrate("local", budget_s=2.0).profile
        else:
            profiles[name] = load_profile(name)
    return profiles


def check_out(out: Path, cfg: CompareConfig, resume: bool) -> None:
    """A new (or empty) directory, or with --resume one this command started with the same training."""
    if not resume:
        check_new_dir(out)
        return
    path = out / CONFIG_FILE
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise KilnError(f"--resume: {out} is not a kiln compare directory (no {CONFIG_FILE})")
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise KilnError(f"{path} is corrupt: not JSON") from None
    new = to_dict(cfg)
    for key in SAME_ON_RESUME:
        if old.get(key) != new.get(key):
            raise KilnError(f"--resume: {out} was run with {key} = {old.get(key)}, not {new.get(key)}; "
                            f"give the same value or another --out")


def compare_run(cfg: CompareConfig, out: Path, resume: bool = False, log: Callable[[str], None] = lambda s: None,
                progress: Callable[..., None] = lambda message, fraction=None: None) -> dict:
    """Run every (model, optimisation) cell not done yet, then write the results and report."""
    out = Path(out)
    check_out(out, cfg, resume)
    profiles = load_profiles(cfg.hardware, log)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, to_dict(cfg))
    names = [BASELINE, *cfg.optimizations]
    total, done, ran, timed = len(cfg.models) * len(names), 0, 0, 0
    t0 = time.monotonic()
    for model in cfg.models:
        base = out / "base" / slug(model)
        for name in names:
            path = cell_path(out, model, name)
            progress(f"{model} x {name}", done / total if done else None)
            if not path.is_file():
                atomic_write_json(path, _cell(model, name, base, out, profiles, cfg, log))
                ran += 1
            elif cfg.latency:
                timed += _add_latency(path, model, name, base, out, profiles, cfg, log)
            done += 1
    cells = [json.loads(cell_path(out, m, n).read_text()) for m in cfg.models for n in names]
    results = {"config": to_dict(cfg), "hardware": {n: {"peak_flops": p.peak_flops, "memory_bandwidth":
                                                         p.memory_bandwidth, "sources": p.sources}
                                                     for n, p in profiles.items()},
               "cells": cells, "observations": observations(cells, cfg), "cells_run": ran,
               "cells_resumed": total - ran, "latencies_added": timed, "wall_s": time.monotonic() - t0}
    atomic_write_json(out / RESULTS_FILE, results)
    render(results).write(out)
    return results


def _cell(model: str, name: str, base: Path, out: Path, profiles: dict, cfg: CompareConfig, log) -> dict:
    """One cell's record; a capability's refusal (no data, nothing to prune) is recorded as
    the cell's error, and the matrix goes on."""
    record = {"model": model, "optimization": name}
    try:
        if not base.is_dir():
            record["base"] = make_base(model, cfg, base, log)
        if name == BASELINE:
            return record | _family(model) | measure(None, base, base, profiles, cfg)
        opt = OPTIMIZATIONS.get(name)
        artifact = out / "cells" / slug(model) / slug(name)
        if not artifact.is_dir():   # made before a stop that came before its measurements
            log(f"{model}: {name}")
            record["made"] = _what_it_did(make_artifact(opt, model, base, artifact, cfg))
        return record | _family(model) | measure(opt, base, artifact, profiles, cfg)
    except Exception as exc:   # one cell's failure (a refusal, an op a backend lacks) must not stop the matrix
        why = first_line(exc) if isinstance(exc, KilnError) else f"{type(exc).__name__}: {first_line(exc)}"
        log(f"{model} x {name}: {why}")
        return record | _family(model) | {"error": why}


def _add_latency(path: Path, model: str, name: str, base: Path, out: Path, profiles: dict, cfg: CompareConfig,
                 log) -> int:
    """Measure the latency of a finished cell that has none (it ran with --no-latency), and cost
    it again on this run's profiles (a 'local' calibrated since on a quiet machine replaces the
    quick one the cell was costed with); its metric and artifact are kept. 1 when it measured one."""
    cell = json.loads(path.read_text())
    if "error" in cell or cell.get("latency") is not None:
        return 0
    opt = None if name == BASELINE else OPTIMIZATIONS.get(name)
    artifact = base if opt is None else out / "cells" / slug(model) / slug(name)
    log(f"{model} x {name}: latency")
    recosted = costs(opt, base, artifact, profiles)[0]
    hardware = cell.get("hardware", {}) | recosted["hardware"]   # profiles this run lacks keep their costs
    atomic_write_json(path, cell | recosted | {"hardware": hardware,
                                               "latency": measure_latency(opt, artifact, base, cfg)})
    return 1


def _family(model: str) -> dict:
    if model.startswith("zoo:"):
        e = ZOO.get(model[4:].partition("?")[0])
        return {"family": e.family, "task": e.task}
    return {"family": model.partition(":")[0], "task": ""}


def _what_it_did(report: dict) -> dict:
    """What a capability reported, kept small: the keys that say what it did."""
    keep = ("passes", "changed", "method", "params_before", "params_after", "avg_weight_bits", "model_bytes",
            "fp32_bytes", "skipped")
    return {k: report[k] for k in keep if k in report}
