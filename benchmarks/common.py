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
