"""Parallel plans: enumerate DP, ZeRO/FSDP stages, PP and TP (and 2-D combinations of two of
them), predict each plan's per-device memory and step time, and rank the ones that fit.

Step time of one optimizer step (global batch B = dp * m * b samples):
- compute: each op's roofline max(FLOPs / peak, bytes / bandwidth) on the cluster's device
  (the peak times a measured efficiency where one is given), divided by the TP degree; backward costs 2x forward (kiln.plan.workload); recomputation one
  more forward.
- pipeline: (m + p - 1) slots of the slowest stage's micro-batch time for GPipe and 1F1B,
  (m + (p - 1) / v) for interleaved 1F1B with v = 2 chunks (Narayanan et al., arXiv
  2104.04473, sec. 2.2); the difference to m slots is the bubble.
- tensor parallel: Megatron's 2 all-reduces per block in the forward and 2 in the backward
  (Shoeybi et al., arXiv 1909.08053, sec. 3) of b * the block's output, on the critical path.
- pipeline point-to-point: per micro-batch each stage sends its output forward (but the last)
  and its input's gradient back (but the first), on the critical path.
- data parallel: gradient all-reduce (stage 0), reduce-scatter + all-gather (stage 2) or
  per-micro-batch all-gathers in forward and backward plus a reduce-scatter (stage 3); stage 1
  as kiln's zero1 engine runs it (torch's ZeroRedundancyOptimizer under DDP): the gradient
  all-reduce, then one broadcast per parameter tensor from its owner after the update, exposed.
  Overlap, stated: DDP/ZeRO-1/2 communication hides behind the last micro-batch's backward,
  ZeRO-3's behind the whole step's compute (prefetching); only the excess is exposed. On a
  cluster whose devices share one machine's cores (local, gloo) nothing overlaps: the
  collectives run on the cores that compute.
- optimizer: reading and writing the device's model states once, at memory bandwidth.
- framework: where measured (kiln.plan.overhead), the seconds per step a mode's engine spends
  beyond the engine the efficiency was calibrated on (FSDP2's hooks and copies, DTensor's
  dispatch under TP), added as they are: they are per op, not per sample.
- processes sharing a machine's cores (local): each computes slower while the others compute
  (the cluster's measured contention, ClusterConfig.contention): the device's peak and
  bandwidth, and the engine overheads measured alone, scale by that slowdown at the plan's
  process count. The efficiency is calibrated on one process alone, where it is 1.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kiln.hardware.profiles import HardwareProfile
from kiln.plan.cluster import Cluster
from kiln.plan.collectives import Collective
from kiln.plan.memory import MemoryBreakdown, in_flight, model_state_bytes
from kiln.plan.workload import BACKWARD_PER_FORWARD, Workload

GB = 1e9


class Schedule(enum.Enum):
    NONE = "none"
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0                 # 0: DDP; 1: sharded optimizer; 2: + gradients; 3: FSDP (+ weights)
    microbatch: int = 1           # b: samples per micro-batch per pipeline
    microbatches: int = 1         # m: micro-batches per step (pipeline depth or gradient accumulation)
    schedule: Schedule = Schedule.NONE
    recompute: bool = False

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def layout(self) -> tuple:
        """What a plan is apart from its batch split and recomputation."""
        return (self.dp, self.tp, self.pp, self.zero, self.schedule)

    @property
    def mode(self) -> str:
        """The `kiln train --parallel` mode: ddp, zero1, fsdp, pp, tp or a 2-D pair like fsdp,tp."""
        dp = {0: "ddp", 1: "zero1", 2: "fsdp", 3: "fsdp"}[self.zero] if self.dp > 1 else ""
        parts = [p for p in (dp, "tp" if self.tp > 1 else "", "pp" if self.pp > 1 else "") if p]
        return ",".join(parts) or "single"

    def describe(self) -> str:
        bits = [f"dp{self.dp}" + (f" zero{self.zero}" if self.zero else "") if self.dp > 1 else "",
                f"tp{self.tp}" if self.tp > 1 else "",
                f"pp{self.pp} {self.schedule.value}" if self.pp > 1 else ""]
        text = " x ".join(b for b in bits if b) or "1 device"
        return f"{text}, b={self.microbatch} m={self.microbatches}" + (", recompute" if self.recompute else "")


@dataclass(frozen=True)
class Prediction:
    plan: Plan
    memory: MemoryBreakdown            # of the device that needs the most
    worst_device: int                  # its rank (pipeline stage k's first device is k * tp)
    device_memory: float
    step_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)   # compute, bubble, tp, pp, dp (exposed), optimizer
    dp_comm_s: float = 0.0             # the data-parallel communication before overlap
    reason: str = ""                   # why the plan cannot run ('' when it can)

    @property
    def fits(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict:
        p = self.plan
        return {"plan": p.describe(), "mode": p.mode, "dp": p.dp, "tp": p.tp, "pp": p.pp, "zero": p.zero,
                "microbatch": p.microbatch, "microbatches": p.microbatches, "schedule": p.schedule.value,
                "recompute": p.recompute, "fits": self.fits, "reason": self.reason, "step_s": self.step_s,
                "parts_s": self.parts, "dp_comm_s": self.dp_comm_s, "memory_bytes": self.memory.to_dict(),
                "worst_device": self.worst_device, "device_memory_bytes": self.device_memory}


# -- the pieces of a prediction ----------------------------------------------------------------


@dataclass(frozen=True)
class _Device:
    """What one device computes with: its share of the node where devices share a machine."""

    peak: float
    bandwidth: float
    memory: float


def device_of(cluster: Cluster, hw: HardwareProfile, devices: int, efficiency: float = 1.0,
              share: int | None = None) -> _Device:
    """The device's peak (times a measured `efficiency`, the share of peak its kernels reach),
    bandwidth and memory; where devices share a machine, each one's share of it (1/`share`,
    default: 1/devices up to the node's count), its peak and bandwidth divided again by the
    slowdown of `devices` processes computing at once (ClusterConfig.contention)."""
    c = cluster.config
    peak = hw.peak_for(c.precision.dtype)[0] * efficiency
    if not c.share_node:
        return _Device(peak, hw.memory_bandwidth, c.device_memory)
    share = share or min(devices, c.devices_per_node)
    # `devices` processes computing at once each run slower than one alone (cluster.slowdown)
    slow = share * cluster.slowdown(devices)
    return _Device(peak / slow, hw.memory_bandwidth / slow, c.device_memory / share)


def partition(costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `costs` into `stages` non-empty stages minimising the
    largest stage's sum (binary search on that sum with a greedy fill)."""
    n = len(costs)

    def fill(limit: float) -> list[tuple[int, int]] | None:
        out, start, acc = [], 0, 0.0
        for i, c in enumerate(costs):
            # close the stage when adding c breaks the limit, or when the rest need a stage each
            if i > start and (acc + c > limit or n - i == stages - len(out) - 1):
                out.append((start, i))
                start, acc = i, 0.0
            acc += c
        out.append((start, n))
        return out if len(out) == stages and max(sum(costs[a:b]) for a, b in out) <= limit * (1 + 1e-12) else None

    lo, hi = max(costs), sum(costs)
    best = fill(hi) or [(i * n // stages, (i + 1) * n // stages) for i in range(stages)]
    for _ in range(50):
        mid = (lo + hi) / 2
        got = fill(mid)
        if got:
            best, hi = got, mid
        else:
            lo = mid
    return best


class Predictor:
    """Predicts plans of one workload on one cluster at one global batch."""

    def __init__(self, workload: Workload, cluster: Cluster, hw: HardwareProfile, global_batch: int,
                 efficiency: float = 1.0, share: int | None = None, overheads: dict[str, float] | None = None):
        self.w, self.cluster, self.hw, self.batch = workload, cluster, hw, global_batch
        self.efficiency, self.share = efficiency, share
        # seconds per step a mode's engine spends beyond the calibrated one (kiln.plan.overhead)
        self.overheads = overheads or {}
        self.precision = cluster.config.precision
        # activations as analysed are at the workload's element width; train at the cluster's
        self.act_scale = self.precision.weight_bytes / workload.weight_bytes
        self._partition = lru_cache(maxsize=None)(lambda pp: partition([max(l.flops, 1.0) for l in self.w.layers], pp))

    def forward_s(self, layer_index: int, b: int, tp: int, dev: _Device) -> float:
        """One layer's forward roofline time on a micro-batch of b samples: the ops TP splits
        run on 1/tp of the work, the replicated ones (norms, residual adds, embeddings, heads
        in kiln's plans) whole on every rank."""
        total = 0.0
        for op in self.w.layers[layer_index].ops:
            t = max(b * op.flops / dev.peak, (b * op.bytes * self.act_scale + op.weight_bytes * self.act_scale) / dev.bandwidth)
            total += t if op.replicated and tp > 1 else t / tp
        return total

    def predict(self, plan: Plan) -> Prediction:
        dev = device_of(self.cluster, self.hw, plan.devices, self.efficiency, self.share)
        reason = self._infeasible(plan)
        if reason:
            return Prediction(plan, MemoryBreakdown(0, 0, 0, 0, 0), 0, dev.memory, reason=reason)
        stages = self._partition(plan.pp)
        memory, worst = self._memory(plan, stages, dev)
        pred = Prediction(plan, memory, worst, dev.memory)
        if memory.total > dev.memory:
            reason = (f"out of memory on device {worst} by {(memory.total - dev.memory) / GB:.2f} GB "
                      f"(needs {memory.total / GB:.2f} GB of {dev.memory / GB:.2f} GB)")
        return self._time(replace(pred, reason=reason), stages, dev)

    def _infeasible(self, plan: Plan) -> str:
        c = self.cluster
        if plan.devices > c.max_devices:
            return f"{plan.devices} devices exceed {c.name}'s {c.max_devices}"
        if plan.pp > len(self.w.layers):
            return f"a pipeline of {plan.pp} stages needs at least {plan.pp} layers; {self.w.name} has {len(self.w.layers)}"
        if plan.schedule is Schedule.INTERLEAVED and (len(self.w.layers) < 2 * plan.pp or plan.microbatches % plan.pp):
            return "interleaved 1F1B needs 2 layers per stage and micro-batches a multiple of the stages"
        return self.w.tp_error(plan.tp)

    def _memory(self, plan: Plan, stages, dev: _Device) -> tuple[MemoryBreakdown, int]:
        worst, worst_k = None, 0
        for k, (a, b) in enumerate(stages):
            layers = self.w.layers[a:b]
            params = sum(l.params for l in layers) / plan.tp
            states = model_state_bytes(params, self.precision, plan.zero, plan.dp)
            flight = in_flight(plan.schedule.value, plan.pp, plan.microbatches, k)
            mb = plan.microbatch * self.act_scale / plan.tp
            if plan.recompute:
                acts = flight * mb * sum(l.boundary_bytes for l in layers)
                temp = mb * max(l.activation_bytes for l in layers)
            else:
                acts, temp = flight * mb * sum(l.activation_bytes for l in layers), 0.0
            if plan.zero >= 3:   # the gathered layer: weights and gradients, unsharded
                temp += 2 * self.precision.weight_bytes * max(l.params for l in layers) / plan.tp
            m = MemoryBreakdown(states["weights"], states["gradients"], states["optimizer"], acts, temp)
            if worst is None or m.total > worst.total:
                worst, worst_k = m, k * plan.tp
        return worst, worst_k

    def _time(self, pred: Prediction, stages, dev: _Device) -> Prediction:
        plan, w, c = pred.plan, self.w, self.cluster
        grad_bytes = self.precision.weight_bytes
        per_mb, last_bwd, compute_total = [], [], 0.0
        for a, b in stages:
            fwd = sum(self.forward_s(i, plan.microbatch, plan.tp, dev) for i in range(a, b))
            bwd = BACKWARD_PER_FORWARD * fwd
            comp = fwd + bwd + (fwd if plan.recompute else 0.0)
            tp = sum(2 * w.layers[i].tp_collectives * c.time(
                Collective.ALL_REDUCE, plan.microbatch * w.layers[i].boundary_bytes * self.act_scale, plan.tp)
                for i in range(a, b))
            k = len(per_mb)
            p2p = (self._p2p(plan, w.layers[b - 1].boundary_bytes) if k < plan.pp - 1 else 0.0) + \
                  (self._p2p(plan, w.layers[a - 1].boundary_bytes) if k > 0 else 0.0)
            per_mb.append((comp, tp, p2p))
            last_bwd.append(bwd)
            compute_total = max(compute_total, comp * plan.microbatches)
        slot = max(sum(x) for x in per_mb)
        m, p = plan.microbatches, plan.pp
        slots = m + (p - 1) / 2 if plan.schedule is Schedule.INTERLEAVED else m + p - 1
        pipeline = slot * slots
        comp_slot = max(x[0] for x in per_mb)
        parts = {"compute": comp_slot * m, "bubble": slot * (slots - m),
                 "tp": max(x[1] for x in per_mb) * m, "pp": max(x[2] for x in per_mb) * m}
        # per stage: (what can hide behind the backward, what runs after the update)
        comms = [(self._dp_comm(plan, sum(l.params for l in w.layers[a:b]) / plan.tp * grad_bytes),
                  self._zero1_broadcasts(plan, w.layers[a:b])) for a, b in stages]
        hidden, after = max(h for h, _ in comms), max(x for _, x in comms)
        dp_comm = hidden + after
        window = 0.0 if c.config.share_node else (pipeline if plan.zero >= 3 else max(last_bwd))
        parts["dp"] = max(0.0, hidden - window) + after
        states = max(sum(model_state_bytes(sum(l.params for l in w.layers[a:b]) / plan.tp, self.precision,
                                           plan.zero, plan.dp).values()) for a, b in stages)
        parts["optimizer"] = 2 * states / dev.bandwidth
        # measured on one process alone: CPU work, slowed like the compute by its neighbours
        parts["framework"] = self.overheads.get(plan.mode, 0.0) * c.slowdown(plan.devices)
        return replace(pred, step_s=pipeline + parts["dp"] + parts["optimizer"] + parts["framework"], parts=parts,
                       dp_comm_s=dp_comm)

    def _p2p(self, plan: Plan, boundary: float) -> float:
        """One stage-to-stage message per micro-batch (the activation forward, or its gradient
        back). Under TP each of the t ranks sends 1/t of it and the receivers all-gather it over
        the node's links (Megatron-LM's scatter/gather, arXiv 2104.04473, sec. 4.1)."""
        size = plan.microbatch * boundary * self.act_scale
        # stages sit tp devices apart; once a pipeline outgrows a node, its slowest hop is the network
        per_node = self.cluster.config.devices_per_node
        stride = per_node if plan.tp * plan.pp > per_node else 1
        if plan.tp == 1:
            return self.cluster.time(Collective.P2P, size, 2, stride=stride)
        return (self.cluster.time(Collective.P2P, size / plan.tp, 2, stride=stride)
                + self.cluster.time(Collective.ALL_GATHER, size, plan.tp))

    def _dp_comm(self, plan: Plan, grad_bytes: float) -> float:
        """The data-parallel collectives that can hide behind the backward."""
        if plan.dp <= 1:
            return 0.0
        t = lambda op, n=1: n * self.cluster.time(op, grad_bytes, plan.dp, stride=plan.tp * plan.pp)
        if plan.zero in (0, 1):   # kiln's zero1 is DDP's gradient all-reduce under a sharded optimizer
            return t(Collective.ALL_REDUCE)
        if plan.zero == 2:
            return t(Collective.REDUCE_SCATTER, plan.microbatches) + t(Collective.ALL_GATHER)
        return t(Collective.ALL_GATHER, 2 * plan.microbatches) + t(Collective.REDUCE_SCATTER, plan.microbatches)

    def _zero1_broadcasts(self, plan: Plan, layers) -> float:
        """ZeRO-1 as kiln runs it (torch's ZeroRedundancyOptimizer under DDP, kiln.train.parallel.
        data): after each rank steps its partition, every parameter tensor is broadcast from its
        owner, one broadcast per tensor (parameters_as_bucket_view=False), once the step is
        done: nothing left to hide behind. A model of many small tensors pays a broadcast's
        latency per tensor, which the reduce-scatter + all-gather of DeepSpeed's stage 1 would not."""
        if plan.zero != 1 or plan.dp <= 1:
            return 0.0
        width = self.precision.weight_bytes
        return sum(self.cluster.time(Collective.BROADCAST, n / plan.tp * width, plan.dp, stride=plan.tp * plan.pp)
                   for layer in layers for n in layer.param_tensors)


def calibrated_efficiency(workload: Workload, cluster: Cluster, hw: HardwareProfile, batch: int,
                          step_s: float, share: int | None = None) -> float:
    """The efficiency (share of the device's peak FLOP/s) at which the planner's one-device
    plan of `batch` samples takes `step_s`, a measured step of the same model on one device
    (on a shared node: one process on 1/`share` of it, e.g. 1 thread of 2 cores -> share 2).
    Profiling one device and composing its figure with the collectives and schedules is how
    the multi-device prediction stays honest: nothing of a multi-device run enters it. 1 when
    the measured step beats the roofline."""
    at = lambda e: Predictor(workload, cluster, hw, batch, e, share).predict(Plan(microbatch=batch)).step_s
    if at(1.0) >= step_s:
        return 1.0
    lo, hi = 1e-6, 1.0          # the step time falls as the efficiency rises: bisect on it
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if at(mid) > step_s else (lo, mid)
    return hi


# -- enumeration -------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(devices: int, global_batch: int, max_microbatch: int = 64) -> list[Plan]:
    """Every plan on `devices` devices: dp x tp x pp = devices with at most two of them above 1,
    ZeRO stages 0-3 for dp > 1 (0-1 beside a pipeline, as DeepSpeed allows), the three
    schedules for pp > 1, micro-batch sizes b (powers of two) that split the batch, with and
    without recomputation."""
    plans = []
    for dp in _divisors(devices):
        for tp in _divisors(devices // dp):
            pp = devices // dp // tp
            if sum(x > 1 for x in (dp, tp, pp)) > 2 or global_batch % dp:
                continue
            per_replica = global_batch // dp
            zeros = ((0, 1) if pp > 1 else (0, 1, 2, 3)) if dp > 1 else (0,)
            schedules = (Schedule.GPIPE, Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED) if pp > 1 else (Schedule.NONE,)
            sizes = [b for b in (2 ** i for i in range(int(math.log2(max_microbatch)) + 1))
                     if b <= per_replica and per_replica % b == 0]
            for zero in zeros:
                for schedule in schedules:
                    for b in sizes:
                        for recompute in (False, True):
                            plans.append(Plan(dp, tp, pp, zero, b, per_replica // b, schedule, recompute))
    return plans


@dataclass(frozen=True)
class Ranking:
    fitting: list[Prediction]          # fastest first
    rejected: list[Prediction]         # per layout, its closest variant, with the reason

    @property
    def best(self) -> Prediction | None:
        return self.fitting[0] if self.fitting else None


def rank(predictions: list[Prediction]) -> Ranking:
    """The fitting plans, fastest first (the best variant of each layout), and one rejection per
    layout none of whose variants fits: the one that comes closest."""
    best: dict[tuple, Prediction] = {}
    closest: dict[tuple, Prediction] = {}
    for p in predictions:
        key = p.plan.layout
        if p.fits:
            if key not in best or p.step_s < best[key].step_s:
                best[key] = p
        elif key not in closest or _overflow(p) < _overflow(closest[key]):
            closest[key] = p
    rejected = [p for k, p in closest.items() if k not in best]
    return Ranking(sorted(best.values(), key=lambda p: p.step_s), sorted(rejected, key=_overflow))


def _overflow(p: Prediction) -> float:
    """How far a rejected plan is from fitting, in bytes (infinite when memory is not the reason)."""
    return p.memory.total - p.device_memory if p.reason.startswith("out of memory") else math.inf


def plan_for_mode(mode: str, nproc: int, global_batch: int, microbatches: int = 0) -> Plan:
    """The plan a `kiln train --parallel MODE --nproc N` run executes, for comparing a
    prediction with its measurement: ddp, zero1, fsdp (ZeRO-3), pp (1F1B, microbatches default
    2 * stages), tp, or a 2-D pair on a 2 x (N/2) mesh."""
    if mode in ("ddp", "zero1", "fsdp"):
        return Plan(dp=nproc, zero={"ddp": 0, "zero1": 1, "fsdp": 3}[mode], microbatch=global_batch // nproc)
    if mode == "pp":
        m = microbatches or 2 * nproc
        return Plan(pp=nproc, microbatch=global_batch // m, microbatches=m, schedule=Schedule.ONE_F_ONE_B)
    if mode == "tp":
        return Plan(tp=nproc, microbatch=global_batch)
    raise ValueError(f"unknown mode {mode!r}; accepted: ddp, zero1, fsdp, pp, tp")
