"""The README is a test: every `kiln` command in its code blocks runs, in the order written,
from an empty directory, as a new user would type it. Commands chain (a run trained above is
pruned below), so they run in one directory and a failure names the line.

Budgets are shrunk (epochs, trials, query counts) so the whole tour fits CI's slow tier; the
shrinking is a table here, visible, and never changes what a command does, only how long.
A command whose README output is `kiln: error: ...` must fail with exit code 2 and that line.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.config import to_toml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KILN = [sys.executable, "-m", "kiln.cli.main"]

# (pattern, replacement): how long, never what; epochs a tenth (at least 1), so a resumed run
# still asks for more epochs than the run it continues
SHRINK = [
    (r"--epochs (\d+)", lambda m: f"--epochs {max(1, int(m.group(1)) // 10)}"),
    (r"--trials \d+", "--trials 2"),
    (r"--calib-batches \d+", "--calib-batches 2"),
    (r"--rounds \d+", "--rounds 3"),
    (r"--budget (\d+)", lambda m: f"--budget {min(3, int(m.group(1)))}"),
]
# flags appended to a subcommand (its first words) when the README line lacks them (time only)
APPEND = {
    ("train",): ["--max-steps", "30"],
    ("bench",): ["--min-queries", "64", "--min-duration", "1"],
    ("compile",): ["--rounds", "3"],
    ("hardware", "calibrate"): ["--budget", "0.5"],
    ("optimize",): ["--backend", "eager+onnxruntime"],     # the final compile's candidates: two, not all
}
# a resumed run keeps its stored max_steps, so it gets a later limit, or it would stop at once
RESUMED = {("train",): ["--max-steps", "60"]}
# budget keys in the repo's configs, shrunk in the copy the tour runs with: (section, key) -> value
CONFIG_BUDGETS = {
    ("finetune", "max_steps"): 10, ("train", "max_steps"): 10, ("", "trials"): 4, ("", "population"): 2,
    ("space", "samples"): 64, ("space", "seed_sensitivity"): 2, ("space", "steps"): 20,
    ("space", "eval_every"): 10, ("darts", "time_budget_s"): 20, ("darts", "max_epochs"): 1,
    ("retrain", "epochs"): 1, ("", "latency_samples"): 8, ("", "latency_repeats"): 3, ("", "sweep_points"): 5,
}


@dataclass(frozen=True)
class Command:
    line: int
    argv: tuple[str, ...]
    error: str = ""          # the README shows this `kiln: error:` line as its output


def readme_commands(text: str) -> list[Command]:
    commands, in_block = [], False
    lines = text.splitlines()
    for i, raw in enumerate(lines):
        if raw.startswith("```"):
            in_block = not in_block
            continue
        line = raw.strip()
        if not in_block or not (line.startswith("kiln ") or line.startswith("$ kiln ")):
            continue
        argv = shlex.split(line.removeprefix("$ "), comments=True)
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        error = nxt.split("(exit code")[0].strip() if nxt.startswith("kiln: error:") else ""
        commands.append(Command(i + 1, tuple(argv), error))
    return commands


def shrink(argv: tuple[str, ...]) -> list[str]:
    text = shlex.join(argv)
    for pattern, repl in SHRINK:
        text = re.sub(pattern, repl, text)
    out = shlex.split(text)
    for words, flags in (RESUMED if "--resume" in out else APPEND).items():
        if tuple(out[1:1 + len(words)]) == words and flags[0] not in out:
            out += flags
    return out


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_a_tour():
    assert len(COMMANDS) >= 20
    assert not [c for c in COMMANDS if "runs/figures" in " ".join(c.argv)], \
        "README examples must start from what the README itself creates, not from benchmark outputs"


def runs_read(argv: tuple[str, ...]) -> list[str]:
    """The run directories a command reads: arguments under runs/ that are not its --out, and
    a --config's `source` under runs/."""
    reads = [a for i, a in enumerate(argv) if a.startswith("runs/") and argv[i - 1] != "--out"]
    if "--config" in argv:
        table = tomllib.loads((ROOT / argv[argv.index("--config") + 1]).read_text())
        source = table.get("space", {}).get("source", "") or table.get("source", "")
        reads += [source] if source.startswith("runs/") else []
    return reads


def test_every_run_a_command_reads_an_earlier_command_wrote():
    written: set[str] = set()
    for c in COMMANDS:
        missing = [r for r in runs_read(c.argv) if r not in written]
        assert not missing, f"README.md:{c.line}: {' '.join(c.argv)} reads {missing}, which no command above writes"
        if "--out" in c.argv:
            written.add(c.argv[c.argv.index("--out") + 1])


def test_the_chain_evaluates_each_step():
    # train -> prune -> quantize -> compile -> bench on one model, `kiln eval` after each model-writing step
    chain = [c.argv for c in COMMANDS if any(a.startswith("runs/chain/") for a in c.argv)]
    steps = [argv[1] for argv in chain]
    assert [s for s in steps if s != "eval"][:5] == ["train", "prune", "quantize", "compile", "bench"]
    for i, argv in enumerate(chain):
        if argv[1] in ("train", "prune", "quantize"):
            assert chain[i + 1][1:] == ("eval", argv[argv.index("--out") + 1])


# fine-tuning sections: no max_steps means no limit, so the copy gets CONFIG_BUDGETS' figure
STEP_LIMITED = ("finetune", "train")


def shrunk_config(table: dict) -> dict:
    """The config with its budget keys (CONFIG_BUDGETS) lowered, never raised; the rest as is."""
    out = dict(table)
    for section in STEP_LIMITED:
        if isinstance(out.get(section), dict) and "max_steps" not in out[section]:
            out[section] = out[section] | {"max_steps": CONFIG_BUDGETS[(section, "max_steps")]}
    for (section, key), value in CONFIG_BUDGETS.items():
        where = out.get(section) if section else out
        if isinstance(where, dict) and isinstance(where.get(key), int) and where[key] > value:
            where = dict(where)
            where[key] = value
            if section:
                out[section] = where
            else:
                out = where
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for path in (ROOT / "configs").rglob("*.toml"):
        target = work / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(to_toml(shrunk_config(tomllib.loads(path.read_text()))))
    (work / "home").mkdir()
    return work


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}:{' '.join(c.argv[1:3])}" for c in COMMANDS])
def test_readme_command(command: Command, workdir: Path):
    argv = shrink(command.argv)
    env = os.environ | {"KILN_HOME": str(workdir / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(KILN + argv[1:], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    where = f"README.md:{command.line}: {' '.join(argv)}"
    if command.error:
        assert proc.returncode == 2, f"{where}: expected exit 2, got {proc.returncode}\n{proc.stderr[-2000:]}"
        assert command.error in proc.stderr, f"{where}: expected {command.error!r}, got {proc.stderr[-500:]}"
        return
    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{where}\n{proc.stderr[-3000:]}"
    if argv[1] == "eval" and (workdir / argv[2] / "compile.json").exists():
        # a compile directory: its backend's metric beside the source model's in eager
        assert re.search(r" on \S+, eager \d", proc.stdout), f"{where}: {proc.stdout[-500:]}"
    elif argv[1] == "eval":    # the oracle: the metric the command that wrote the run recorded
        assert proc.stdout.rstrip().endswith("reproduced"), f"{where}: {proc.stdout[-500:]}"
