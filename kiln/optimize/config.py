"""What `kiln optimize` is asked: the source, the target, the allowed drop and the objective."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kiln.errors import KilnError


class DropType(enum.Enum):
    ABSOLUTE = "absolute"    # in the metric's own units: accuracy 0.01 is one point
    RELATIVE = "relative"    # a fraction of the baseline's value: 0.01 is 1 %


class Goal(enum.Enum):
    LATENCY = "latency"
    SIZE = "size"
    ENERGY = "energy"


LOCAL = "local"
# the study's second objective for each goal: real latency on `local`, the roofline (a cost
# model) on any other profile; stored bytes; systolic-array energy (kiln.hw.systolic, the only
# energy kiln models: Horowitz ISSCC 2014 per-access energies)
GOAL_OBJECTIVE = {Goal.SIZE: "model_bytes", Goal.ENERGY: "systolic_energy_uj"}
# metrics a drop can be judged on; a task scored by its own training loss (a VAE, a diffusion
# model) has none: its loss is what it minimises, not how well it does its task
METRICS = {"accuracy": True, "perplexity": False}     # name -> higher is better
# the backends the baseline and the search time (eager:passes=1: kiln's graph passes; the final
# compile tries all of --backend auto)
FP32_BACKENDS = ("eager", "eager:passes=1", "onnxruntime")
INT8_BACKENDS = ("onnxruntime:dtype=int8",)


@dataclass(frozen=True)
class OptimizeConfig:
    src: str
    target: str = LOCAL
    max_drop: float = 0.01
    drop_type: DropType = DropType.ABSOLUTE
    objective: Goal = Goal.LATENCY
    budget_min: float = 10.0
    batch: int = 1
    seed: int = 0
    val_samples: int = 2000         # validation examples every trial is scored on (the first N)
    rounds: int = 7                 # interleaved timing rounds of a trial's latency (local)
    sparsity: tuple[float, ...] = (0.0, 0.5)
    budgets: tuple[float, ...] = (1.0, 0.5)
    bits: tuple[int, ...] = (8, 4)
    loadgen_s: float = 5.0          # LoadGen's minimum duration

    def __post_init__(self):
        checks = [
            (self.max_drop >= 0, f"--max-drop must be >= 0, got {self.max_drop}"),
            (self.drop_type is not DropType.RELATIVE or self.max_drop < 1,
             f"--max-drop {self.max_drop} is relative: a fraction below 1 (0.01 is 1 %)"),
            (self.budget_min > 0, f"--budget must be > 0 minutes, got {self.budget_min}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.val_samples >= 1 and self.rounds >= 1, "val_samples and rounds must be >= 1"),
            (self.loadgen_s > 0, "loadgen_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise KilnError(message)

    @property
    def local(self) -> bool:
        return self.target == LOCAL

    @property
    def cost_objective(self) -> str:
        """The search objective (kiln.search.objectives) the goal is measured by."""
        if self.objective is Goal.LATENCY:
            return "latency_ms" if self.local else "roofline_ms"
        return GOAL_OBJECTIVE[self.objective]

    def defining(self) -> dict:
        """What a resumed run must share with the run it continues (the budget may grow)."""
        return {"src": self.src, "target": self.target, "max_drop": self.max_drop,
                "drop_type": self.drop_type.value, "objective": self.objective.value, "batch": self.batch,
                "seed": self.seed, "val_samples": self.val_samples, "sparsity": list(self.sparsity),
                "budgets": list(self.budgets), "bits": list(self.bits)}


def parse_goal(text: str) -> Goal:
    try:
        return Goal(text)
    except ValueError:
        raise KilnError(f"unknown objective {text!r}; accepted: {', '.join(g.value for g in Goal)}") from None


def parse_drop_type(text: str) -> DropType:
    try:
        return DropType(text)
    except ValueError:
        raise KilnError(f"unknown --drop-type {text!r}; accepted: {', '.join(d.value for d in DropType)}") from None


@dataclass(frozen=True)
class Constraint:
    """The lowest (or, for perplexity, highest) metric value a result may have."""

    metric: str
    baseline: float
    limit: float
    higher_is_better: bool

    @classmethod
    def of(cls, metric: str, baseline: float, cfg: OptimizeConfig) -> Constraint:
        if metric not in METRICS:
            raise KilnError(f"{cfg.src} is scored by its {metric}, not a task metric: --max-drop needs a "
                            f"task with one ({', '.join(METRICS)})")
        up = METRICS[metric]
        allowed = cfg.max_drop if cfg.drop_type is DropType.ABSOLUTE else cfg.max_drop * abs(baseline)
        return cls(metric, baseline, baseline - allowed if up else baseline + allowed, up)

    def meets(self, value: float) -> bool:
        # a hair of float slack: the same model scored twice may round its mean differently
        return value >= self.limit - 1e-9 if self.higher_is_better else value <= self.limit + 1e-9

    def drop(self, value: float) -> float:
        """How much worse than the baseline (positive: worse), in the metric's units."""
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def miss(self, value: float) -> float:
        """How far beyond the limit (positive: misses)."""
        return self.limit - value if self.higher_is_better else value - self.limit

    def to_dict(self) -> dict:
        return {"metric": self.metric, "baseline": self.baseline, "limit": self.limit,
                "higher_is_better": self.higher_is_better}
