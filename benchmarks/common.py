"""What every benchmark script shares: print the figures, and write them as JSON when asked."""
from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, json_path: str | None) -> None:
    for key, value in result.items():
        print(f"{key}: {value}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


def merge_result(json_path: str, name: str, entry: dict) -> None:
    """Set `name` in the JSON file of results, keeping the other experiments' entries. The file
    is re-read just before writing: several experiments may run one after another or at once."""
    path = Path(json_path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[name] = entry
    path.write_text(json.dumps(results, indent=2))


def write_with_history(json_path: str, result: dict, summary_key: str = "summary") -> None:
    """Write `result` to the JSON file, keeping every earlier run's summary (with its date) under
    "history": BENCHMARKS.md shows the current figure, the file keeps how it got there."""
    path = Path(json_path)
    history = []
    if path.is_file():
        old = json.loads(path.read_text())
        history = old.get("history", [])
        if summary_key in old:
            history.append(old[summary_key])
    path.write_text(json.dumps(result | {"history": history}, indent=2))
