"""`kiln models`: the zoo, with each model's family, task, dataset and default input;
`kiln models --hf`: every transformers model type hf-config builds, with the survey's verdict."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, si, user_errors, validate, write_json


@user_errors
def models(
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the list as JSON here."),
    hf: bool = typer.Option(False, "--hf", help="List every transformers model type hf-config builds, "
                            "with whether it captures with FLOPs exact (from the last survey) and why not."),
) -> None:
    """List the zoo models (from their registered metadata: nothing is built)."""
    validate(json_path=json_path)
    if hf:
        _hf_types(json_path)
        return
    from kiln.models.zoo import entries

    rows = [{"name": e.name, "spec": f"zoo:{e.name}", "family": e.family, "task": e.task, "dataset": e.dataset,
             "default_input": e.default_input, "params": e.params, "description": e.description}
            for e in entries()]
    table = Table(title="kiln zoo")
    for col in ("spec", "family", "task", "params", "dataset", "default input"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["spec"], r["family"], r["task"], si(r["params"]), r["dataset"], r["default_input"])
    console.print(table)
    presets = _presets()
    console.print("Other specs: hf:PATH (local HF directory), hf-config:MODEL_TYPE[?key=value&...], py:FILE.py:FACTORY "
                  "(`kiln models --hf` lists the model types)")
    if json_path:
        write_json(json_path, {"models": rows, "presets": presets})


def _presets() -> list[dict]:
    """The published configurations (`preset:NAME`, kiln.models.presets), with their sources."""
    from kiln.models.presets import PRESETS

    rows = [{"spec": f"preset:{name}", "model_type": p.model_type, "params": p.params,
             "default_input": f"1x{p.length}" if p.inputs == "text" else f"1x3x{p.length}x{p.length}",
             "source": p.source, "note": p.note} for name, p in PRESETS.items()]
    table = Table(title="presets: published configurations at full size (analysed without weights)")
    for col in ("spec", "type", "params", "default input", "source"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["spec"], r["model_type"], si(r["params"]), r["default_input"], r["source"])
    console.print(table)
    return rows


def _hf_types(json_path: Optional[Path]) -> None:
    import transformers

    from kiln.models.hf_config import SUPPORTED, all_types
    from kiln.models.hf_config.survey import read_survey

    meta, verdicts = read_survey(all_types())
    table = Table(title=f"hf-config model types (transformers {transformers.__version__})")
    for col in ("type", "recipe", "captures", "FLOPs exact", "why not"):
        table.add_column(col)
    for v in verdicts:
        table.add_row(v.model_type, "yes" if v.model_type in SUPPORTED else "", _yes(v.captures, v),
                      _yes(v.stage == "ok", v), v.cause if v.stage != "ok" else "")
    console.print(table)
    ok = sum(v.stage == "ok" for v in verdicts)
    surveyed = sum(v.stage != "not surveyed" for v in verdicts)
    if meta:
        console.print(f"Survey of {meta.get('types_surveyed')} of {meta.get('types_total')} types made "
                      f"{meta.get('date')} with transformers {meta.get('transformers')}, torch {meta.get('torch')} "
                      f"({meta.get('machine')}{_carried(meta, verdicts)}); verdicts may differ with this transformers {transformers.__version__}. "
                      f"Re-run: python benchmarks/hf_types.py")
    else:
        console.print("No survey has been made: run python benchmarks/hf_types.py")
    console.print(f"{ok} of {surveyed} surveyed types capture with FLOPs exact against flop_counter; "
                  f"failures by cause: {dict(Counter(v.cause for v in verdicts if v.cause).most_common(6))}")
    if json_path:
        write_json(json_path, {"survey": meta, "types": [
            {"type": v.model_type, "recipe": v.model_type in SUPPORTED, "stage": v.stage, "captures": v.captures,
             "flops_exact": v.stage == "ok", "cause": v.cause, "error": v.error, "family": v.family,
             "carried": v.carried}
            for v in verdicts]})


def _carried(meta: dict, verdicts: list) -> str:
    carried = [v for v in verdicts if v.carried]
    if not carried:
        return ""
    return (f"; {meta.get('types_measured_in_this_pass')} measured in that pass, {len(carried)} kept "
            f"from the survey of {carried[0].carried}")


def _yes(flag: bool, verdict) -> str:
    return "?" if verdict.stage == "not surveyed" else ("yes" if flag else "no")
