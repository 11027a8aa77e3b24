"""`plan(config)`: the planner's one verb. Loads the workload and the cluster, predicts every
plan, ranks those that fit, prices them, and finds the cheapest that meets a deadline."""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import KilnError
from kiln.hardware.profiles import HardwareProfile, load_profile
from kiln.plan.cluster import Cluster, load_cluster
from kiln.plan.emit import train_args
from kiln.plan.plans import Prediction, Predictor, Ranking, enumerate_plans, plan_for_mode, rank
from kiln.plan.prices import Budget, InstanceConfig, instance_for
from kiln.plan.workload import Workload, load_workload


@dataclass(frozen=True)
class PlanConfig:
    """What `kiln plan` was asked: a model on `devices` devices of `cluster` at a global batch
    of `global_batch` samples (sequences of `seq` tokens), for `steps` steps or `tokens` tokens,
    optionally by a deadline in hours, priced as `instance` (default: the cheapest that matches)."""

    spec: str
    cluster: str
    devices: int
    global_batch: int = 0          # 0: 8 samples per device
    seq: int | None = None
    steps: int | None = None
    tokens: float | None = None
    deadline_h: float | None = None
    instance: str | None = None
    from_config: bool = False
    efficiency: float = 1.0        # share of the device's peak FLOP/s its kernels reach (1: the roofline)

    def __post_init__(self):
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if self.global_batch < 0 or (self.seq is not None and self.seq < 1):
            raise ValueError("--global-batch must be >= 1 and --seq >= 1")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give --steps or --tokens, not both")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens <= 0):
            raise ValueError("--steps and --tokens must be > 0")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if self.deadline_h is not None and (self.deadline_h <= 0 or (self.steps is None and self.tokens is None)):
            raise ValueError("--deadline needs hours > 0 and --steps or --tokens (how much training must finish)")

    @property
    def batch(self) -> int:
        return self.global_batch or 8 * self.devices


@dataclass
class PlanReport:
    config: PlanConfig
    workload: Workload
    cluster: Cluster
    hardware: HardwareProfile
    ranking: Ranking
    steps: int | None
    instance: InstanceConfig | None
    cheapest: Prediction | None = None             # meeting the deadline, over device counts
    considered_devices: list[int] = field(default_factory=list)

    def hours(self, p: Prediction) -> float | None:
        return None if self.steps is None else self.steps * p.step_s / 3600

    def dollars(self, p: Prediction) -> float | None:
        h = self.hours(p)
        return None if h is None or self.instance is None else self.instance.cost(p.plan.devices, h)

    def command(self, p: Prediction) -> list[str]:
        return train_args(self.config.spec, p.plan, self.config.batch, self.cluster.config.devices_per_node)

    def row(self, p: Prediction) -> dict:
        return p.to_dict() | {"hours": self.hours(p), "usd": self.dollars(p), "devices": p.plan.devices}


def check_cluster(config: PlanConfig) -> tuple[Cluster, HardwareProfile]:
    """The cluster and its device profile, checked before the model loads."""
    cluster = load_cluster(config.cluster)
    if config.devices > cluster.max_devices:
        raise KilnError(f"--devices {config.devices} is more than {cluster.name} has ({cluster.max_devices}: "
                        f"{cluster.config.max_nodes} node(s) x {cluster.config.devices_per_node})")
    return cluster, load_profile(cluster.config.device)


def plan(config: PlanConfig, workload: Workload | None = None) -> PlanReport:
    cluster, hw = check_cluster(config)
    workload = workload or load_workload(config.spec, config.seq, config.from_config)
    budget = Budget(config.steps, config.tokens)
    steps = budget.steps_for(config.batch, workload.seq)
    instance = instance_for(cluster.config.device, config.instance) if cluster.name != "local" else None
    predictor = Predictor(workload, cluster, hw, config.batch, config.efficiency)
    ranking = rank([predictor.predict(p) for p in enumerate_plans(config.devices, config.batch)])
    report = PlanReport(config, workload, cluster, hw, ranking, steps, instance)
    if ranking.best is None:
        closest = ranking.rejected[0] if ranking.rejected else None
        why = f"; closest: {closest.plan.describe()}: {closest.reason}" if closest else ""
        raise KilnError(f"no plan fits {config.devices} {cluster.config.device} device(s) of {cluster.name} "
                        f"for {config.spec} at global batch {config.batch}{why}")
    if config.deadline_h is not None:
        report.cheapest, report.considered_devices = _cheapest(config, workload, cluster, hw, steps)
    return report


def _cheapest(config: PlanConfig, workload, cluster, hw, steps: int) -> tuple[Prediction | None, list[int]]:
    """The fitting plan of least cost (least device-hours where no price is known) finishing
    within the deadline, over device counts N, N/2, N/4, ... that divide the global batch."""
    counts, n = [], config.devices
    while n >= 1:
        if config.batch % n == 0:
            counts.append(n)
        n = n // 2 if n % 2 == 0 else 0
    instance = instance_for(cluster.config.device, config.instance) if cluster.name != "local" else None
    best, best_cost = None, None
    for n in counts:
        predictor = Predictor(workload, cluster, hw, config.batch, config.efficiency)
        ranking = rank([predictor.predict(p) for p in enumerate_plans(n, config.batch)])
        for p in ranking.fitting:
            hours = steps * p.step_s / 3600
            if hours > config.deadline_h:
                continue
            cost = instance.cost(n, hours) if instance else n * hours
            if best_cost is None or cost < best_cost:
                best, best_cost = p, cost
    return best, counts


def predict_mode(spec: str, mode: str, nproc: int, global_batch: int, cluster: str | Cluster = "local",
                 workload: Workload | None = None, microbatches: int = 0, efficiency: float = 1.0,
                 overheads: dict[str, float] | None = None) -> Prediction:
    """The planner's prediction for a `kiln train --parallel MODE --nproc N` run on this machine
    (or another cluster): what a measured step time of that run is compared with. `efficiency`:
    the share of peak the model's kernels reach (kiln.plan.plans.calibrated_efficiency);
    `overheads`: each mode's engine overhead per step (kiln.plan.overhead)."""
    cluster_obj = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    hw = load_profile(cluster_obj.config.device)
    workload = workload or load_workload(spec)
    plan = plan_for_mode(mode, nproc, global_batch, microbatches)
    return Predictor(workload, cluster_obj, hw, global_batch, efficiency, overheads=overheads).predict(plan)
