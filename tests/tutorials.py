"""Run a tutorial's commands and check their output against what the page shows.

A tutorial (docs/tutorials/*.md) shows sessions in ```console blocks:

    $ kiln analyze zoo:cnn --no-measure
    ...
     FLOPs / MACs            36.6 MFLOP / 18.3 MMAC
    ...

Every `$ ` line runs in bash, in order, in one working directory per page (so later commands
see what earlier ones wrote; `configs/` there is the repository's). The lines after it, up to the next `$ `, are its expected
standard output: a line `...` matches any number of lines, `...` inside a line matches any
text, trailing spaces do not count. A command must exit 0 unless its line ends with
`# exit N`. Standard error (progress bars) is not compared.

`python tests/tutorials.py docs/tutorials/PAGE.md` runs a page and prints each command's real
output: how a page is written and kept up to date.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```console\s*$")
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0

    @property
    def exit_code(self) -> int:
        m = EXIT.search(self.command)
        return int(m.group(1)) if m else 0


def steps(page: Path) -> list[Step]:
    out, inside = [], False
    for n, raw in enumerate(page.read_text().splitlines(), 1):
        if not inside:
            inside = bool(FENCE.match(raw))
            continue
        if raw.startswith("```"):
            inside = False
        elif raw.startswith("$ "):
            out.append(Step(raw[2:], line=n))
        elif out:
            out[-1].expected.append(raw.rstrip())
    return out


def _line_matches(pattern: str, text: str) -> bool:
    parts = [re.escape(p) for p in pattern.split("...")]
    return re.fullmatch(".*".join(parts), text) is not None


def matches(expected: list[str], actual: list[str]) -> bool:
    """doctest's ELLIPSIS, by lines: `...` alone skips lines, `...` in a line skips text."""
    while expected and not expected[-1].strip():
        expected = expected[:-1]

    @functools.lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual) or (i > 0 and expected[-1].strip() == "...")
        if expected[i].strip() == "...":
            return any(go(i + 1, k) for k in range(j, len(actual) + 1))
        return j < len(actual) and _line_matches(expected[i], actual[j]) and go(i + 1, j + 1)

    return go(0, 0)


def environment(home: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(KILN_HOME=str(home), COLUMNS="100", TERM="dumb", NO_COLOR="1", PYTHONHASHSEED="0")
    return env


def _workdir(cwd: Path) -> None:
    """A page runs as if from the repository's root: `configs/` is there."""
    link = cwd / "configs"
    if not link.exists():
        link.symlink_to(ROOT / "configs")


def run(step: Step, cwd: Path, env: dict, timeout: float = 900) -> tuple[int, list[str], str]:
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", step.command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, [line.rstrip() for line in proc.stdout.splitlines()], proc.stderr


def check_page(page: Path, cwd: Path, home: Path) -> None:
    """Run every step of a page; raise AssertionError at the first that drifts from the page."""
    env = environment(home)
    _workdir(cwd)
    for step in steps(page):
        code, lines, err = run(step, cwd, env)
        where = f"{page.name}:{step.line}: $ {step.command}"
        assert code == step.exit_code, f"{where}\nexit {code}, page says {step.exit_code}\n{err[-3000:]}"
        assert matches(step.expected, lines), (f"{where}\noutput drifted from the page.\n--- page\n"
                                              + "\n".join(step.expected) + "\n--- actual\n" + "\n".join(lines))


def main() -> None:
    import tempfile

    page = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        cwd, home = Path(tmp) / "work", Path(os.environ.get("KILN_HOME", Path(tmp) / "home"))
        cwd.mkdir()
        _workdir(cwd)
        env = environment(home)
        for step in steps(page):
            code, lines, err = run(step, cwd, env)
            ok = code == step.exit_code and matches(step.expected, lines)
            print(f"{'ok  ' if ok else 'DIFF'} $ {step.command}   (exit {code})")
            print("\n".join(lines))
            if code != step.exit_code:
                print(err[-2000:])
            print()


if __name__ == "__main__":
    main()
