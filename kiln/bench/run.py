"""`kiln bench`: a model on a backend, under LoadGen, on its dataset's real test samples, with
the roofline bound of one model call on this machine beside the measured figure."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from kiln.bench.loadgen import BenchConfig, Samples, Scenario, dataset_samples, run_loadgen
from kiln.compile.backends import build, parse_backend, precision_of
from kiln.compile.run import COMPILE_FILE, is_compiled, load_compiled, roofline_of
from kiln.errors import KilnError, first_line
from kiln.hardware.profiles import fraction_note
from kiln.runs.artifact import load_source
from kiln.train.tasks import forward


def real_inputs(source, samples: Samples, batch: int):
    """The source's LoadedModel with one real batch of the dataset as its example inputs."""
    x = samples.batch(list(range(min(batch, len(samples.inputs)))), pad_to=batch)
    loaded = dataclasses.replace(source.loaded, model=source.model)
    if isinstance(x, dict):
        return dataclasses.replace(loaded, example_inputs=(), example_kwargs=x)
    return dataclasses.replace(loaded, example_inputs=(x,), example_kwargs={})


def prepare(src: str, batch: int, backend: str | None, dataset: str | None, max_samples: int,
            progress: Callable[[str], None] = lambda s: None):
    """(callable, label, precision, samples, LoadedModel at a real batch) for a compile dir or a source."""
    compiled = is_compiled(Path(src))
    if compiled and backend:
        raise KilnError(f"{src} is a kiln compile directory with its own backend; drop --backend")
    source = None if compiled else load_source(src, dataset)
    if compiled:
        meta_src = json.loads((Path(src) / COMPILE_FILE).read_text())["src"]
        source = load_source(meta_src, dataset)
    name = dataset or source.dataset
    if not name:
        raise KilnError(f"{src} names no dataset: pass --dataset (see `kiln datasets`)")
    progress(f"loading {name}")
    samples = dataset_samples(name, max_samples)
    loaded = real_inputs(source, samples, batch)
    try:
        with torch.no_grad():
            forward(source.model.eval(), loaded.example_kwargs or loaded.example_inputs[0])
    except Exception as exc:
        raise KilnError(f"dataset {name} does not fit {src}: {type(exc).__name__}: {first_line(exc)}") from None
    progress("building the backend")
    if compiled:
        fn, loaded, meta, _ = load_compiled(src, inputs=lambda s: real_inputs(s, samples, batch))
        return fn, meta["backend"], precision_of(parse_backend(meta["backend"])).value, samples, loaded
    spec = parse_backend(backend or "eager")
    return build(spec, source.model, loaded), spec.label, precision_of(spec).value, samples, loaded


def bench_run(src: str, config: BenchConfig, backend: str | None = None, dataset: str | None = None,
              profile=None, log_dir: Path | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    fn, label, precision, samples, loaded = prepare(src, config.model_batch, backend, dataset, config.max_samples, progress)
    progress(f"LoadGen {config.scenario.value}, {config.mode.value}")
    result = run_loadgen(fn, samples, config, log_dir)
    result.update(scenario=config.scenario.value, mode=config.mode.value, backend=label, src=src,
                  samples=len(samples.inputs))
    roof = roofline_of(loaded, profile)
    result["roofline"] = roof
    per_call = _per_call_s(result, config)
    # judged against the backend's own precision's peak (a bf16 backend against bf16's)
    bound = roof.get("roofline_s_by_precision", {}).get(precision, roof.get("roofline_s"))
    if bound and per_call:
        result["per_call_s"] = per_call
        result["roofline_fraction"] = bound / per_call
        if fraction_note(result["roofline_fraction"]):
            roof["note"] = fraction_note(result["roofline_fraction"])
    return result



def _per_call_s(result: dict, config: BenchConfig) -> float | None:
    """Seconds one model call took: from throughput where the SUT was saturated (Offline),
    from the mean latency where queries waited for nothing else (Single/MultiStream)."""
    if config.scenario is Scenario.OFFLINE and result.get("result_samples_per_second"):
        return config.model_batch / result["result_samples_per_second"]
    if config.scenario in (Scenario.SINGLE_STREAM, Scenario.MULTI_STREAM) and result.get("result_mean_latency_ns"):
        return result["result_mean_latency_ns"] / 1e9
    return None
