"""The survey of every model type (benchmarks/hf_types.py writes survey.json next to this file):
whether each type captures with torch.export with FLOPs exact against flop_counter, and if not,
why. Read as it was made: the date and versions travel with it, and a type this transformers
knows but the survey did not reach says so."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SURVEY = Path(__file__).with_name("survey.json")


@dataclass(frozen=True)
class Verdict:
    """One type: `stage` is ok, or where it failed (config, build, inputs, forward, capture,
    flops, timeout, crash), or "not surveyed"; `cause` groups failures; `error` the message;
    `carried` the date of an earlier survey whose verdict stands where this one did not reach."""

    model_type: str
    stage: str
    cause: str = ""
    error: str = ""
    family: str = ""
    carried: str = ""   # the date of the earlier survey this verdict was kept from, if it was

    @property
    def captures(self) -> bool:
        return self.stage in ("ok", "flops")


def read_survey(types: list[str], path: Path = SURVEY) -> tuple[dict, list[Verdict]]:
    """(the survey's metadata, one verdict per type in `types`); an empty survey if none was made."""
    data = json.loads(path.read_text()) if path.is_file() else {"survey": {}, "types": {}}
    found = data.get("types", {})
    verdicts = [Verdict(t, **found[t]) if t in found else Verdict(t, "not surveyed") for t in types]
    return data.get("survey", {}), verdicts
