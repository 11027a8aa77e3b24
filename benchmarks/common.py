"""What every benchmark script shares: print the figures, and write them as JSON when asked."""
from __future__ import annotations

import json


def report(result: dict, json_path: str | None) -> None:
    for key, value in result.items():
        print(f"{key}: {value}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
