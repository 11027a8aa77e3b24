"""Flower's deployment engine on this machine: a SuperLink and one SuperNode per client as
separate processes over gRPC on loopback, and `flwr run` of a Flower App whose ServerApp is
kiln's (it writes the run directory) and whose ClientApp is kiln.federated.client:app.

The same apps run on several machines: start `flower-superlink --insecure` on one and
`flower-supernode --insecure --superlink HOST:PORT --node-config "partition-id=I"` on each client
machine (kiln installed, the dataset present), then `kiln federate --config fl.toml --out RUN
--superlink HOST:PORT` from any machine (Flower 1.42 serves every API of the SuperLink on one port). Every process
this module starts it also stops, leftovers included, on success, failure or Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from kiln.config import load_toml, to_toml
from kiln.errors import KilnError
from kiln.federated.config import FederateConfig
from kiln.federated.run import federate

BIN = Path(sys.executable).parent
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "kiln-federation"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "kiln"

[tool.flwr.app.components]
serverapp = "kiln.federated.deploy:server_app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
kiln-config = ""
kiln-out = ""
kiln-resume = false
"""
NODE_WAIT_S = 120.0

server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    """The ServerApp process: wait for every client's node, then kiln's round loop on Flower's grid."""
    cfg = load_toml(FederateConfig, str(context.run_config["kiln-config"]))
    out = str(context.run_config["kiln-out"]) or None
    deadline = time.monotonic() + NODE_WAIT_S
    while len(list(grid.get_node_ids())) < cfg.clients:
        if time.monotonic() > deadline:
            raise KilnError(f"only {len(list(grid.get_node_ids()))} of {cfg.clients} SuperNodes connected "
                            f"in {NODE_WAIT_S:.0f} s")
        time.sleep(0.5)
    try:
        federate(cfg, out, resume=bool(context.run_config["kiln-resume"]), grid=grid,
                 log=lambda line: print(f"kiln-log: {line}", flush=True))
    except KilnError as exc:
        print(f"kiln-error: {exc}", flush=True)   # the one line `kiln federate --deployment` reports
        raise
    print("kiln-done", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KilnError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise KilnError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def check_superlink(address: str, timeout: float = 5.0) -> None:
    """A SuperLink Control API address that does not answer is refused before anything runs."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise KilnError(f"superlink {address!r} must be host:port (the SuperLink's Control API, e.g. 127.0.0.1:9093)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise KilnError(f"superlink {address} does not answer: {exc.strerror or exc}") from None


class Processes:
    """Every process started here, stopped in reverse order (SIGTERM, then SIGKILL), each in its
    own process group so that its children (the SuperLink's ServerApp process) go too."""

    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, []

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def kill(self, name: str) -> None:
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        # the SuperLink detaches its SuperExec (a session of its own): find every descendant first
        strays = [pid for _, proc in self.procs for pid in descendants(proc.pid)]
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])   # the kiln checkout: the apps import kiln
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")   # the SuperLink starts flower-superexec by name
    return env


@contextmanager
def local_cluster(clients: int, workdir: Path):
    """A SuperLink and `clients` SuperNodes on loopback; yields (control address, Processes)."""
    procs = Processes(workdir)
    env = _env(workdir / "flwr-home")
    port = free_port()   # Flower 1.42 serves its Fleet, Control and Runtime APIs over HTTP on one port
    try:
        link = procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                                         "--port", str(port), "--database", str(workdir / "state.db"),
                                         "--disable-runtime-dependency-installation"], env)
        _wait_port(port, link, "flower-superlink")
        for i in range(clients):
            procs.start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure",
                                           "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                                           "--node-config", f"partition-id={i} num-partitions={clients}"], env)
        yield f"127.0.0.1:{port}", procs
    finally:
        procs.stop_all()


def write_app(appdir: Path, cfg_path: Path, superlink: str, flwr_home: Path, secagg: bool = False) -> None:
    appdir.mkdir(parents=True, exist_ok=True)
    clientapp = "kiln.federated.secagg:client_app" if secagg else "kiln.federated.client:app"
    (appdir / "pyproject.toml").write_text(PYPROJECT.replace("{clientapp}", clientapp))
    (appdir / "README.md").write_text(f"kiln federation of {cfg_path}\n")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "kiln"\n\n[superlink.kiln]\n'
                                           f'address = "{superlink}"\ninsecure = true\n')


def flwr_run(appdir: Path, cfg_path: Path, out: Path | None, resume: bool, env: dict, log: Callable[[str], None],
             timeout_s: float, on_round: Callable[[int], None] = lambda r: None) -> None:
    """`flwr run APP kiln --stream`, kiln's log lines passed on; its failure is one line."""
    overrides = (f'kiln-config="{cfg_path}" kiln-out="{out.resolve() if out else ""}" '
                 f'kiln-resume={"true" if resume else "false"}')
    argv = [str(BIN / "flwr"), "run", str(appdir), "kiln", "--stream", "--run-config", overrides]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    tail: list[str] = []
    done, failure = False, ""
    deadline = time.monotonic() + timeout_s
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            m = re.search(r"kiln-log: (.*)", line)
            if m:
                log(m.group(1))
                r = re.match(r"round (\d+)/", m.group(1))
                if r:
                    on_round(int(r.group(1)))
            done = done or "kiln-done" in line
            failure = failure or (line.split("kiln-error: ", 1)[1].strip() if "kiln-error: " in line else "")
            if time.monotonic() > deadline:
                raise KilnError(f"the deployment run did not finish within {timeout_s:.0f} s")
            if done or failure or re.search(r"Run finished|finished with status", line, re.I):
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if failure:
        raise KilnError(failure)
    if not done:
        errors = [t for t in tail if re.search(r"error|exception|failed", t, re.I)] or tail[-1:] or ["no output"]
        raise KilnError(f"the deployment run failed: {errors[-1].strip()[:300]}")


def run_deployment(cfg: FederateConfig, out: Path | None, resume: bool, log: Callable[[str], None],
                   timeout_s: float = 3600.0, on_round: Callable[[int, Processes], None] | None = None) -> None:
    """The federation as processes: a local SuperLink and SuperNodes unless cfg.superlink names one."""
    if cfg.superlink:
        check_superlink(cfg.superlink)
    work = Path(tempfile.mkdtemp(prefix="kiln-fl-"))
    try:
        cfg_path = work / "fl.toml"
        cfg_path.write_text(to_toml(cfg))
        if cfg.superlink:
            write_app(work / "app", cfg_path, cfg.superlink, work / "flwr-home", cfg.secagg)
            flwr_run(work / "app", cfg_path, out, resume, _env(work / "flwr-home"), log, timeout_s)
            return
        with local_cluster(cfg.clients, work) as (control, procs):
            write_app(work / "app", cfg_path, control, work / "flwr-home", cfg.secagg)
            hook = (lambda r: on_round(r, procs)) if on_round else (lambda r: None)
            flwr_run(work / "app", cfg_path, out, resume, _env(work / "flwr-home"), log, timeout_s, hook)
    finally:
        if not os.environ.get("KILN_KEEP_FL_WORK"):
            shutil.rmtree(work, ignore_errors=True)
