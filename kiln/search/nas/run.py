"""One pipeline per NAS method: search, then retrain the found architecture from scratch and
measure it on the test split (only the final model ever sees test data; search uses val)."""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kiln.config import from_dict, read_toml, to_toml
from kiln.io import atomic_dir, atomic_write_json, atomic_write_text
from kiln.registry import Registry
from kiln.runs.weights import save_weights
from kiln.search.nas import config as nas_config

# importing registers the strategies
from kiln.search.nas import darts, evolution, fit, random_search, rl, spos  # noqa: E402,F401
from kiln.search.nas import strategy as strategies
from kiln.search.nas.space import Genotype, Macro, discrete_network


@dataclass
class NasResult:
    method: str
    architecture: dict                 # JSON: the genotype (cells) or path (spos)
    search: dict                       # summary: seconds, evaluations, best search score
    metrics: dict                      # the retrained model on val and test
    history: list = field(default_factory=list)
    model: nn.Module | None = None


@contextlib.contextmanager
def _bar(enabled: bool, description: str, total: float):
    """Yields update(completed, text) for a rich progress bar (a no-op when disabled)."""
    if not enabled:
        yield lambda completed, text="": None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[text]}"),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total, text="")
        yield lambda completed, text="": bar.update(task, completed=completed, text=text)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def retrain(model: nn.Module, data: fit.Data, recipe: fit.Recipe, seed: int, progress: bool) -> dict:
    """Train a fresh network with `recipe` on the whole training split; val and test accuracy."""
    with _bar(progress, "retrain", 1.0) as update:
        stats = fit.train(model, data.train, recipe, seed, on_step=lambda k, n: update(k / n, f"step {k}/{n}"))
    return {"val_accuracy": fit.accuracy(model, data.val), "test_accuracy": fit.accuracy(model, data.test),
            "params": _count(model), "retrain_seconds": round(stats["seconds"], 2), "retrain_steps": stats["steps"],
            "retrain_final_loss": stats["train_loss"]}


def retrain_cell(genotype: Genotype, macro: Macro, data: fit.Data, recipe: fit.Recipe, seed: int,
                 progress: bool = False) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = discrete_network(genotype, macro)
    return model, retrain(model, data, recipe, seed, progress)


def run_darts(cfg: nas_config.DartsRun, progress: bool = True) -> NasResult:
    torch.manual_seed(cfg.seed)
    data = fit.load_data(cfg.dataset, cfg.seed)
    macro = cfg.space.macro(data.in_channels, data.num_classes)
    with _bar(progress, f"DARTS order {cfg.darts.order}", cfg.darts.time_budget_s) as update:
        found = darts.search(cfg.space.cell_space(), macro, data.train, cfg.darts, cfg.seed,
                             on_epoch=lambda e, _: update(e["seconds"], f"epoch {e['epoch']:.1f} "
                                                          f"search-val {e['search_val_accuracy']:.3f}"))
    model, metrics = retrain_cell(found.genotype, macro, data, cfg.retrain, cfg.seed, progress)
    accuracy = found.history[-1]["search_val_accuracy"] if found.history else None
    search = {"seconds": round(found.seconds, 2), "steps": found.steps, "planned_steps": found.planned_steps,
              "order": cfg.darts.order, "epochs": found.history[-1]["epoch"] if found.history else 0,
              "search_val_accuracy": accuracy, "alphas": found.alphas,
              "warnings": darts_warnings(found, accuracy, data.num_classes, cfg.darts)}
    return NasResult("darts", {"kind": "cell", "genotype": found.genotype.to_dict(), "macro": vars(macro)},
                     search, metrics, found.history, model)


MIN_CANDIDATES = 10     # fewer fully trained candidates than this, and a sampled search is close to one random pick


def at_chance(accuracy: float | None, classes: int, samples: int) -> bool:
    """Accuracy within two binomial standard deviations of guessing (1 / classes) on `samples`."""
    chance = 1.0 / classes
    return accuracy is None or accuracy <= chance + 2.0 * (chance * (1 - chance) / max(samples, 1)) ** 0.5


def darts_warnings(found: darts.DartsResult, accuracy: float | None, classes: int, s: darts.DartsSettings) -> list[str]:
    warnings = []
    if found.steps < found.steps_per_epoch:
        warnings.append(f"DARTS took {found.steps} of {found.steps_per_epoch} steps of one epoch in "
                        f"{s.time_budget_s:g} s: the cell is barely trained; raise [darts] time_budget_s")
    if at_chance(accuracy, classes, s.eval_samples):
        warnings.append(f"the search network's accuracy {accuracy} is at chance (1/{classes}): the 'found' "
                        "cell is what the initial alphas give, not a search result")
    return warnings


def sampled_warnings(outcome: strategies.SearchOutcome, classes: int, samples: int, budget_s: float) -> list[str]:
    warnings = []
    if outcome.complete < MIN_CANDIDATES:
        cut = len(outcome.trials) - outcome.complete
        warnings.append(f"only {outcome.complete} candidate(s) fully trained in {budget_s:g} s"
                        + (f" ({cut} cut short by the deadline)" if cut else "")
                        + ": the result is close to a random pick; raise time_budget_s or shorten [search.proxy]")
    if at_chance(outcome.best.reward, classes, samples):
        warnings.append(f"the best candidate's accuracy {outcome.best.reward:.4f} is at chance (1/{classes}): "
                        "the candidates did not learn in their proxy training")
    return warnings


def make_strategy(method: str, choices: list[int], cfg: Any) -> strategies.Strategy:
    cls = strategies.STRATEGIES.get(method)
    extra = {"evolution": {"settings": getattr(cfg, "evolution", None)}, "rl": {"settings": getattr(cfg, "rl", None)}}
    kwargs = {k: v for k, v in extra.get(method, {}).items() if v is not None}
    return cls(choices, cfg.seed, **kwargs)


def _search_loop(method: str, choices: list[int], cfg, evaluate: Callable, budget_s: float, max_archs: int,
                 progress: bool, clock: Callable[[], float] = time.perf_counter) -> strategies.SearchOutcome:
    strategy = make_strategy(method, choices, cfg)
    with _bar(progress, f"{method} search", budget_s) as update:
        best = [0.0]

        def on_trial(n, trial):
            best[0] = max(best[0], trial.reward)
            update(trial.seconds, f"{n} archs, best {best[0]:.4f}")
        return strategies.run(strategy, evaluate, budget_s, max_archs, on_trial, clock)


def _history(outcome: strategies.SearchOutcome, describe: Callable) -> list[dict]:
    return [{"trial": k, "architecture": describe(t.code), "score": t.reward, "seconds": round(t.seconds, 2),
             "steps": t.steps, "complete": t.complete} for k, t in enumerate(outcome.trials)]


def run_sampled(method: str, cfg: nas_config.SampledRun, progress: bool = True,
                data: fit.Data | None = None, clock: Callable[[], float] = time.perf_counter) -> NasResult:
    """random / evolution / rl over the cell space: each candidate trained briefly (`search.proxy`,
    stopped at the budget's deadline) and scored on the first `search.val_samples` validation samples."""
    data = data or fit.load_data(cfg.dataset, cfg.seed)
    space = cfg.space.cell_space()
    macro = cfg.space.macro(data.in_channels, data.num_classes)
    val = data.val.take(torch.arange(min(cfg.search.val_samples, len(data.val))))

    def evaluate(code, deadline: fit.Deadline) -> strategies.Evaluation:
        torch.manual_seed(cfg.seed)
        net = discrete_network(space.decode(list(code)), macro)
        stats = fit.train(net, data.train, cfg.search.proxy, cfg.seed, deadline=deadline)
        return strategies.Evaluation(fit.accuracy(net, val), stats["steps"], stats["steps"] == stats["planned_steps"])

    outcome = _search_loop(method, space.choices(), cfg, evaluate, cfg.search.time_budget_s,
                           cfg.search.max_archs, progress, clock)
    genotype = space.decode(list(outcome.best.code))
    model, metrics = retrain_cell(genotype, macro, data, cfg.retrain, cfg.seed, progress)
    search = {"seconds": round(outcome.seconds, 2), "evaluated": len(outcome.trials), "complete": outcome.complete,
              "train_steps": outcome.steps, "best_search_score": outcome.best.reward,
              "best_code": list(outcome.best.code),
              "warnings": sampled_warnings(outcome, data.num_classes, len(val), cfg.search.time_budget_s)}
    history = _history(outcome, lambda code: space.decode(list(code)).to_dict())
    return NasResult(method, {"kind": "cell", "genotype": genotype.to_dict(), "macro": vars(macro)},
                     search, metrics, history, model)


def train_supernet(cfg: nas_config.SposRun, data: fit.Data, progress: bool = True) -> tuple[spos.Supernet, dict]:
    torch.manual_seed(cfg.seed)
    supernet = spos.Supernet(cfg.space, data.in_channels, data.num_classes)
    with _bar(progress, "supernet (uniform single paths)", 1.0) as update:
        stats = fit.train(spos.UniformPaths(supernet, cfg.seed), data.train, cfg.supernet, cfg.seed,
                          on_step=lambda k, n: update(k / n, f"step {k}/{n}"))
    return supernet, stats


def run_spos(cfg: nas_config.SposRun, progress: bool = True) -> NasResult:
    data = fit.load_data(cfg.dataset, cfg.seed)
    supernet, stats = train_supernet(cfg, data, progress)
    val = data.val.take(torch.arange(min(cfg.search.val_samples, len(data.val))))

    def evaluate(path, deadline: fit.Deadline) -> float:     # no training: inherited weights
        return spos.inherited_accuracy(supernet, tuple(path), data.train, val, cfg.search.bn_batches, cfg.seed)

    choices = [len(cfg.space.blocks)] * cfg.space.layers
    outcome = _search_loop("evolution", choices, cfg, evaluate, cfg.search.time_budget_s, cfg.search.archs, progress)
    path = tuple(outcome.best.code)
    torch.manual_seed(cfg.seed)
    model = spos.PathNet(cfg.space, path, data.in_channels, data.num_classes)
    metrics = retrain(model, data, cfg.retrain, cfg.seed, progress)
    search = {"seconds": round(outcome.seconds, 2), "evaluated": len(outcome.trials),
              "supernet_seconds": round(stats["seconds"], 2), "supernet_steps": stats["steps"],
              "best_inherited_accuracy": outcome.best.reward,
              "warnings": sampled_warnings(outcome, data.num_classes, len(val), cfg.search.time_budget_s)}
    history = _history(outcome, lambda code: spos.describe(cfg.space, code))
    return NasResult("spos", {"kind": "path", "path": list(path), "blocks": spos.describe(cfg.space, path),
                              "space": vars(cfg.space)}, search, metrics, history, model)


@dataclass(frozen=True)
class Method:
    """A NAS method: its config class and its pipeline (config, progress) -> NasResult."""
    config: type
    run: Callable[..., NasResult]

    def load(self, path: str | Path | None, where: str):
        """The method's config from a TOML file (None: all defaults)."""
        return from_dict(self.config, read_toml(path) if path else {}, str(path or where))


METHODS: Registry[Method] = Registry("nas method")
METHODS.register("darts")(Method(nas_config.DartsRun, run_darts))
METHODS.register("spos")(Method(nas_config.SposRun, run_spos))
for _name in strategies.STRATEGIES:       # every sampling strategy is a method of its own
    METHODS.register(_name)(Method(nas_config.SampledRun, functools.partial(run_sampled, _name)))


def load_config(method: str, path: str | Path | None = None):
    return METHODS.get(method).load(path, method)


def run_method(method: str, cfg, progress: bool = True) -> NasResult:
    return METHODS.get(method).run(cfg, progress)


def write_run(out: Path, result: NasResult, cfg) -> Path:
    """config.toml, architecture.json, metrics.json, search.json, history.json and
    model.safetensors, all or nothing (kiln.io.atomic_dir)."""

    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "config.toml", to_toml(cfg))
        atomic_write_json(tmp / "architecture.json", {"method": result.method, **result.architecture})
        atomic_write_json(tmp / "metrics.json", result.metrics)
        atomic_write_json(tmp / "search.json", result.search)
        atomic_write_json(tmp / "history.json", result.history)
        if result.model is not None:
            save_weights(result.model, tmp / "model.safetensors")
    return Path(out)
