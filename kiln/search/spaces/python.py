"""A user's own define-by-run objective: `py:FILE.py:FUNC`, the way Optuna is used directly.

    [space]
    kind = "python"
    objective = "py:my_search.py:objective"   # objective(trial) or objective(trial, report)
    grid = { x = [1, 2, 3] }                  # optional: the choices the grid sampler walks

FUNC returns a dict of objective values ({"accuracy": 0.9, "model_bytes": 1e6}) or, for a
single-objective study, one number.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, first_line
from kiln.search.spaces import Report, Space, register_space


@dataclass(frozen=True)
class PythonConfig:
    objective: str = ""
    grid: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.objective.startswith("py:") or self.objective.count(":") < 2:
            raise KilnError(f"python space: objective needs 'py:FILE.py:FUNC', got {self.objective!r}")
        for name, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise KilnError(f"python space: grid.{name} needs a non-empty list of choices")


def load_function(ref: str):
    _, path, func = ref.split(":", 2)
    file = Path(path)
    if not file.is_file():
        raise KilnError(f"python space: {file} does not exist")
    name = f"kiln_search_user_{abs(hash(str(file.resolve())))}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:

            raise KilnError(f"python space: {file} does not import: {first_line(exc)}") from None
        sys.modules[name] = module
    fn = getattr(module, func, None)
    if not callable(fn):
        raise KilnError(f"python space: {file} has no function {func!r}")
    return fn


@register_space("python")
class PythonSpace(Space):
    Config = PythonConfig
    deterministic = False      # the user's function asks for its own parameters, inside score

    def setup(self) -> None:
        self.fn = load_function(self.config.objective)
        self.takes_report = len(inspect.signature(self.fn).parameters) >= 2

    def suggest(self, trial) -> Any:
        return trial            # the user's function asks the trial itself

    def score(self, trial, report: Report) -> dict:
        out = self.fn(trial, report) if self.takes_report else self.fn(trial)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            if len(self.ctx.wanted) != 1:
                raise KilnError("python space: a multi-objective study needs the objective to return a dict")
            return {next(iter(self.ctx.wanted)): float(out)}
        if not isinstance(out, dict):
            raise KilnError(f"python space: {self.config.objective} returned {type(out).__name__}, not a dict")
        return {k: float(v) for k, v in out.items()}

    def grid(self) -> dict[str, list] | None:
        return dict(self.config.grid) or None
