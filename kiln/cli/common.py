"""What every subcommand shares: the error contract, option and output validation, JSON and
progress output, consoles and number formatting."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import typer
from rich.console import Console
from typer.core import TyperGroup

from kiln.errors import Interrupted, KilnError, first_line
from kiln.io import atomic_write_json, check_new_dir, check_writable, json_text

# Tables are wide: when stdout is not a terminal (CI logs, pipes), don't wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)
STDOUT = "-"   # `--json -`: the JSON goes to standard output, the tables to stderr


def user_errors(fn: Callable) -> Callable:
    """A KilnError becomes one line on stderr and exit code 2, with no traceback; so do the
    OSErrors (files) and ValueErrors (values) that reach a command. Ctrl-C and SIGTERM become
    "kiln: interrupted" and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (what Slurm and Kubernetes send) stops a command exactly as Ctrl-C does
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return fn(*args, **kwargs)
        except KilnError as exc:
            error_line(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            error_line(f"{where}{exc.strerror or first_line(exc)}")
            raise typer.Exit(2) from None
        except ValueError as exc:
            error_line(first_line(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            detail = f": {exc}" if isinstance(exc, Interrupted) else ""
            print(f"kiln: interrupted{detail}", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def error_line(message: str) -> None:
    """The one way an error reaches the user: `kiln: error: MESSAGE` on one stderr line."""
    sys.stdout.flush()
    print(f"kiln: error: {' '.join(message.split())}", file=sys.stderr)


class KilnGroup(TyperGroup):
    """The `kiln` command group: a malformed flag (unknown option, missing argument, a value
    of the wrong type) is one `kiln: error:` line and exit code 2, like every other bad input,
    instead of click's five-line usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:   # typer 0.29 vendors click: its exception classes are only reachable under typer._click
            import typer._click.exceptions as click_errors
        except ModuleNotFoundError:   # typer < 0.21 (Flower pins it) uses the click package itself
            import click.exceptions as click_errors

        console.stderr = False   # until a command's `--json -` says otherwise (one process may run many)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:   # bare `kiln`: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            if not standalone_mode:
                raise
            ctx = getattr(exc, "ctx", None)
            command = " ".join(["kiln", *ctx.command_path.split()[1:]]) if ctx else "kiln"
            error_line(f"{exc.format_message()} (see `{command} --help`)")
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            print("kiln: interrupted", file=sys.stderr)
            sys.exit(130)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def validate(*, positive: Mapping[str, float | None] | None = None,
             non_negative: Mapping[str, float | None] | None = None,
             outputs: Iterable[Path | None] = (), new_dirs: Iterable[Path | None] = (),
             out_dirs: Iterable[Path | None] = (), json_path: Path | None = None) -> None:
    """Check a command's options and output paths before any work (loading a model included):
    sizes and counts (`positive`: > 0, `non_negative`: >= 0, keyed by flag name), files to
    write (`outputs`), run directories that must be new or empty (`new_dirs`), directories
    to write into (`out_dirs`), `--json` (`-`: standard output, and the tables go to stderr)
    and $KILN_HOME. Every command calls it first."""
    for flag, value in (positive or {}).items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise KilnError(f"{flag} must be a number > 0, got {value}")
    for flag, value in (non_negative or {}).items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise KilnError(f"{flag} must be a number >= 0, got {value}")
    to_stdout = json_path is not None and str(json_path) == STDOUT
    console.stderr = to_stdout
    for path in [*outputs, None if to_stdout else json_path]:
        if path is not None:
            check_writable(path)
    for path in new_dirs:
        if path is not None:
            check_new_dir(path)
    for path in out_dirs:
        if path is not None:
            _check_dir(path, str(path))
    if os.environ.get("KILN_HOME"):   # where user hardware profiles live
        _check_dir(Path(os.environ["KILN_HOME"]), f"KILN_HOME={os.environ['KILN_HOME']}")


def check_fits(src: str, dataset: str | None = None, teacher: str | None = None) -> None:
    """Refuse, before anything loads, a dataset or a teacher made for another task than the
    model's. Decided from registered metadata where the model is a zoo spec or a run of one;
    for other sources the capability finds out when it runs."""
    from kiln.data import parse_spec

    task = _zoo_task(src)
    if task is None:
        return
    if dataset:
        entry, _ = parse_spec(dataset)   # an unknown dataset or option fails here too
        if entry.task != task and (task, entry.task) != ("sentence-embedding", "classification"):
            raise KilnError(f"dataset {dataset} is for {entry.task} but {src} does {task}; "
                            f"give a {task} dataset (`kiln datasets`)")
    other = _zoo_task(teacher) if teacher else None
    if other is not None and other != task:
        raise KilnError(f"teacher {teacher} does {other} but the student {src} does {task}: "
                        f"a teacher must do the student's task")


def _zoo_task(spec: str) -> str | None:
    """The task of a zoo spec, or of the zoo model a run or artifact directory was made from."""
    from kiln.runs.artifact import is_artifact, read_artifact

    if is_artifact(spec):
        spec = read_artifact(spec).spec
    if not spec.startswith("zoo:"):
        return None
    from kiln.models.zoo import ZOO, entries

    entries()   # registers the families
    return ZOO.get(spec[4:].partition("?")[0]).task


def _check_dir(path: Path, name: str) -> None:
    """A directory kiln writes into: absent (made on demand) or a directory, under a writable one."""
    if path.exists() and not path.is_dir():
        raise KilnError(f"{name} is a file, not a directory: give a directory path")
    if path.is_dir() and not os.access(path, os.W_OK):
        raise KilnError(f"cannot write into {name}: not a writable directory")
    if not path.exists():
        check_writable(path)


def write_json(path: Path, data) -> None:
    """`--json PATH`: written atomically; `--json -`: printed to standard output."""
    if str(path) == STDOUT:
        sys.stdout.write(json_text(data))
        sys.stdout.flush()
    else:
        atomic_write_json(path, data)


@contextlib.contextmanager
def progress(label: str, every_s: float = 10.0, after_s: float = 2.0) -> Iterator[Callable[..., None]]:
    """Show that a long step goes on. On a terminal, a spinner on stderr; otherwise (CI logs,
    pipes, nohup) plain stderr lines `kiln: LABEL: MESSAGE (12 s elapsed, ETA 30 s)`, from
    `after_s` on (a quick step, or a bad input refused at once, stays silent), then when the
    message changes and every `every_s` seconds while it doesn't, so a log never goes quiet.
    Yields `update(message, fraction=None, expected_s=None)`: `fraction` of the whole step
    done extrapolates the ETA from the time so far; `expected_s`, a phase's known length (a
    timed run), gives it directly."""
    if err_console.is_terminal:
        with err_console.status(label) as status:
            yield lambda message, fraction=None, expected_s=None: status.update(f"{label}: {message}")
        return
    lines = _ProgressLines(label, every_s, after_s)
    try:
        yield lines.update
    finally:
        lines.stop()


class _ProgressLines:
    def __init__(self, label: str, every_s: float, after_s: float):
        import threading

        self.label, self.every_s, self.after_s, self.start = label, every_s, after_s, time.monotonic()
        self.message, self.eta_at, self.printed_at = "started", None, None
        self.lock, self.done = threading.Lock(), threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        self.ticker.start()

    def update(self, message: str, fraction: float | None = None, expected_s: float | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            changed = message != self.message
            self.message = message
            if fraction:
                self.eta_at = now + (now - self.start) * (1 - fraction) / fraction
            elif expected_s is not None:
                self.eta_at = now + expected_s
            elif changed:
                self.eta_at = None
        if changed and now - self.start >= self.after_s:
            self._print(now)

    def _tick(self) -> None:
        # polls once a second: prints once the step has run after_s, then every every_s of silence
        while not self.done.wait(1.0):
            now = time.monotonic()
            last = self.printed_at
            if now - self.start >= self.after_s and (last is None or now - last >= self.every_s):
                self._print(now)

    def _print(self, now: float) -> None:
        with self.lock:
            eta = f", ETA {_duration(self.eta_at - now)}" if self.eta_at and self.eta_at > now else ""
            line = f"kiln: {self.label}: {self.message} ({_duration(now - self.start)} elapsed{eta})"
            self.printed_at = now
        print(line, file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.done.set()
        self.ticker.join()


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def count(value: float | None) -> str:
    """An integer count with thousands separators: LoadGen's 21093.0 -> '21,093'."""
    return "-" if value is None else f"{int(round(value)):,}"


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """1234567 -> '1.23 M' (decimal prefixes), for FLOPs, bytes and counts."""
    if value is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".rstrip()


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"
