"""`kiln compare`: each cell's figures against their oracles (torch.utils.flop_counter for the
FLOPs, the saved file for the size, `kiln eval` for the metric), resume repeating no cell, the
observation rules' arithmetic, and bad input refused in one line before anything is written."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.analysis.oracle import flop_counter_flops
from kiln.compare import OPTIMIZATIONS, compare_run, parse_config
from kiln.compare import run as compare_module
from kiln.compare.cell import PROGRAM_FILE
from kiln.compare.config import Capability
from kiln.compare.observe import GAIN, TOLERANCE, observations
from kiln.errors import KilnError
from kiln.runs.artifact import WEIGHTS_FILE, load_source
from kiln.runs.execution import as_it_runs


def _cli(argv: list[str]):
    from kiln.cli.main import app

    return CliRunner().invoke(app, argv)


# -- bad input: one line, exit 2, nothing written ---------------------------------------------

@pytest.mark.parametrize("flag,value,named", [
    ("--optimizations", "int8,int3", "unknown optimisation 'int3'; known: 2:4, fp8, int8, lowrank, mxfp4, passes"),
    ("--optimizations", "none", "baseline"),
    ("--models", "zoo:cnn,zoo:nope", "unknown model 'zoo:nope'; known: zoo:c3d"),
    ("--models", "cnn", "unknown model 'cnn'"),
    ("--hardware", "h100,h900", "unknown hardware profile 'h900'; known: "),
    ("--train-steps", "-1", "--train-steps must be >= 0"),
    ("--backend", "nope", "nope"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, flag, value, named):
    out = tmp_path / "cmp"
    result = _cli(["compare", flag, value, "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and named in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_used_directory_without_resume_is_refused(tmp_path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "mine.txt").write_text("x")
    with pytest.raises(KilnError, match="not empty"):
        compare_run(parse_config("zoo:cnn", "int8", "h100"), tmp_path / "cmp")
    assert [p.name for p in (tmp_path / "cmp").iterdir()] == ["mine.txt"]


def test_every_optimisation_table_is_accepted_by_its_commands_own_parser():
    from kiln.lowrank.config import parse_config as lowrank
    from kiln.prune.config import parse_config as prune
    from kiln.quant.config import parse_config as quant

    parsers = {Capability.QUANT: quant, Capability.PRUNE: prune, Capability.LOWRANK: lowrank}
    for name in OPTIMIZATIONS.names():
        opt = OPTIMIZATIONS.get(name)
        if opt.capability in parsers:
            parsers[opt.capability](dict(opt.table) | ({"finetune": {"epochs": 1}} if opt.finetune else {}), name)


# -- the observation rules ---------------------------------------------------------------------

def _cell(model, opt, roof_s, bound, latency_s, value, family="transformer", intensity=1.0, share=0.0, flops=100):
    hw = {"roofline_s": roof_s, "bound": bound, "flops": flops, "bytes": 10, "intensity": intensity, "ridge": 20.0,
          "fallback_dtypes": []}
    return {"model": model, "optimization": opt, "family": family, "metric": {"key": "accuracy", "value": value},
            "flops": flops, "weight_bytes": 100, "artifact_bytes": 100, "attention_flop_share": share,
            "hardware": {"h100": hw}, "latency": {"latency_s": latency_s, "backend": "eager"}}


def test_a_loss_that_fell_reads_as_improved():
    from kiln.compare.observe import change, degradation

    base, after = {"metric": {"key": "loss", "value": 222.7}}, {"metric": {"key": "loss", "value": 222.1}}
    assert change(degradation(base, after)) == "improved 0.3%"
    assert change(degradation(after, base)) == "degraded 0.3%" and change(0.0) == "unchanged"


def test_the_rules_state_the_numbers_the_cells_hold():
    cfg = parse_config("zoo:gpt,zoo:cnn", "int8,2:4,structured50", "h100")
    cells = [_cell("zoo:gpt", "none", 4e-6, "memory", 1e-3, 0.80, share=0.4),
             _cell("zoo:gpt", "int8", 1e-6, "memory", 2e-3, 0.80),          # 4x there, 0.5x here
             _cell("zoo:gpt", "2:4", 3e-6, "memory", 1e-3, 0.60),           # 25% worse: not tolerated
             _cell("zoo:gpt", "structured50", 2e-6, "memory", 1e-3, 0.79, flops=40),
             _cell("zoo:cnn", "none", 1e-6, "compute", 1e-3, 0.90, family="cnn"),
             _cell("zoo:cnn", "int8", 0.5e-6, "compute", 1e-3, 0.90, family="cnn"),   # compute-bound: no line
             _cell("zoo:cnn", "2:4", 0.9e-6, "compute", 1e-3, 0.891, family="cnn"),   # 1% worse: tolerated
             {"model": "zoo:cnn", "optimization": "structured50", "family": "cnn", "error": "refused"}]
    lines = observations(cells, cfg)
    quant = [x for x in lines if "weight quantization" in x]
    assert quant == ["zoo:gpt is memory-bound at batch 1 on h100 (intensity 1 FLOP/B, fp32 ridge 20): weight "
                     "quantization cuts its roofline latency there by int8 4.00x; measured on this CPU: int8 0.50x"]
    assert 4.0 >= GAIN and 0.5 < GAIN
    assert "family cnn tolerates 2:4 sparsity (worst: degraded 1.0%; tolerance 2% degradation): zoo:cnn " \
           "accuracy 0.9 -> 0.891 (degraded 1.0%)" in lines
    assert any(x.startswith("family transformer does not tolerate 2:4 sparsity (worst: degraded 25.0%;")
               for x in lines)
    assert 0.01 <= TOLERANCE < 0.25
    assert "attention is 40% of zoo:gpt's FLOPs (>= 25%): pruning heads can pay; structured50 (heads and neurons) " \
           "removes 60% of its FLOPs, its accuracy degraded 1.3%" in lines
    assert "on h100, 1 of 2 models are memory-bound at batch 1: zoo:gpt" in lines
    # fastest within tolerance: gpt's int8 (4x, no loss; structured50 is 2x), cnn's int8 (2x; 2:4 is 1.1x)
    assert "on h100, the fastest roofline within 2% of the metric: zoo:gpt int8 (4.00x); zoo:cnn int8 (2.00x)" in lines


# -- one small matrix, measured for real --------------------------------------------------------

@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    cfg = parse_config("zoo:cnn", "int8,structured50,passes", "h100", train_steps=0, finetune_steps=0, latency=False)
    return cfg, out, compare_run(cfg, out)


def _cells(results) -> dict:
    return {c["optimization"]: c for c in results["cells"]}


def _artifact(out: Path, opt: str) -> Path:
    return out / "base" / "zoo_cnn" if opt == "none" else out / "cells" / "zoo_cnn" / opt


@pytest.mark.slow
def test_a_cells_flops_are_flop_counters_and_its_size_the_saved_files(matrix):
    _, out, results = matrix
    cells = _cells(results)
    assert not [c for c in cells.values() if "error" in c]
    for opt in ("none", "int8", "structured50"):
        source = load_source(str(_artifact(out, opt)))
        model, _ = as_it_runs(source.model, source.transforms)
        assert cells[opt]["flops"] == flop_counter_flops(dataclasses.replace(source.loaded, model=model))
        assert cells[opt]["artifact_bytes"] == (_artifact(out, opt) / WEIGHTS_FILE).stat().st_size
    assert cells["structured50"]["flops"] < cells["none"]["flops"]
    assert cells["passes"]["artifact_bytes"] == (_artifact(out, "passes") / PROGRAM_FILE).stat().st_size
    assert cells["passes"]["flops"] <= cells["none"]["flops"]   # folding and DCE never add a matmul


@pytest.mark.slow
def test_a_cells_metric_is_kiln_evals(matrix, tmp_path):
    _, out, results = matrix
    cells = _cells(results)
    evals = {}
    for opt in ("none", "int8", "structured50"):
        path = tmp_path / f"{opt}.json"
        assert _cli(["eval", str(_artifact(out, opt)), "--json", str(path)]).exit_code == 0
        evals[opt] = json.loads(path.read_text())["value"]
        assert cells[opt]["metric"]["value"] == evals[opt]
    table = {(r[0], r[1]): r for s in json.loads((out / "report.json").read_text())["sections"]
             for i in s["items"] if "table" in i and i["table"]["columns"][4] == "change" for r in i["table"]["rows"]}
    assert table[("zoo:cnn", "structured50")][4] == evals["structured50"] - evals["none"]


@pytest.mark.slow
def test_resume_repeats_no_cell_and_remeasures_only_what_was_not_saved(matrix, monkeypatch):
    cfg, out, results = matrix
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}

    def never(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(compare_module, "make_artifact", never)
    monkeypatch.setattr(compare_module, "make_base", never)
    monkeypatch.setattr(compare_module, "measure", never)
    again = compare_run(cfg, out, resume=True)
    assert again["cells_run"] == 0 and again["cells_resumed"] == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == stamps
    # a stop between making int8's artifact and saving its cell: measured again, not made again
    (out / "cells" / "zoo_cnn" / "int8.json").unlink()
    monkeypatch.undo()
    monkeypatch.setattr(compare_module, "make_artifact", never)
    third = compare_run(cfg, out, resume=True)
    assert third["cells_run"] == 1
    assert _cells(third)["int8"]["metric"] == _cells(results)["int8"]["metric"]


# -- latency as a second pass: measured under load without it, added by a resume ---------------

@pytest.mark.slow
def test_a_resume_with_latency_times_the_cells_that_lack_one_and_runs_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    kw = dict(train_steps=0, finetune_steps=0, backend="eager", rounds=1)
    first = compare_run(parse_config("zoo:gcn", "int8,passes", "h100", latency=False, **kw), out)
    assert first["cells_run"] == 3 and all(c["latency"] is None for c in first["cells"])
    assert not [c for c in first["cells"] if "error" in c]

    def never(*a, **k):
        raise AssertionError("a finished cell was made or measured again")

    monkeypatch.setattr(compare_module, "make_artifact", never)
    monkeypatch.setattr(compare_module, "make_base", never)
    monkeypatch.setattr(compare_module, "measure", never)
    cfg = parse_config("zoo:gcn", "int8,passes", "h100", latency=True, **kw)
    second = compare_run(cfg, out, resume=True)
    assert second["cells_run"] == 0 and second["cells_resumed"] == 3 and second["latencies_added"] == 3
    for before, after in zip(first["cells"], second["cells"]):
        lat = after["latency"]
        assert lat["latency_s"] > 0 and lat["backend"].startswith("eager"), lat
        assert {k: v for k, v in after.items() if k != "latency"} == \
            {k: v for k, v in before.items() if k != "latency"}   # every other field kept
    assert _cells(second)["passes"]["latency"]["backend"] == "eager:passes=1"
    # a third resume finds every latency there: nothing is timed again
    third = compare_run(cfg, out, resume=True)
    assert third["cells_run"] == 0 and third["latencies_added"] == 0
    assert [c["latency"] for c in third["cells"]] == [c["latency"] for c in second["cells"]]


def test_recipes_train_each_model_unless_the_command_line_gives_a_value():
    from kiln.compare.config import DEFAULT_TRAINING, RECIPES

    cfg = parse_config("zoo:gcn,zoo:cnn", "int8", "h100")
    gcn, cnn = cfg.recipe("zoo:gcn"), cfg.recipe("zoo:cnn")
    assert (gcn.steps, gcn.lr) == (RECIPES["zoo:gcn"].steps, RECIPES["zoo:gcn"].lr)
    assert (cnn.steps, cnn.lr, cnn.finetune_steps, cnn.finetune_lr) == tuple(DEFAULT_TRAINING.values())
    assert parse_config("zoo:gcn", "int8", "h100", train_steps=0).recipe("zoo:gcn").steps == 0
    # a value the user gives wins over the recipe (zoo:vit_tiny's recipe trains 600 steps at 1e-3)
    vit = parse_config("zoo:vit_tiny", "int8", "h100", train_steps=100, train_lr=2e-3).recipe("zoo:vit_tiny")
    assert (vit.steps, vit.lr) == (100, 2e-3) and RECIPES["zoo:vit_tiny"].steps == 600
    assert parse_config("zoo:gcn", "int8", "h100", recipes=False).recipe("zoo:gcn").lr == DEFAULT_TRAINING["train_lr"]
    assert set(RECIPES) <= set(parse_config("zoo:cnn", "int8", "h100").models) | set(
        __import__("kiln.compare.config", fromlist=["DEFAULT_MODELS"]).DEFAULT_MODELS)


def test_resume_checks_the_training_values_left_unset_and_names_one_that_differs(tmp_path):
    from kiln.compare.run import CONFIG_FILE, check_out
    from kiln.config import to_dict

    cfg = parse_config("zoo:cnn", "int8", "h100")          # training values unset: the recipes
    (tmp_path / CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))
    check_out(tmp_path, cfg, resume=True)
    with pytest.raises(KilnError, match="train_steps = None, not 100"):
        check_out(tmp_path, parse_config("zoo:cnn", "int8", "h100", train_steps=100), resume=True)
