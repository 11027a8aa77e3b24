"""Structured pruning figures: physically smaller models, fine-tuned, timed beside the dense one.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/prune_structured.py EXP [EXP ...] [--json PATH]

EXP:
  groups   kiln's graph-derived channel groups against Torch-Pruning's DependencyGraph on zoo CNNs
           (cnn, resnet20, mobilenet_v2, efficientnet_lite0, c3d): is the partition the same?
  resnet   zoo:resnet20 on its default dataset (real MNIST digits at 32x32x3). The dense model is
           trained here when runs/prune/resnet20-dense is missing (recipe DENSE below). 50% of the
           channels of every prunable group are removed by kiln (graph-derived groups) and by
           Torch-Pruning (MagnitudePruner) with the same L1 importance, ratio and seed; both are
           fine-tuned with one recipe (FINETUNE, through the trainer, starting from a saved
           artifact); test accuracy, MACs (kiln.analysis) and batch-64 CPU latency (medians,
           interleaved rounds, threads stated) side by side.
  resnet-latency  time the saved `resnet` models again (rotating order), updating that entry
  minilm   MiniLM fine-tuned on Rotten Tomatoes (runs/figures/minilm-v3, from
           benchmarks/train_figures.py minilm): a third of every layer's heads and half of its FFN
           neurons removed by kiln (L1), fine-tuned with distillation from the dense model
           (MINILM_FT); test accuracy and batch 32 x 64 tokens latency beside the dense model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.runs.artifact import load_source, save_artifact  # noqa: E402
from kiln.runs.transforms import TransformRecord  # noqa: E402
from kiln.prune.structured import prune_structured, prune_transformer  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.trainer import fit  # noqa: E402
from kiln.timing import TimingConfig, measure  # noqa: E402

OUT = Path("runs/prune")
THREADS = 2
RESNET = dict(model="zoo:resnet20", dataset="mnist?size=32&channels=3")
DENSE = dict(**RESNET, epochs=15, lr=2e-3, batch_size=64, warmup_fraction=0.05, weight_decay=0.05, seed=0)
FINETUNE = dict(**RESNET, epochs=8, lr=1e-3, batch_size=64, warmup_fraction=0.05, weight_decay=0.05, seed=0)
MINILM_RUN = Path("runs/figures/minilm-v3")
MINILM = dict(model="zoo:minilm_cls", dataset="rotten-tomatoes?max_length=64")
MINILM_FT = dict(**MINILM, epochs=2, lr=5e-5, batch_size=16, warmup_fraction=0.1, weight_decay=0.01, grad_clip=1.0,
                 label_smoothing=0.1, seed=0, teacher=str(MINILM_RUN), distill_alpha=0.5, distill_temperature=2.0)


def train(cfg: dict, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    metrics = fit(TrainConfig(**cfg, out=str(out)), progress=sys.stderr.isatty())
    metrics["wall_s"] = time.perf_counter() - t0
    return {k: metrics[k] for k in ("metric", "after", "split", "params", "epochs", "steps", "wall_s")}


def macs(model: torch.nn.Module, inputs: tuple, kwargs: dict | None = None) -> int:
    """Multiply-accumulates of one forward, from kiln's cost pass on the captured graph (FLOPs / 2)."""
    from kiln.analysis.cost import AnnotateCost
    from kiln.graph.capture import capture
    from kiln.models.loaded import LoadedModel

    graph = capture(LoadedModel("bench", model.eval(), tuple(inputs), dict(kwargs or {})))
    return AnnotateCost()(graph).record.flops // 2


def latency(models: dict[str, torch.nn.Module], inputs: tuple, kwargs: dict | None = None,
            rounds: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median seconds per forward of each model, in kiln.timing's interleaved rounds (eval,
    no_grad; each round starts one model further, each short timed call follows an untimed one)."""
    kwargs = kwargs or {}
    for m in models.values():
        m.eval()
    m = measure({name: (lambda m=m: m(*inputs, **kwargs)) for name, m in models.items()},
                TimingConfig(rounds=rounds, warmup=warmup))
    if m.note():
        print(f"timing: {m.note()}", flush=True)
    return {name: m[name].median for name in models}


def artifact_from_shapes(pruned: torch.nn.Module, fresh: torch.nn.Module) -> dict:
    """A prune-structured record that rebuilds `pruned`'s shapes from `fresh` (first k indices of
    every shrunk dimension): how a peer's pruned model (Torch-Pruning) is saved as a kiln artifact,
    so both are fine-tuned by the same trainer recipe. The weights come from `pruned`."""
    big = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    keep = {}
    for name, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        dims = {str(d): list(range(n)) for d, (n, m) in enumerate(zip(t.shape, big[name].shape)) if n != m}
        if dims:
            keep[name] = dims
    return {"kind": "prune-structured", "keep": keep}


def torch_pruning(model: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    imp = tp.importance.MagnitudeImportance(p=1)   # L1, Torch-Pruning's default group mean / mean normaliser
    pruner = tp.pruner.MagnitudePruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model


def resnet() -> dict:
    from kiln.models.spec import load

    torch.set_num_threads(THREADS)
    dense_dir = OUT / "resnet20-dense"
    entry: dict = {"date": str(date.today()), "threads": THREADS, "dense_recipe": DENSE, "finetune_recipe": FINETUNE}
    if not (dense_dir / "model.safetensors").is_file():
        entry["dense_train"] = train(DENSE, dense_dir)
    dense = load_source(str(dense_dir)).model
    example = (torch.randn(1, 3, 32, 32),)
    res = prune_structured(dense, example, 0.5, "magnitude", ignore=("fc",))
    import copy

    tp_model = torch_pruning(copy.deepcopy(dense), example[0], 0.5)
    records = {"kiln": res.record, "torch_pruning": artifact_from_shapes(tp_model, load("zoo:resnet20").model)}
    pruned = {"kiln": res.model, "torch_pruning": tp_model}
    entry["dense"] = {"params": sum(p.numel() for p in dense.parameters()), "macs": macs(dense, example),
                      "test_accuracy": _test_metric(dense_dir)}
    models = {"dense": dense}
    for name, model in pruned.items():
        art = OUT / f"resnet20-{name}"
        if art.exists():
            shutil.rmtree(art)
        save_artifact(art, model, spec=RESNET["model"], dataset=RESNET["dataset"], transforms=[TransformRecord.from_flat(records[name])])
        before = _test_metric(art)
        ft = train({**FINETUNE, "init": str(art)}, OUT / f"resnet20-{name}-ft")
        models[name] = load_source(str(OUT / f"resnet20-{name}-ft")).model
        entry[name] = {"params": sum(p.numel() for p in model.parameters()), "macs": macs(model, example),
                       "test_accuracy_before_finetune": before, "finetuned": ft, "test_accuracy": ft["after"]}
    lat = latency(models, (torch.randn(64, 3, 32, 32),), rounds=60)
    for name in models:
        entry[name]["latency_b64_ms"] = lat[name] * 1e3
    for name in pruned:
        e = entry[name]
        e["speedup"] = lat["dense"] / lat[name]
        e["mac_reduction"] = entry["dense"]["macs"] / e["macs"]
        e["speedup_over_mac_reduction"] = e["speedup"] / e["mac_reduction"]
        e["accuracy_drop_points"] = 100 * (entry["dense"]["test_accuracy"] - e["test_accuracy"])
    _table("resnet20, 50% channels", entry, ["dense", *pruned])
    return entry


def resnet_latency(json_path: str, repeats: int = 5) -> dict:
    """Measure the `resnet` experiment's saved models again (latency fields only) and update its
    entry. kiln's and Torch-Pruning's models have the same layer shapes, so each is also timed
    beside a deep copy of itself: the gap between a model and its own copy is the noise floor
    that a kiln-vs-Torch-Pruning gap has to exceed to mean anything."""
    import copy
    import json

    torch.set_num_threads(THREADS)
    entry = json.loads(Path(json_path).read_text())["resnet"]
    models = {"dense": load_source(str(OUT / "resnet20-dense")).model}
    models |= {name: load_source(str(OUT / f"resnet20-{name}-ft")).model for name in ("kiln", "torch_pruning")}
    shapes = {name: [tuple(p.shape) for p in models[name].state_dict().values()] for name in ("kiln", "torch_pruning")}
    entry["same_shapes"] = shapes["kiln"] == shapes["torch_pruning"]
    copies = {f"{name} (copy)": copy.deepcopy(models[name]) for name in ("kiln", "torch_pruning")}
    runs = [latency(models | copies, (torch.randn(64, 3, 32, 32),), rounds=100) for _ in range(repeats)]
    lat = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    entry["latency_date"] = str(date.today())
    entry["latency_rounds"], entry["latency_repeats"] = 100, repeats
    for name in models:
        entry[name]["latency_b64_ms"] = lat[name] * 1e3
    for name in ("kiln", "torch_pruning"):
        e = entry[name]
        e["speedup"] = lat["dense"] / lat[name]
        e["speedup_over_mac_reduction"] = e["speedup"] / e["mac_reduction"]
        e["copy_latency_b64_ms"] = lat[f"{name} (copy)"] * 1e3
    entry["kiln_over_torch_pruning_per_repeat"] = [run["kiln"] / run["torch_pruning"] for run in runs]
    entry["model_over_own_copy_per_repeat"] = {n: [run[n] / run[f"{n} (copy)"] for run in runs]
                                               for n in ("kiln", "torch_pruning")}
    entry["kiln_over_torch_pruning"] = lat["kiln"] / lat["torch_pruning"]
    print(f"same shapes: {entry['same_shapes']}; kiln / Torch-Pruning latency per repeat "
          f"{[round(r, 4) for r in entry['kiln_over_torch_pruning_per_repeat']]}, ratio of the medians over repeats "
          f"{entry['kiln_over_torch_pruning']:.4f}; a model against its own copy: "
          + ", ".join(f"{n} {[round(r, 4) for r in v]}" for n, v in entry["model_over_own_copy_per_repeat"].items()))
    _table("resnet20, 50% channels", entry, ["dense", "kiln", "torch_pruning"])
    return entry


def groups() -> dict:
    """kiln's graph-derived groups against Torch-Pruning's DependencyGraph on zoo CNNs: the
    partition of conv/linear output channels (depthwise convs follow their input) into groups."""
    from torch import nn

    from kiln.models.spec import load
    from kiln.prune.structured import dependency_groups

    torch.set_num_threads(1)
    entry: dict = {"date": str(date.today())}
    for spec in ("zoo:cnn", "zoo:resnet20", "zoo:mobilenet_v2", "zoo:efficientnet_lite0", "zoo:c3d"):
        loaded = load(spec)
        model, x = loaded.model.eval(), loaded.example_inputs
        import torch_pruning as tp

        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[0])
        names = {m: n for n, m in model.named_modules()}
        theirs = set()
        for g in graph.get_all_groups(root_module_types=[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]):
            members = frozenset(names[d.target.module] for d, _ in g if d.handler.__name__ == "prune_out_channels"
                                and isinstance(d.target.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                                and getattr(d.target.module, "groups", 1) == 1)
            theirs |= {members} if members else set()
        ours = {frozenset(g.producers) for g in dependency_groups(model, x) if g.producers}
        entry[spec] = {"kiln_groups": len(ours), "torch_pruning_groups": len(theirs), "same_partition": ours == theirs,
                       "only_kiln": sorted(sorted(g) for g in ours - theirs)[:5],
                       "only_torch_pruning": sorted(sorted(g) for g in theirs - ours)[:5]}
        print(spec, entry[spec])
    return entry


def _test_metric(run: Path) -> float:
    """The test metric of any run, measured now."""
    from kiln.train.evaluation import evaluate_run

    return evaluate_run(run)["value"]


def minilm() -> dict:
    torch.set_num_threads(THREADS)
    if not (MINILM_RUN / "model.safetensors").is_file():
        sys.exit(f"{MINILM_RUN} is missing: train it first with `benchmarks/train_figures.py minilm --out runs/figures`"
                 " and move runs/figures/minilm to runs/figures/minilm-v3")
    src = load_source(str(MINILM_RUN))
    dense, kwargs = src.model, src.example_kwargs
    res = prune_transformer(dense, (), heads=1 / 3, ffn=0.5, criterion="magnitude", example_kwargs=kwargs)
    art = OUT / "minilm-heads-ffn"
    if art.exists():
        shutil.rmtree(art)
    save_artifact(art, res.model, spec=MINILM["model"], dataset=MINILM["dataset"], transforms=[res.record],
                  report=res.report)
    entry: dict = {"date": str(date.today()), "threads": THREADS, "finetune_recipe": MINILM_FT,
                   "dense": {"params": res.report["params_before"], "test_accuracy": _test_metric(MINILM_RUN)}}
    before = _test_metric(art)
    ft = train({**MINILM_FT, "init": str(art)}, OUT / "minilm-heads-ffn-ft")
    pruned = load_source(str(OUT / "minilm-heads-ffn-ft")).model
    entry["pruned"] = {"params": res.report["params_after"], "test_accuracy_before_finetune": before,
                       "finetuned": ft, "test_accuracy": ft["after"]}
    batch = {k: v.expand(32, -1).contiguous() for k, v in kwargs.items()}
    for name, m in (("dense", dense), ("pruned", pruned)):
        entry[name]["macs"] = macs(m, (), kwargs)
    lat = latency({"dense": dense, "pruned": pruned}, (), batch, rounds=20)
    for name in ("dense", "pruned"):
        entry[name]["latency_b32x64_ms"] = lat[name] * 1e3
    e = entry["pruned"]
    e["speedup"] = lat["dense"] / lat["pruned"]
    e["mac_reduction"] = entry["dense"]["macs"] / e["macs"]
    e["accuracy_drop_points"] = 100 * (entry["dense"]["test_accuracy"] - e["test_accuracy"])
    _table("MiniLM, 1/3 heads + 1/2 FFN", entry, ["dense", "pruned"])
    return entry


def _table(title: str, entry: dict, names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} ({entry['threads']} threads)")
    for col in ("model", "params", "MACs", "test acc", "latency ms", "speedup", "speedup / MAC red."):
        table.add_column(col)
    for name in names:
        e = entry[name]
        lat = e.get("latency_b64_ms", e.get("latency_b32x64_ms"))
        table.add_row(name, f"{e['params']:,}", f"{e['macs'] / 1e6:.1f} M", f"{100 * e['test_accuracy']:.2f}%",
                      f"{lat:.2f}", f"{e.get('speedup', 1.0):.2f}x",
                      f"{e['speedup_over_mac_reduction']:.2f}" if "speedup_over_mac_reduction" in e else "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=("resnet", "resnet-latency", "minilm", "groups"))
    parser.add_argument("--json", default="benchmarks/results/prune_structured.json")
    args = parser.parse_args()
    run = {"resnet": resnet, "resnet-latency": lambda: resnet_latency(args.json), "minilm": minilm, "groups": groups}
    for exp in args.experiments:
        merge_result(args.json, "resnet" if exp == "resnet-latency" else exp, run[exp]())


if __name__ == "__main__":
    main()
