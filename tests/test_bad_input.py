"""Every bad input gets one line, before any work: exit code 2, one stderr line starting
`kiln: error:`, no traceback, nothing written. One case per input tried, by command.

The inputs run in a directory holding a few fixtures: FILE (an ordinary file, so FILE/x is
a path under a file), DIR (an empty directory), the repository's configs and two CSVs that do not fit
a classifier (too few rows; integer labels that skip classes). `python tests/test_bad_input.py KILN` runs the same list
through the `kiln` executable KILN (a subprocess per input) and prints the pass rate per
command: how issue 19's table was made, against main's code and this one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

Q8 = "configs/quant/w8a8.toml"
LR = "configs/lowrank/cnn_energy.toml"
EE = "configs/early_exit/cnn.toml"
SEARCH = "configs/search/hparams.toml"
TINY_CSV = "text,label\ngood film,0\nbad film,1\nfine film,0\n"   # too few rows for a split
# labels 0, 1 and 7: classes 2 to 6 would have no rows (and zoo:minilm_cls has 2 classes)
GAP_CSV = "text,label\n" + "".join(f"review {i} of the film,{i % 2 if i % 10 else 7}\n" for i in range(60))
CAPTURE_FAILS = '''import torch
class M(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: torch.export refuses it
            return x * 2
        return x
def make():
    return M(), (torch.randn(2, 4),)
'''

# federations that cannot run, each refused before anything is written (tests/test_federated.py
# covers a client that raises mid-round)
FL = 'model = "zoo:mlp"\ndataset = "mnist"\nclients = 3\nrounds = 1\n'
FL_CONFIGS = {
    "fl_ok.toml": FL,
    "fl_strategy.toml": FL + '[strategy]\nname = "fedsgd"\n',
    "fl_partition.toml": FL + '[partition]\nkind = "shards"\n',
    "fl_alpha.toml": FL + '[partition]\nkind = "dirichlet"\nalpha = 0.0\n',
    "fl_key.toml": FL + '[local]\nbogus = 1\n',
    "fl_fraction.toml": FL + '[strategy]\nfraction_train = 0.1\n',
    "fl_clients.toml": FL.replace("clients = 3", "clients = 5000"),
    "fl_fit.toml": FL.replace('"mnist"', '"digits"'),
    "fl_format.toml": FL + '[compression]\nformat = "int33"\n',
    "fl_secagg.toml": FL + 'secagg = true\n[strategy]\nname = "krum"\n',
}

# (command, argv, what the message names: a fragment, or alternatives joined by |); NEW is an
# output directory that must stay absent
CASES = [
    ("kiln", ["bogus"], "No such command"),
    ("kiln", ["--verbose", "trian"], "Did you mean 'train'"),
    ("models", ["models", "--json", "DIR"], "DIR"),
    ("models", ["models", "--json", "FILE/m.json"], "FILE"),
    ("models", ["models", "--bogus"], "No such option"),
    ("models", ["models", "--hf", "--json", "FILE/t.json"], "FILE"),
    ("datasets", ["datasets", "--json", "DIR"], "DIR"),
    ("analyze", ["analyze"], "Missing argument"),
    ("analyze", ["analyze", "zoo:mlp", "--json", "FILE/a.json"], "FILE"),
    ("analyze", ["analyze", "zoo:mlp", "--svg", "DIR"], "DIR"),
    ("analyze", ["analyze", "zoo:mlp", "--depth", "-1"], "--depth"),
    ("analyze", ["analyze", "zoo:mlp", "--top", "-3"], "--top"),
    ("analyze", ["analyze", "zoo:mlp", "--depth", "two"], "--depth"),
    ("analyze", ["analyze", "zoo:mlp", "--input-shape", "0x784"], "0x784"),
    ("analyze", ["analyze", "zoo:mlp", "--input-shape", "-2x784"], "-2x784"),
    ("analyze", ["analyze", "hf-config:llama?num_hidden_layers=-1", "--no-measure"], "num_hidden_layers"),
    ("analyze", ["analyze", "hf-config:bert?hidden_size=0", "--no-measure"], "hidden_size"),
    ("analyze", ["analyze", "hf-config:olmoo", "--no-measure"], "did you mean olmo"),
    ("analyze", ["analyze", "py:capture_fails.py:make", "--no-measure"], "cannot capture"),
    ("analyze", ["analyze", "zoo:mlp", "--hardware", "FILE"], "FILE"),
    ("analyze", ["analyze", "zoo:mlp", "--hardware", "tpu-v9"], "tpu-v9"),
    ("analyze", ["analyze", "zoo:mlp", "--input-shape", "4xabc"], "4xabc"),
    ("analyze", ["analyze", "zoo:mlp", "--train", "--optimizer", "adamx"], "adamx"),
    ("analyze", ["analyze", "zoo:mlp", "--train", "--mixed-precision", "fp8"], "fp8"),
    ("analyze", ["analyze", "zoo:mlp", "--no-measure", "KILN_HOME=FILE"], "KILN_HOME"),
    ("analyze", ["analyze", "preset:llama4-2t", "--no-measure"], "unknown preset 'llama4-2t'; known: bert-large"),
    ("analyze", ["analyze", "preset:llama3-8b?hidden_sise=8", "--no-measure"], "hidden_sise"),
    ("analyze", ["analyze", "CORRUPT_RUN", "--no-measure"], "CORRUPT_RUN/artifact.json is corrupt"),
    ("analyze", ["analyze", "BAD_WEIGHTS", "--no-measure"], "BAD_WEIGHTS"),
    ("analyze", ["analyze", "DIR", "--no-measure"], "not a kiln run directory"),
    ("train", ["train", "zoo:mlp", "--threads", "-2", "--out", "NEW"], "threads"),
    ("train", ["train", "zoo:mlp", "--batch-size", "-4", "--out", "NEW"], "batch"),
    ("train", ["train", "zoo:mlp", "--nproc", "0", "--out", "NEW"], "--nproc"),
    ("train", ["train", "zoo:mlp", "--nnodes", "0", "--out", "NEW"], "--nnodes"),
    ("train", ["train", "zoo:mlp", "--node-rank", "-1", "--out", "NEW"], "--node-rank"),
    ("train", ["train", "zoo:mlp", "--nproc", "2", "--parallel", "nope", "--out", "NEW"], "nope"),
    ("train", ["train", "zoo:mlp", "--nproc", "2", "--parallel", "fsdp,tp", "--mesh", "3x3", "--out", "NEW"], "3x3"),
    ("train", ["train", "zoo:mlp", "--nproc", "2", "--parallel", "pp", "--pp-schedule", "zb2", "--out", "NEW"], "zb2"),
    ("train", ["train", "zoo:gpt", "--nproc", "3", "--parallel", "tp", "--max-steps", "1", "--out", "NEW"], "degree 3"),
    ("train", ["train", "zoo:gpt", "--nproc", "2", "--parallel", "pp", "--pp-split", "blocks.9", "--max-steps", "1",
               "--out", "NEW"], "blocks.9"),
    ("train", ["train", "zoo:gpt", "--nproc", "2", "--parallel", "pp", "--pp-split", "wte", "--max-steps", "1",
               "--out", "NEW"], "empty"),
    ("train", ["train", "zoo:mlp", "--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29400", "--out", "NEW"],
     "no-such-host.invalid"),
    ("train", ["train", "zoo:mlp", "--epochs", "0", "--out", "NEW"], "epochs"),
    ("train", ["train", "zoo:mlp", "--lr", "-1", "--out", "NEW"], "lr"),
    ("train", ["train", "zoo:mlp", "--max-steps", "-1", "--out", "NEW"], "max_steps"),
    ("train", ["train", "zoo:mlp", "--epochs", "many"], "--epochs"),
    ("train", ["train", "zoo:mlp", "--out", "FILE"], "FILE"),
    ("train", ["train", "zoo:mlp", "--out", "FILE/run"], "FILE"),
    ("train", ["train", "zoo:mlp", "--out", "NEW", "--json", "DIR"], "DIR"),
    ("train", ["train", "zoo:mlp", "--dataset", "nope", "--out", "NEW"], "nope"),
    ("train", ["train", "--config", "missing.toml", "--out", "NEW"], "missing.toml"),
    ("train", ["train", "zoo:mlp", "--optimizer", "adagrad", "--out", "NEW"], "optimizer"),
    ("train", ["train", "zoo:mlp", "--resume", "--out", "NEW"], "NEW"),
    ("train", ["train", "zoo:mlp", "--init", "NEW", "--out", "run"], "NEW"),
    ("train", ["train", "zoo:mlp", "--teacher", "zoo:gpt", "--max-steps", "1", "--out", "NEW"], "teacher"),
    ("train", ["train", "zoo:minilm_cls", "--dataset", "rotten-tomatoes?path=tiny.csv", "--max-steps", "1",
               "--out", "NEW"], "rows"),
    ("train", ["train", "zoo:minilm_cls", "--dataset", "rotten-tomatoes?path=gap.csv", "--max-steps", "1",
               "--out", "NEW"], "gap.csv"),
    ("train", ["train", "zoo:mlp", "--lora", "r=0", "--out", "NEW"], "r must be >= 1"),
    ("train", ["train", "zoo:mlp", "--lora", "rank=8", "--out", "NEW"], "unknown key 'rank'"),
    ("train", ["train", "zoo:mlp", "--lora", "r=4,targets=nothere", "--out", "NEW"], "nothere"),
    ("train", ["train", "zoo:mlp", "--lora", "r=4096", "--out", "NEW"], "rank 4096 exceeds"),
    ("train", ["train", "zoo:mlp", "--qlora", "--quant", Q8, "--out", "NEW"], "do not combine"),
    ("merge", ["merge", "NEW", "--out", "NEW2"], "NEW"),
    ("eval", ["eval", "NEW"], "NEW"),
    ("eval", ["eval", "FILE"], "FILE"),
    ("eval", ["eval", "DIR"], "DIR"),
    ("eval", ["eval", "NEW", "--json", "DIR"], "NEW|DIR"),   # either problem, named
    ("quantize", ["quantize", "zoo:mlp", "--config", "missing.toml"], "missing.toml"),
    ("quantize", ["quantize", "zoo:mlp", "--config", "FILE"], "FILE"),
    ("quantize", ["quantize", "zoo:mlp", "--config", Q8, "--calib-batches", "0", "--no-eval"], "--calib-batches"),
    ("quantize", ["quantize", "zoo:mlp", "--config", Q8, "--batch-size", "-4", "--no-eval"], "--batch-size"),
    ("quantize", ["quantize", "zoo:mlp", "--config", Q8, "--out", "FILE", "--no-eval"], "FILE"),
    ("quantize", ["quantize", "zoo:mlp", "--config", Q8, "--json", "DIR", "--no-eval"], "DIR"),
    ("quantize", ["quantize", "zoo:mlp", "--config", Q8, "--calib-dataset", "karate", "--no-eval"], "karate"),
    ("compile", ["compile", "zoo:mlp", "--batch", "0"], "--batch"),
    ("compile", ["compile", "zoo:mlp", "--json", "DIR"], "DIR"),
    ("compile", ["compile", "zoo:mlp", "--out", "FILE"], "FILE"),
    ("compile", ["compile", "zoo:mlp", "--precision", "int3"], "int3"),
    ("bench", ["bench", "zoo:mlp", "--batch", "-1"], "--batch"),
    ("bench", ["bench", "zoo:mlp", "--max-samples", "0"], "--max-samples"),
    ("bench", ["bench", "zoo:mlp", "--min-duration", "0"], "--min-duration"),
    ("bench", ["bench", "zoo:mlp", "--log-dir", "FILE"], "FILE"),
    ("bench", ["bench", "zoo:mlp", "--json", "DIR"], "DIR"),
    ("bench", ["bench", "zoo:mlp", "--scenario", "Nope"], "Nope"),
    ("bench", ["bench", "zoo:mlp", "--scenario", "Server", "--target-qps", "-5"], "--target-qps"),
    ("bench", ["bench", "zoo:mlp", "--dataset", "karate"], "karate"),
    ("bench", ["bench", "zoo:mlp", "--backend", "nope"], "nope"),
    ("bench", ["bench", "NEW"], "NEW"),
    ("prune", ["prune", "zoo:mlp", "--out", "FILE", "--no-eval"], "FILE"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--ratio", "1.5", "--no-eval"], "ratio"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--epochs", "-1", "--no-eval"], "epochs"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--lr", "-1", "--epochs", "1", "--no-eval"], "lr"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--nm", "5:4", "--no-eval"], "5:4"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--dataset", "rt-lm"], "rt-lm"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--json", "DIR", "--no-eval"], "DIR"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--method", "bogus", "--no-eval"], "method"),
    ("prune", ["prune", "zoo:mlp", "--out", "NEW", "--config", "FILE", "--no-eval"], "FILE"),
    ("hw", ["hw", "emit", "zoo:mlp", "--out", "NEW"], "not quantized"),
    ("hw", ["hw", "emit", "zoo:mlp", "--out", "FILE"], "FILE"),
    ("hw", ["hw", "emit", "zoo:mlp", "--out", "NEW", "--reuse", "0"], "--reuse"),
    ("hw", ["hw", "emit", "zoo:mlp", "--out", "NEW", "--reuse", "fc=two"], "--reuse"),
    ("hw", ["hw", "emit", "zoo:mlp", "--out", "NEW", "--json", "DIR"], "DIR"),
    ("hw", ["hw", "verify", "DIR"], "not a kiln hw design"),
    ("hw", ["hw", "verify", "DIR", "--samples", "0"], "--samples"),
    ("hw", ["hw", "synth", "DIR", "--target", "asic"], "--target"),
    ("hw", ["hw", "synth", "DIR"], "not a kiln hw design"),
    ("lowrank", ["lowrank", "zoo:cnn", "--config", "missing.toml", "--out", "NEW"], "missing.toml"),
    ("lowrank", ["lowrank", "zoo:cnn", "--config", LR, "--out", "FILE"], "FILE"),
    ("lowrank", ["lowrank", "zoo:cnn", "--config", LR, "--out", "NEW", "--json", "DIR"], "DIR"),
    ("lowrank", ["lowrank", "zoo:cnn", "--config", LR, "--out", "NEW", "--dataset", "karate"], "karate"),
    ("early-exit", ["early-exit", "zoo:cnn", "--config", "missing.toml", "--out", "NEW"], "missing.toml"),
    ("early-exit", ["early-exit", "zoo:cnn", "--config", EE, "--out", "FILE"], "FILE"),
    ("early-exit", ["early-exit", "zoo:cnn", "--config", EE, "--out", "NEW", "--json", "DIR"], "DIR"),
    ("hardware", ["hardware", "show", "nope"], "nope"),
    ("hw systolic", ["hw", "systolic", "zoo:mlp", "--dataflow", "rs"], "rs"),
    ("hw systolic", ["hw", "systolic", "zoo:mlp", "--array", "0x8"], "0x8"),
    ("hw systolic", ["hw", "systolic", "zoo:mlp", "--array", "16"], "ROWSxCOLS"),
    ("hw systolic", ["hw", "systolic", "zoo:mlp", "--bandwidth", "0"], "--bandwidth"),
    ("hw systolic", ["hw", "systolic", "py:capture_fails.py:make"], "cannot capture"),
    ("hw systolic", ["hw", "systolic", "zoo:mlp", "--json", "DIR"], "DIR"),
    ("hardware", ["hardware", "calibrate", "--size", "10"], "--size"),
    ("hardware", ["hardware", "--json", "DIR"], "DIR"),
    ("hardware", ["hardware", "calibrate", "--json", "DIR"], "DIR"),
    ("search", ["search", "--config", "missing.toml", "--out", "NEW"], "missing.toml"),
    ("search", ["search", "--config", SEARCH, "--out", "FILE"], "FILE"),
    ("search", ["search", "--config", SEARCH, "--out", "NEW", "--workers", "0"], "workers"),
    ("search", ["search", "--config", SEARCH, "--out", "NEW", "--trials", "-1"], "trials"),
    ("nas", ["nas", "bogus"], "bogus"),
    ("nas", ["nas", "random", "--out", "FILE"], "FILE"),
    ("nas", ["nas", "random", "--out", "FILE/run"], "FILE"),
    ("nas", ["nas", "random", "--config", "missing.toml"], "missing.toml"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "nope", "--devices", "2"], "nope"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "0"], "--devices"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "16"], "--devices 16"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "nofigure.toml", "--devices", "2"], "intra"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "nosource.toml", "--devices", "2"], "no source"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--emit", "bash"], "--emit"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "tpu-v4-slice", "--devices", "2", "--emit", "slurm"], "XLA"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--deadline", "3"], "--deadline"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--steps", "3", "--tokens", "5"], "not both"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--json", "DIR"], "DIR"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--efficiency", "1.5"], "--efficiency"),
    ("plan", ["plan", "zoo:mlp", "--cluster", "dgx-a100", "--devices", "2", "--emit", "slurm", "--script", "DIR"], "DIR"),
    ("plan", ["plan", "hf-config:gpt2?n_layer=96&n_embd=12288&n_head=96&n_inner=49152", "--cluster", "dgx-a100",
              "--devices", "1", "--seq", "2048", "--emit", "torchrun"], "no plan fits"),
    ("cluster", ["cluster", "show", "nope"], "nope"),
    ("cluster", ["cluster", "calibrate", "--processes", "1"], "--processes"),
    ("cluster", ["cluster", "--json", "DIR"], "DIR"),
    ("federate", ["federate", "--out", "NEW"], "no federation config"),
    ("federate", ["federate", "--config", "missing.toml", "--out", "NEW"], "missing.toml"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "FILE"], "FILE"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "NEW", "--rounds", "0"], "--rounds"),
    ("federate", ["federate", "--config", "fl_strategy.toml", "--out", "NEW"], "fedsgd"),
    ("federate", ["federate", "--config", "fl_partition.toml", "--out", "NEW"], "shards"),
    ("federate", ["federate", "--config", "fl_alpha.toml", "--out", "NEW"], "alpha"),
    ("federate", ["federate", "--config", "fl_key.toml", "--out", "NEW"], "bogus"),
    ("federate", ["federate", "--config", "fl_fraction.toml", "--out", "NEW"], "leaves no client"),
    ("federate", ["federate", "--config", "fl_clients.toml", "--out", "NEW"], "5000 clients"),
    ("federate", ["federate", "--config", "fl_fit.toml", "--out", "NEW"], "does not fit"),
    ("federate", ["federate", "--config", "fl_format.toml", "--out", "NEW"], "int33"),
    ("federate", ["federate", "--config", "fl_secagg.toml", "--out", "NEW"], "secagg"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "NEW", "--inprocess", "--deployment"], "--inprocess"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "NEW", "--resume"], "nothing to resume"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "NEW", "--superlink", "127.0.0.1:1"],
     "127.0.0.1:1 does not answer"),
    ("federate", ["federate", "--config", "fl_ok.toml", "--out", "NEW", "--superlink", "nowhere"], "host:port"),
]
# a cluster profile without its link figures, and one whose figure has no source
NO_FIGURE = """name = "nofigure"
description = "no links"
device = "a100"
device_memory = 8e10
devices_per_node = 8
max_nodes = 1
precision = "bf16"
"""
NO_SOURCE = NO_FIGURE.replace("nofigure", "nosource") + "[intra]\nlatency_s = 1e-6\nbandwidth = 1e11\n"


def make_fixtures(where: Path, repo: Path) -> None:
    (where / "FILE").write_text("an ordinary file\n")
    (where / "DIR").mkdir()
    (where / "tiny.csv").write_text(TINY_CSV)
    (where / "gap.csv").write_text(GAP_CSV)
    (where / "capture_fails.py").write_text(CAPTURE_FAILS)
    (where / "nofigure.toml").write_text(NO_FIGURE)
    (where / "nosource.toml").write_text(NO_SOURCE)
    for name, text in FL_CONFIGS.items():
        (where / name).write_text(text)
    shutil.copytree(repo / "configs", where / "configs")
    # run directories: artifact.json that is not JSON; a good one over weights that are not safetensors
    (where / "CORRUPT_RUN").mkdir()
    (where / "CORRUPT_RUN" / "artifact.json").write_text("{not json")
    (where / "BAD_WEIGHTS").mkdir()
    (where / "BAD_WEIGHTS" / "artifact.json").write_text(
        '{"format": 1, "spec": "zoo:mlp", "dataset": "mnist", "data_seed": 0, "transforms": []}')
    (where / "BAD_WEIGHTS" / "model.safetensors").write_text("not safetensors")


def split_env(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(a.split("=", 1) for a in argv if a.startswith("KILN_HOME="))
    return [a for a in argv if not a.startswith("KILN_HOME=")], env


def listing(where: Path) -> set[str]:
    return {str(p.relative_to(where)) for p in where.rglob("*") if "__pycache__" not in p.parts}


def judge(code: int, stderr: str, written: set[str], message: str) -> str:
    """'' when the bar is met, else what failed."""
    lines = stderr.strip().splitlines()
    if "Traceback" in stderr:
        return f"traceback ({lines[-1] if lines else ''})"
    if code != 2:
        return f"exit {code}"
    if len(lines) != 1 or not lines[0].startswith("kiln: error:"):
        return f"{len(lines)} stderr lines"
    if not any(m in lines[0] for m in message.split("|")):
        return f"message lacks {message!r}: {lines[0]}"
    if written:
        return f"wrote {sorted(written)}"
    return ""


REPO = Path(__file__).resolve().parent.parent
# inputs only the work itself can find wrong (a model torch.export cannot capture): one line,
# but after the progress lines of the work that found it
FOUND_BY_THE_WORK = {"cannot capture", "no plan fits"}


@pytest.fixture(autouse=True)
def local_profile():
    # a fixed 'local' profile: no test spends seconds calibrating
    from kiln.hardware.profiles import HardwareProfile, save_profile

    save_profile(HardwareProfile("local", "test cpu", "cpu", {"fp32": 2e11}, 2e10,
                                 sources={"fp32": "measured by `kiln hardware calibrate` (test)"}))
IDS = [f"{c}:{' '.join(a[1:] if c != 'kiln' else a)}"[:80] for c, a, _ in CASES]


@pytest.mark.parametrize("command,argv,message", CASES, ids=IDS)
def test_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch, command, argv, message):
    from typer.testing import CliRunner

    from kiln.cli.main import app

    from kiln.cli import common

    if message not in FOUND_BY_THE_WORK:
        # progress lines from the first moment: a bad input refused after work began shows them
        start = common._ProgressLines.__init__
        monkeypatch.setattr(common._ProgressLines, "__init__",
                            lambda self, label, every_s, after_s: start(self, label, every_s, 0.0))
    make_fixtures(tmp_path, REPO)
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv, env = split_env(argv)
    for k, v in env.items():
        monkeypatch.setenv(k, str(tmp_path / v))
    result = CliRunner().invoke(app, argv)
    verdict = judge(result.exit_code, result.stderr, listing(tmp_path) - before, message)
    assert verdict == "", f"{verdict}\nstderr: {result.stderr[-2000:]}"


# ---- config parsers: any table either parses or is a KilnError -----------------------------

def _parsers() -> dict:
    """Each TOML config parser kiln has, keyed by the folder of configs/ it reads."""
    import functools

    from kiln.adapt.config import parse_config as early_exit
    from kiln.config import from_dict
    from kiln.lowrank.config import parse_config as lowrank
    from kiln.prune.config import parse_config as prune
    from kiln.quant.config import parse_config as quant
    from kiln.search.config import parse_search_config as search
    from kiln.search.nas.run import METHODS
    from kiln.train.config import TrainConfig

    nas = {m: functools.partial(from_dict, METHODS.get(m).config) for m in METHODS.names()}
    return {"quant": quant, "prune": prune, "lowrank": lowrank, "early_exit": early_exit, "search": search,
            "train": lambda t, where: from_dict(TrainConfig, t, where), **{f"nas-{m}": f for m, f in nas.items()}}


def _seeds() -> dict[str, list[dict]]:
    """The repository's own configs, as the starting tables to mutate."""
    import tomllib

    seeds = {folder.name: [tomllib.loads(f.read_text()) for f in sorted(folder.glob("*.toml"))]
             for folder in (REPO / "configs").iterdir() if folder.is_dir()}
    seeds["train"] = [{"model": "zoo:mlp", "epochs": 2, "lr": 0.01}]
    seeds |= {f"nas-{m}": seeds.get("nas", []) + [{}] for m in ("darts", "random", "evolution", "rl", "spos")}
    return seeds


def _toml_values():
    from hypothesis import strategies as st

    scalars = (st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
               | st.text(max_size=12) | st.sampled_from(["int8", "fp32", "nm", "global", "l1", "tpe", "accuracy",
                                                         "linear", "*", ".*", "", "magnitude", "conv2d"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _mutated(seed: dict, draw) -> dict:
    """The seed with keys replaced, removed or added, at the top level or one table down."""
    from hypothesis import strategies as st

    table = {k: (dict(v) if isinstance(v, dict) else v) for k, v in seed.items()}
    for _ in range(draw(st.integers(1, 3))):
        target = table
        nested = [k for k, v in table.items() if isinstance(v, dict)]
        if nested and draw(st.booleans()):
            target = table[draw(st.sampled_from(nested))]
        keys = list(target)
        action = draw(st.sampled_from(["replace", "remove", "add"] if keys else ["add"]))
        if action == "remove":
            del target[draw(st.sampled_from(keys))]
        else:
            key = draw(st.sampled_from(keys)) if action == "replace" else draw(st.text(min_size=1, max_size=10))
            target[key] = draw(_toml_values())
    return table


PARSER_KINDS = sorted(["quant", "prune", "lowrank", "early_exit", "search", "train",
                       "nas-darts", "nas-random", "nas-evolution", "nas-rl", "nas-spos"])


@pytest.mark.parametrize("kind", PARSER_KINDS)
def test_config_parsers_parse_or_raise_kiln_error(kind):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kiln.errors import KilnError

    parse, seeds = _parsers()[kind], _seeds()[kind]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        table = _mutated(data.draw(st.sampled_from(seeds)), data.draw)
        try:
            parse(table, "fuzzed config")
        except KilnError as exc:
            assert "\n" not in str(exc)

    check()


def test_read_toml_turns_any_text_into_a_table_or_a_kiln_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kiln.config import read_toml
    from kiln.errors import KilnError

    path = tmp_path / "c.toml"

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=60) | st.binary(max_size=60))
    def check(content):
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        try:
            assert isinstance(read_toml(path), dict)
        except KilnError:
            pass

    check()


def main(kiln: str, only: str = "", timeout_s: float = 180.0) -> None:
    """Run CASES (those whose argv contains one of the '|'-separated `only`) through the executable `kiln` (PYTHONPATH
    as given) and print the table."""
    import tempfile

    passed, total = Counter(), Counter()
    home = Path(tempfile.mkdtemp()) / "home"
    shutil.copytree(Path(os.environ.get("KILN_HOME", Path.home() / ".kiln")) / "hardware", home / "hardware")
    for command, argv, message in [c for c in CASES if any(o in " ".join(c[1]) for o in only.split("|"))]:
        with tempfile.TemporaryDirectory() as d:
            where = Path(d)
            make_fixtures(where, REPO)
            before = listing(where)
            argv2, env = split_env(argv)
            env = {**os.environ, "KILN_HOME": str(home), **{k: str(where / v) for k, v in env.items()}}
            try:
                p = subprocess.run([kiln, *argv2], cwd=where, env=env, capture_output=True, text=True,
                                   timeout=timeout_s)
                verdict = judge(p.returncode, p.stderr, listing(where) - before, message)
            except subprocess.TimeoutExpired:
                verdict = f"still running after {timeout_s:.0f} s"
        total[command] += 1
        passed[command] += verdict == ""
        print(f"{'ok  ' if not verdict else 'FAIL'} {command:<10} {' '.join(argv)}  {verdict[:150]}", flush=True)
    print("\n| command | passes |\n|---|---|")
    for command in total:
        print(f"| {command} | {passed[command]}/{total[command]} |")
    print(f"| all | {sum(passed.values())}/{sum(total.values())} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
