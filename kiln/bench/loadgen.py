"""MLPerf LoadGen: kiln is the system under test (SUT) and the query sample library (QSL).

LoadGen (PyPI mlcommons-loadgen, the official MLPerf harness) decides when queries arrive and
which samples they carry, times every one and judges whether the run is valid under its
scenario's rules; kiln answers them with a model running on a backend, from the model's real
dataset (test split). One call, `run_loadgen(fn, samples, config)`, returns LoadGen's own
result (read from its detail log) and, in accuracy mode, the task metric computed from its
accuracy log, the way MLPerf's accuracy scripts do.

Scenarios (MLPerf inference rules): SingleStream sends one sample and waits for it (the
p90 latency is the figure); MultiStream sends `samples_per_query` samples at once (p99 of
the query latency); Server sends single samples at Poisson-distributed times at `target_qps`
(valid when p99 stays under `target_latency_ms`); Offline sends every sample in one query
(samples/s). kiln shortens MLPerf's 600 s minimum duration to `min_duration_s` and says so.
"""
from __future__ import annotations

import enum
import json
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kiln.data import load_dataset
from kiln.errors import KilnError
from kiln.timing import TimingConfig, measure, percentile
from kiln.train.tasks import forward


class Scenario(enum.Enum):
    SINGLE_STREAM = "SingleStream"
    MULTI_STREAM = "MultiStream"
    SERVER = "Server"
    OFFLINE = "Offline"


class Mode(enum.Enum):
    PERFORMANCE = "performance"
    ACCURACY = "accuracy"


@dataclass(frozen=True)
class BenchConfig:
    scenario: Scenario
    mode: Mode = Mode.PERFORMANCE
    batch: int = 0                     # Offline/Server: samples per model call (0: scenario default)
    samples_per_query: int = 0         # MultiStream only (0: MLPerf's 8)
    target_qps: float = 0.0            # Server only: required
    target_latency_ms: float = 0.0     # Server only (0: no bound)
    expected_qps: float = 0.0          # Offline only: LoadGen sizes the query from it (0: measured first)
    expected_latency_ms: float = 0.0   # SingleStream/MultiStream hint (0: measured first)
    min_duration_s: float = 10.0
    min_queries: int = 0
    max_samples: int = 1024            # QSL size cap (the dataset's test split, first N)

    def __post_init__(self):
        only = {"samples_per_query": Scenario.MULTI_STREAM, "target_qps": Scenario.SERVER,
                "target_latency_ms": Scenario.SERVER, "expected_qps": Scenario.OFFLINE}
        for name, scenario in only.items():
            if getattr(self, name) and self.scenario is not scenario:
                raise KilnError(f"--{name.replace('_', '-')} is a {scenario.value} setting; "
                                f"the {self.scenario.value} scenario does not allow it")
        if self.batch and self.scenario in (Scenario.SINGLE_STREAM, Scenario.MULTI_STREAM):
            raise KilnError(f"--batch is for Offline and Server; {self.scenario.value} sets its own "
                            f"(1 sample, or --samples-per-query)")
        if self.scenario is Scenario.SERVER and self.mode is Mode.PERFORMANCE and self.target_qps <= 0:
            raise KilnError("the Server scenario needs --target-qps > 0")
        for name in ("batch", "samples_per_query", "min_queries", "max_samples"):
            if getattr(self, name) < 0 or (name == "max_samples" and self.max_samples < 1):
                raise KilnError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.min_duration_s <= 0:
            raise KilnError(f"--min-duration must be > 0 s, got {self.min_duration_s}")

    @property
    def model_batch(self) -> int:
        if self.scenario is Scenario.MULTI_STREAM:
            return self.samples_per_query or 8
        if self.scenario is Scenario.SINGLE_STREAM:
            return 1
        return self.batch or (1 if self.scenario is Scenario.SERVER else 32)


@dataclass
class Samples:
    """The QSL's data: inputs (one per sample, collated into batches on demand) and labels."""
    inputs: list
    labels: list

    def batch(self, indices: Sequence[int], pad_to: int = 0):
        idx = list(indices) + [indices[-1]] * max(0, pad_to - len(indices))
        return _collate([self.inputs[i] for i in idx])


def _collate(items: list):
    first = items[0]
    if isinstance(first, dict):
        return {k: torch.stack([it[k] for it in items]) for k in first}
    return torch.stack(items)


def dataset_samples(dataset: str, max_samples: int, seed: int = 0) -> Samples:
    """The first `max_samples` of the dataset's test split, kept in memory (MLPerf's QSL loads
    its performance set into RAM before timing starts)."""
    splits = load_dataset(dataset, seed=seed)
    if splits.task == "node-classification":
        raise KilnError(f"dataset {dataset} is one whole graph, not independent samples: LoadGen needs samples")
    test = splits.test
    n = min(len(test), max_samples)
    items = [test[i] for i in range(n)]
    return Samples([x for x, _ in items], [y for _, y in items])


def predictions(out: torch.Tensor) -> np.ndarray:
    """What the SUT reports per sample: the class index (argmax of the last dimension)."""
    return out.argmax(-1).to(torch.int64).reshape(out.shape[0], -1).numpy()


class SUT:
    """Answers LoadGen's queries. Offline, SingleStream and MultiStream queries are run in
    LoadGen's issue thread in batches of `batch` (the last one padded, so compiled backends see
    one shape); Server queries go to a worker thread that batches whatever has arrived."""

    def __init__(self, fn: Callable, samples: Samples, batch: int, server: bool):
        import mlperf_loadgen as lg

        self.lg, self.fn, self.samples, self.batch = lg, fn, samples, batch
        self.server = server
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, daemon=True) if server else None
        self.errors: list[str] = []

    def issue(self, query_samples) -> None:
        if self.server:
            for q in query_samples:
                self.queue.put(q)
            return
        for start in range(0, len(query_samples), self.batch):
            self._run(query_samples[start:start + self.batch])

    def _serve(self) -> None:
        while True:
            q = self.queue.get()
            if q is None:
                return
            group = [q]
            while len(group) < self.batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                group.append(nxt)
            self._run(group)

    def _run(self, group) -> None:
        try:
            x = self.samples.batch([q.index for q in group], pad_to=self.batch)
            with torch.no_grad():   # grad mode is per thread: the SUT's threads need their own
                pred = predictions(forward(self.fn, x))[:len(group)]
        except Exception as exc:          # report it and answer, or LoadGen waits forever
            self.errors.append(f"{type(exc).__name__}: {exc}")
            pred = np.full((len(group), 1), -1, dtype=np.int64)
        rows = [np.ascontiguousarray(p) for p in pred]
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(q.id, r.ctypes.data, r.nbytes)
                                      for q, r in zip(group, rows)])

    def __enter__(self):
        if self.worker:
            self.worker.start()
        return self

    def __exit__(self, *exc):
        if self.worker:
            self.queue.put(None)
            self.worker.join()


def _settings(config: BenchConfig, calibration_s: float, n: int):
    import mlperf_loadgen as lg

    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, config.scenario.value)
    s.mode = lg.TestMode.AccuracyOnly if config.mode is Mode.ACCURACY else lg.TestMode.PerformanceOnly
    s.min_duration_ms = int(config.min_duration_s * 1000)
    s.min_query_count = config.min_queries or 1
    if config.scenario is Scenario.SINGLE_STREAM:
        s.single_stream_expected_latency_ns = int((config.expected_latency_ms / 1e3 or calibration_s) * 1e9)
    elif config.scenario is Scenario.MULTI_STREAM:
        s.multi_stream_samples_per_query = config.model_batch
        s.multi_stream_expected_latency_ns = int((config.expected_latency_ms / 1e3 or calibration_s) * 1e9)
    elif config.scenario is Scenario.SERVER:
        s.server_target_qps = config.target_qps or 1.0
        if config.target_latency_ms:
            s.server_target_latency_ns = int(config.target_latency_ms * 1e6)
    else:
        s.offline_expected_qps = config.expected_qps or config.model_batch / calibration_s
    s.performance_sample_count_override = n
    return s


def run_loadgen(fn: Callable, samples: Samples, config: BenchConfig, log_dir: Path | None = None) -> dict:
    """Run one LoadGen test; LoadGen's result keys (validity, latencies in ns, samples/s,
    early stopping) plus, in accuracy mode, `accuracy` over the logged samples."""
    import mlperf_loadgen as lg

    batch = config.model_batch
    n = len(samples.inputs)
    calibration_s = _calibrate(fn, samples, batch)
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory()
        log_dir = Path(tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = lg.LogSettings()
    log.log_output.outdir = str(log_dir)
    log.log_output.copy_summary_to_stdout = False
    log.enable_trace = False
    sut_impl = SUT(fn, samples, batch, server=config.scenario is Scenario.SERVER)
    with sut_impl:
        sut = lg.ConstructSUT(sut_impl.issue, lambda: None)
        qsl = lg.ConstructQSL(n, n, lambda ids: None, lambda ids: None)   # already in RAM
        try:
            lg.StartTestWithLogSettings(sut, qsl, _settings(config, calibration_s, n), log)
        finally:
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
    if sut_impl.errors:
        raise KilnError(f"the model failed during the LoadGen run: {sut_impl.errors[0]}")
    result = parse_detail(log_dir / "mlperf_log_detail.txt")
    result["model_batch"] = batch
    if config.mode is Mode.ACCURACY:
        result.update(accuracy_from_log(log_dir / "mlperf_log_accuracy.json", samples.labels))
    if tmp:
        tmp.cleanup()
    return result


def _calibrate(fn: Callable, samples: Samples, batch: int, calls: int = 3) -> float:
    """Warm the backend up at the run's batch (compiled backends compile here, not under the
    clock) and return seconds per call, LoadGen's expected latency or QPS when none is given."""
    idx = list(range(min(batch, len(samples.inputs))))
    x = samples.batch(idx, pad_to=batch)
    # a hint for LoadGen, not a figure: no re-measure, no untimed calls between the timed ones
    config = TimingConfig(rounds=calls, warmup=1, short_call_s=0.0, remeasure=False)
    return measure({"model": lambda: forward(fn, x)}, config)["model"].median


def parse_detail(path: Path) -> dict:
    """LoadGen's detail log is one `:::MLLOG {json}` record per line; keep the results."""
    wanted = ("result_", "early_stopping", "effective_scenario", "effective_test_mode", "effective_min_duration_ms",
              "effective_samples_per_query", "effective_target_qps", "num_errors", "loadgen_version")
    out: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        rec = json.loads(line[len(":::MLLOG "):])
        if rec.get("key", "").startswith(wanted):
            out[rec["key"]] = rec.get("value")
    out["valid"] = out.get("result_validity") == "VALID"
    return out


def accuracy_from_log(path: Path, labels: list) -> dict:
    """MLPerf's accuracy mode logs every response as hex bytes by QSL index; decode each
    prediction and compare it with the label."""
    records = json.loads(path.read_text())
    correct = total = 0
    for rec in records:
        pred = np.frombuffer(bytes.fromhex(rec["data"]), dtype=np.int64)
        label = torch.as_tensor(labels[rec["qsl_idx"]]).reshape(-1).numpy()
        correct += int((pred[:label.size] == label).sum())
        total += label.size
    if not total:
        raise KilnError(f"LoadGen logged no responses in {path}")
    return {"accuracy": correct / total, "accuracy_samples": len(records)}


def raw_loop(fn: Callable, samples: Samples, batch: int, seconds: float = 10.0, min_calls: int = 20) -> dict:
    """The same model calls LoadGen would make, in a plain timed Python loop (kiln.timing):
    batches of `batch` consecutive samples (padded like the SUT's), as many calls as fill
    `seconds` (at least `min_calls`); samples/s and per-call latency percentiles. The reference
    a harness's overhead is judged against."""
    n = len(samples.inputs)
    batches = [samples.batch(list(range(i, min(i + batch, n))), pad_to=batch) for i in range(0, n, batch)]
    turn = iter(range(1 << 62))
    per_call = _calibrate(fn, samples, batch)
    rounds = max(min_calls, int(seconds / max(per_call, 1e-9)))
    # LoadGen's calls come back to back: no untimed call between the timed ones
    m = measure({"raw": lambda: predictions(forward(fn, batches[next(turn) % len(batches)]))},
                TimingConfig(rounds=rounds, warmup=0, short_call_s=0.0))
    t = m["raw"]
    times = t.samples
    return {"samples_per_second": batch * len(times) / sum(times), "calls": len(times),
            "mean_latency_s": sum(times) / len(times), "p50_latency_s": t.median, "p90_latency_s": t.p90,
            "p99_latency_s": percentile(times, 99), "timing": t.to_dict(), "timing_note": m.note()}
