"""Choosing a backend by measurement: build every candidate, reject those whose outputs leave
their precision's tolerance against eager, time the rest side by side, keep the fastest.

Timing goes through kiln.timing: interleaved rounds (a short call preceded by an untimed one),
latency the median round, p90 the 90th percentile, a contended measurement measured again or
flagged. The choice is made in two measurements (`time_and_choose`):
- the first round times every accepted candidate interleaved;
- the final round times the finalists (every candidate within FINALIST_MARGIN of the first
  round's fastest) and any backend the caller names (`also`: the peers a figure compares auto
  with) interleaved in one measurement, and the choice is the final round's fastest. When its
  two fastest are within RUNOFF_MARGIN of each other, they all get `rounds` more rounds.
So auto's reported latency is its final-round figure, measured in the same rounds as every peer
it is compared with, and it is never slower there than any of them: it would have been chosen.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from kiln.compile.backends import (TOLERANCE, BackendSpec, Precision, build, missing_package, parse_backend,
                                   precision_of)
from kiln.compile.verify import relative_error
from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.timing import Measurement, TimingConfig, measure

# what `--backend auto` tries, by the lowest precision the user allows
AUTO = {
    Precision.FP32: ("eager", "export", "eager:passes=1", "inductor", "inductor:freezing=1",
                     "inductor:freezing=1,passes=1", "onnxruntime", "onnxruntime:level=basic", "openvino"),
    Precision.BF16: ("eager:dtype=bf16", "inductor:dtype=bf16,freezing=1"),
    Precision.INT8: ("torchao", "openvino:dtype=int8"),
}
ORDER = (Precision.FP32, Precision.BF16, Precision.INT8)
# a call shorter than this gets one untimed call before its timed one in each round
SHORT_CALL_S = 0.05
# the two fastest closer than this (relative) get a runoff
RUNOFF_MARGIN = 0.03
# candidates within this (relative) of the first round's fastest are re-timed in the final round.
# Why so wide: zoo:vit_tiny at batch 1 (2026-12-07, benchmarks/compile_figures.py) had OpenVINO
# 7 % behind ONNX Runtime at level basic in the first round (1.179 against 1.106 ms), and 23 %
# ahead of it re-timed (0.881 against 1.139 ms); at about 1 ms two rounds of 20 disagree by that much
FINALIST_MARGIN = 0.25


def auto_candidates(precision: Precision) -> list[str]:
    allowed = ORDER[:ORDER.index(precision) + 1]
    return [c for p in allowed for c in AUTO[p]]


@dataclass
class Candidate:
    backend: str
    precision: str
    status: str = "ok"                 # ok | rejected | failed
    reason: str = ""
    error: float | None = None         # relative error against eager
    tolerance: float | None = None
    build_s: float | None = None
    latency_s: float | None = None     # median over rounds
    min_s: float | None = None
    p90_s: float | None = None
    contended: bool = False            # still contended after measuring again (kiln.timing)
    throughput: float | None = None    # samples/s
    final: bool = False                # re-timed in the final round (its figures are from there)
    times: list[float] = field(default_factory=list, repr=False)


@dataclass
class Selection:
    batch: int | None
    threads: int
    rounds: int
    candidates: list[Candidate]
    chosen: str
    runoff: list[str] = field(default_factory=list)   # the close pair that doubled the final rounds
    fns: dict[str, Callable] = field(default_factory=dict, repr=False)
    note: str = ""                     # what to distrust in the timing ('' when clean)
    # the measurement the choice stands on: the final round (finalists and `also`), or the first
    # when it had only one candidate within the margin
    final: Measurement | None = field(default=None, repr=False)

    def by_name(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.backend == name)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "rounds": self.rounds, "chosen": self.chosen,
                "runoff": self.runoff, "timing_note": self.note,
                "final": [] if self.final is None else list(self.final.timings),
                "candidates": [{k: v for k, v in dataclasses.asdict(c).items() if k != "times"}
                               for c in self.candidates]}


def batch_dim_size(loaded: LoadedModel) -> int | None:
    """The batch size every tensor input shares in its first dimension, or None for inputs
    without one (a GNN's node features and edge list)."""
    tensors = [x for x in (*loaded.example_inputs, *loaded.example_kwargs.values()) if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] for x in tensors if x.dim() >= 1}
    return sizes.pop() if len(sizes) == 1 and all(x.dim() >= 1 for x in tensors) else None


def at_batch(loaded: LoadedModel, batch: int, seed: int = 0) -> LoadedModel:
    """The example inputs at batch `batch`: float inputs drawn afresh (seeded), integer ones
    (token ids, masks, timesteps) repeated, so they stay valid."""
    if batch < 1:
        raise KilnError(f"batch must be >= 1, got {batch}")
    if batch_dim_size(loaded) is None:
        if batch != 1:
            raise KilnError(f"{loaded.spec}: its inputs have no batch dimension (e.g. a whole graph); use --batch 1")
        return loaded
    gen = torch.Generator().manual_seed(seed)

    def grow(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn((batch, *x.shape[1:]), generator=gen, dtype=x.dtype)
        return x[:1].repeat(batch, *([1] * (x.dim() - 1)))

    return dataclasses.replace(loaded, example_inputs=tuple(grow(x) for x in loaded.example_inputs),
                               example_kwargs={k: grow(v) for k, v in loaded.example_kwargs.items()})


def call(fn: Callable, loaded: LoadedModel):
    with torch.no_grad():
        return fn(*loaded.example_inputs, **loaded.example_kwargs)


def time_and_choose(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int, also: Sequence[str] = (),
                    **timing) -> tuple[Measurement, Measurement]:
    """(first round, final round) of the choice (see the module docstring); the choice is the
    final round's fastest. `timing`: kiln.timing.measure's clock and load probe (tests)."""
    first = measure(calls, TimingConfig(rounds=rounds, warmup=warmup, short_call_s=SHORT_CALL_S), **timing)
    best = first[first.fastest()].median
    finalists = [k for k in calls if first[k].median <= best * (1 + FINALIST_MARGIN) or k in also]
    if len(finalists) < 2:
        return first, first
    final = measure({k: calls[k] for k in finalists},
                    TimingConfig(rounds=rounds, warmup=1, short_call_s=SHORT_CALL_S, runoff_margin=RUNOFF_MARGIN),
                    **timing)
    return first, final


def select(model: nn.Module, loaded: LoadedModel, backends: Sequence[str], precision: Precision = Precision.FP32,
           rounds: int = 20, warmup: int = 3, progress: Callable[[str], None] = lambda s: None,
           calibration: tuple = (), also: Sequence[str] = ()) -> Selection:
    """Build and check each backend on `loaded`'s inputs, time the accepted ones interleaved,
    re-time the close ones (and `also`, where accepted) in a final round, choose its fastest.
    A KilnError when nothing could run. `calibration`: input batches for the backends that
    calibrate int8 scales (kiln.compile.backends.build)."""
    specs = [parse_backend(b) for b in backends]
    model = model.eval()
    reference = call(model, loaded)
    batch = batch_dim_size(loaded)
    cands, fns = [], {}
    for spec in specs:
        cand, fn = _check(spec, model, loaded, reference, precision, progress, calibration)
        cands.append(cand)
        if fn is not None:
            fns[spec.label] = fn
    if not fns:
        reasons = "; ".join(f"{c.backend}: {c.reason}" for c in cands)
        raise KilnError(f"no backend could run {loaded.spec} within tolerance ({reasons})")
    progress(f"timing {len(fns)} candidates, {rounds} interleaved rounds, then the close ones again")
    first, final = time_and_choose({name: (lambda fn=fn: call(fn, loaded)) for name, fn in fns.items()}, rounds, warmup,
                                   [b for b in (parse_backend(a).label for a in also) if b in fns])
    by = {c.backend: c for c in cands}
    _record(first, by, batch or 1)
    if final is not first:
        _record(final, by, batch or 1)
        for name in final.timings:
            by[name].final = True
    note = "; ".join(f"{what}: {n}" for what, n in (("first round", first.note()), ("final round", final.note())) if n)
    return Selection(batch, final.threads, final.rounds, cands, final.fastest(), list(final.runoff), fns, note, final)


def _check(spec: BackendSpec, model, loaded, reference, precision: Precision, progress, calibration=()):
    prec = precision_of(spec)
    cand = Candidate(spec.label, prec.value, tolerance=TOLERANCE[prec])
    if ORDER.index(prec) > ORDER.index(precision):
        cand.status, cand.reason = "rejected", f"{prec.value} is below the allowed precision ({precision.value})"
        return cand, None
    if need := missing_package(spec):
        cand.status, cand.reason = "failed", f"{need} is not installed"
        return cand, None
    progress(f"building {spec.label}")
    t0 = time.perf_counter()
    try:
        fn = build(spec, model, loaded, calibration)
        out = call(fn, loaded)
    except KilnError as exc:
        cand.status, cand.reason = "failed", str(exc).removeprefix(spec.label + ": ")
        return cand, None
    cand.build_s = time.perf_counter() - t0
    cand.error = relative_error(out, reference)
    if not cand.error <= cand.tolerance:
        cand.status = "rejected"
        cand.reason = f"outputs differ from eager by {cand.error:.2e} (tolerance {cand.tolerance:.0e} for {prec.value})"
        return cand, None
    return cand, fn


def _record(m: Measurement, cands: dict[str, Candidate], batch: int) -> None:
    for name, t in m.timings.items():
        c = cands[name]
        c.times, c.latency_s, c.min_s, c.p90_s, c.contended = list(t.samples), t.median, t.min, t.p90, t.contended
        c.throughput = batch / t.median
