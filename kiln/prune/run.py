"""`prune_run`: load a source, prune it, optionally fine-tune (with distillation from the
unpruned model) through the trainer, measure before and after, write a kiln run directory.

The run directory (kiln.runs.artifact) holds the pruned weights, the transform record that
rebuilds the architecture, report.json (per-layer sparsity or channels, parameters, FLOPs and
measured latency before and after) and metrics.json (kiln.runs.metrics: the test metric of the
dense source, of the pruned model, and after fine-tuning). Everything is written at the end,
atomically: a run that fails leaves nothing behind.

A quantized source is refused: its quantizers' scales were calibrated for the weights pruning
would change; prune first, then quantize.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kiln.analysis.oracle import flop_counter_flops
from kiln.errors import KilnError
from kiln.io import check_new_dir
from kiln.models.linear import as_torch_linears
from kiln.models.spec import load
from kiln.prune.config import Plan, PruneConfig, to_table
from kiln.prune.criteria import ScoreContext, needs_gradients
from kiln.prune.nm import check_nm, groupable, prune_nm
from kiln.prune.schedule import AGP, lottery_ratio, rewind
from kiln.prune.structured import prune_structured
from kiln.prune.unstructured import (
    PRUNABLE,
    gradients,
    make_permanent,
    prune_unstructured,
    sparsify_activations,
    sparsity_report,
)
from kiln.runs.artifact import load_source, require_float, save_source
from kiln.runs.metrics import metric_record
from kiln.runs.transforms import TransformRecord
from kiln.timing import TimingConfig, measure
from kiln.train import tasks
from kiln.train.evaluation import evaluate_model, labelled_batches, source_splits
from kiln.train.finetune import finetune


def prune_run(src: str, cfg: PruneConfig, out: str | Path, dataset: str | None = None, evaluate: bool = True,
              progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """Prune `src` (a spec or any float run directory) by `cfg` into the run directory `out`."""
    out = check_new_dir(out)
    source = require_float(load_source(src, dataset), "prune")
    as_torch_linears(source.model)   # the dense copies profiled beside the pruned one look the same
    model, plan = source.model, cfg.plan(source.model)
    splits = source_splits(source) if (source.dataset and (evaluate or _needs_data(cfg))) else None
    if _needs_data(cfg) and splits is None:
        raise KilnError(f"{cfg.method} pruning with {cfg.criterion} or fine-tuning needs data: pass --dataset")
    dense_model = make_permanent(copy.deepcopy(model)).eval()   # profiled now, timed beside the pruned one at the end
    before = storage(model) | profile(dense_model, source.loaded)
    measured = evaluate and splits is not None
    dense = evaluate_model(model, splits) if measured else None
    if dense:
        log(f"dense {dense[0]}: {dense[1]:.4f}")
    model, record, layers = _prune(model, cfg, plan, source, splits)
    if plan.activations:
        record["activations"] = sparsify_activations(model, plan.activations)
    pruned, history = None, None
    if cfg.finetune is not None:
        if measured and cfg.schedule == "oneshot":   # AGP and lottery prune while they train
            pruned = evaluate_model(model, splits)[1]
        model, record, layers, history = _finetune(model, cfg, plan, source, record, layers, progress)
    if not cfg.keep_masks:
        make_permanent(model)
    record["permanent"] = not cfg.keep_masks
    metrics = {}
    if measured:
        final = evaluate_model(model, splits)[1]
        log(f"pruned {dense[0]}: {final:.4f}")
        metrics = metric_record(dense[0], before=dense[1], after=final if cfg.finetune is None else pruned,
                                after_finetune=final if cfg.finetune is not None else None)
    metrics |= {"model": source.spec, "source": src, "dataset": source.dataset} | \
        ({"finetune": history} if history is not None else {})
    # storage first, then one permanent copy: removing a parametrization from a deep copy also
    # strips the property from the class the original shares, so a second copy would not run
    after = storage(model)
    pruned_model = make_permanent(copy.deepcopy(model)).eval()
    after |= profile(pruned_model, source.loaded)
    time_side_by_side(dense_model, pruned_model, source.loaded, before, after)
    report = {"source": src, "spec": source.spec, "dataset": source.dataset, "method": cfg.method,
              "config": to_table(cfg), "layers": layers, "skipped": record.get("skipped", []) + [
                  {"module": m, "reason": "a rule skips it"} for m in plan.skipped],
              "activations": record.get("activations", {}), "before": before, "after": after}
    save_source(out, source, model, TransformRecord.from_flat(record), report=report, metrics=metrics)
    return {"report": report, "metrics": metrics}


def _needs_data(cfg: PruneConfig) -> bool:
    return cfg.finetune is not None or needs_gradients(cfg.criterion)


def _context(model: nn.Module, cfg: PruneConfig, plan: Plan, splits) -> ScoreContext:
    ctx = ScoreContext(seed=cfg.seed)
    if cfg.method != "structured" and needs_gradients(cfg.criterion):
        loss = lambda m, x, y: tasks.batch_loss(m, splits.task, x, y)[0]   # noqa: E731
        batches = labelled_batches(splits, cfg.batches, cfg.batch_size, cfg.seed)
        ctx.grads = gradients(model, [*plan.targets, *plan.overrides], batches, loss)
    return ctx


def _prune(model: nn.Module, cfg: PruneConfig, plan: Plan, source, splits, ratio: float | None = None):
    """Dispatch on the method; (model, transform record, per-layer report)."""
    ratio = cfg.ratio if ratio is None else ratio
    if cfg.method == "structured":
        return _structured(model, cfg, plan, source, splits)
    ctx = _context(model, cfg, plan, splits)
    if cfg.method == "nm":
        result = _nm(model, cfg, plan, ctx)
    else:
        if cfg.schedule != "oneshot":   # AGP's ramp starts here; lottery rounds prune from dense
            ratio = cfg.agp_initial if cfg.schedule == "agp" else 0.0
        scale = _rule_scale(ratio, cfg)
        result = prune_unstructured(model, ratio, cfg.criterion, cfg.scope, targets=plan.targets,
                                    overrides={k: v * scale for k, v in plan.overrides.items()}, ctx=ctx)
    return result.model, result.record, result.report


def _rule_scale(ratio: float, cfg: PruneConfig) -> float:
    """How far along its schedule a step is, which a rule's own ratio follows too: 1 at the
    config's ratio (one-shot, or a schedule's end), even when that ratio is 0 and only rules prune."""
    return 1.0 if ratio == cfg.ratio else ratio / cfg.ratio


def _nm(model: nn.Module, cfg: PruneConfig, plan: Plan, ctx: ScoreContext):
    """N:M on the planned modules; one that cannot be grouped is skipped (and reported) unless
    a rule names it exactly, which makes it an error."""

    check_nm(cfg.n, cfg.m)
    named = {r.match.pattern for r in cfg.rules if r.match.kind == "fqn" and not r.skip}
    chosen, skipped = [], []
    for fqn in [*plan.targets, *plan.overrides]:
        reason = groupable(model.get_submodule(fqn), cfg.m)
        if reason and fqn in named:
            raise KilnError(f"module {fqn!r}: cannot prune {cfg.n}:{cfg.m}: {reason}")
        if reason:
            skipped.append({"module": fqn, "reason": reason})
        else:
            chosen.append(fqn)
    result = prune_nm(model, cfg.n, cfg.m, cfg.criterion, targets=chosen, ctx=ctx)
    result.record["skipped"] = skipped
    return result


def _structured(model: nn.Module, cfg: PruneConfig, plan: Plan, source, splits):
    """Channels, heads and neurons removed (kiln.prune.structured); the report lists each layer's
    shapes before and after, and pinned groups (coupling it could not resolve) as skipped."""

    batches = labelled_batches(splits, cfg.batches, cfg.batch_size, cfg.seed) if needs_gradients(cfg.criterion) else None
    result = prune_structured(model, source.example_inputs, cfg.ratio, cfg.criterion, cfg.reduction, seed=cfg.seed,
                              targets=dict(plan.overrides) or None, ignore=tuple(plan.skipped), batches=batches,
                              round_to=cfg.round_to, example_kwargs=source.example_kwargs)
    report = result.report
    layers = [{"module": fqn, **row} for fqn, row in report["layers"].items()]
    record = result.record | {"skipped": [{"module": ", ".join(p["modules"]), "reason": p["reason"]}
                                          for p in report["pinned"]],
                              "groups": report["groups"]}
    return result.model, record, layers


# -- fine-tuning through the trainer ----------------------------------------------------------

def _finetune(model: nn.Module, cfg: PruneConfig, plan: Plan, source, record: dict, layers: list, progress: bool):
    """One fine-tune (one-shot, AGP) or R prune-rewind-retrain rounds (lottery)."""

    if cfg.schedule == "lottery":
        return _lottery(model, cfg, plan, source, progress)
    hooks = []
    if cfg.schedule == "agp":

        hooks.append(AGP(list(plan.targets), cfg.ratio, cfg.criterion, cfg.scope, cfg.agp_initial, cfg.agp_end,
                         cfg.agp_every, dict(plan.overrides), ScoreContext(seed=cfg.seed)))
        record = record | {"ratio": cfg.ratio, "schedule": "agp"}
    history = _fit(model, cfg, source, record, progress, hooks, best=cfg.schedule == "oneshot")
    if "masks" in record:   # AGP moved the masks: count again
        layers = sparsity_report(model, record["masks"])
    return model, record, layers, history


def _fit(model: nn.Module, cfg: PruneConfig, source, record: dict, progress: bool, hooks=(), best: bool = True) -> dict:
    """Train the pruned model with its masks kept (kiln.train.finetune); weights loaded back in place."""
    transforms = [*source.transforms, TransformRecord.from_flat(record | {"permanent": False})]
    return finetune(model, source, transforms, cfg.finetune, hooks=hooks, best=best, progress=progress)


def _lottery(model: nn.Module, cfg: PruneConfig, plan: Plan, source, progress: bool):

    snapshot = _rewind_point(cfg, source)
    rounds = []
    result = None
    for r in range(1, cfg.rounds + 1):
        ratio = lottery_ratio(r, cfg.rounds, cfg.ratio)
        scale = _rule_scale(ratio, cfg)
        result = prune_unstructured(model, ratio, cfg.criterion, cfg.scope, targets=plan.targets,
                                    overrides={k: v * scale for k, v in plan.overrides.items()},
                                    ctx=ScoreContext(seed=cfg.seed))
        rewind(model, snapshot)
        history = _fit(model, cfg, source, result.record, progress)
        rounds.append({"round": r, "ratio": ratio, **history})
    record = result.record | {"ratio": cfg.ratio, "schedule": "lottery", "rewind": cfg.rewind}
    return model, record, result.report, {"rounds": rounds}


def _rewind_point(cfg: PruneConfig, source) -> dict[str, torch.Tensor]:
    if cfg.rewind == "source":
        return {k: v.detach().clone() for k, v in make_permanent(copy.deepcopy(source.model)).state_dict().items()}
    if source.transforms:
        raise KilnError(f"rewind = \"init\": {source.src} was already transformed; its init is not the spec's "
                        f"(use rewind = \"source\")")

    torch.manual_seed(0)   # the trainer's seed for a user factory; zoo builders fix their own
    return {k: v.detach().clone() for k, v in load(source.spec).model.state_dict().items()}


# -- measuring --------------------------------------------------------------------------------

def storage(model: nn.Module) -> dict:
    """Bytes of the weights stored densely (every element at its dtype's width) and stored
    sparsely: a tensor with zeros as its non-zero values plus a one-bit-per-element mask, where
    that is smaller than dense (so a model with no zeros costs the same both ways). Masked
    weights count as the mask leaves them."""
    from torch.nn.utils import parametrize

    weights: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue   # its `original` is counted through the module it parametrizes
        for p in module.parameters(recurse=False):
            weights.setdefault(id(p), p.detach())
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                weights.setdefault(id(plist.original), getattr(module, name).detach())
    dense = sparse = 0
    for w in weights.values():
        full = w.numel() * w.element_size()
        dense += full
        sparse += min(full, int((w != 0).sum()) * w.element_size() + -(-w.numel() // 8))
    return {"dense_bytes": dense, "sparse_bytes": sparse}


def profile(plain: nn.Module, loaded) -> dict:
    """Parameters (all and non-zero), FLOPs (torch.utils.flop_counter, dense kernels) and FLOPs
    if zero weights were skipped, on the example inputs, of a model without masks (made
    permanent: the caller's one copy, which it also times)."""
    run = replace(loaded, model=plain)
    params = {id(p): p for p in plain.parameters()}
    skipped = _zero_weight_flops(plain, run)
    with torch.no_grad():
        flops = flop_counter_flops(run)
    return {"params": sum(p.numel() for p in params.values()),
            "nonzero_params": sum(int((p != 0).sum()) for p in params.values()),
            "flops": flops, "effective_flops": flops - skipped}


def time_side_by_side(dense: nn.Module, pruned: nn.Module, loaded, before: dict, after: dict,
                      repeats: int = 20, warmup: int = 3) -> None:
    """Eager latency of the dense and pruned models on the example inputs, interleaved in one
    kiln.timing call (timed apart, the same models once read 1.5 -> 140 ms and 152 -> 0.97 ms),
    into `before` and `after`."""
    m = measure({"dense": replace(loaded, model=dense.eval()).run, "pruned": replace(loaded, model=pruned.eval()).run},
                TimingConfig(rounds=repeats, warmup=warmup))
    for key, side in (("dense", before), ("pruned", after)):
        side |= {"latency_s": m[key].median, "latency_repeats": m.rounds, "threads": m.threads,
                 "latency": m[key].to_dict(), "timing_note": m.note()}


def _zero_weight_flops(model: nn.Module, loaded) -> int:
    """FLOPs of multiply-adds by zero weights in Linear/Conv layers: 2 * outputs * fan-in * zero fraction."""

    total, handles = [0], []

    def hook(module, args, out):
        w = module.weight
        zero_fraction = float((w == 0).sum()) / w.numel()
        total[0] += int(round(2 * out.numel() * w[0].numel() * zero_fraction))

    for module in model.modules():
        if isinstance(module, PRUNABLE):
            handles.append(module.register_forward_hook(hook))
    try:
        loaded.run()
    finally:
        for h in handles:
            h.remove()
    return total[0]
