"""What every subcommand shares: the error contract, consoles and number formatting."""
from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable

import typer
from rich.console import Console

from kiln.errors import KilnError

# Tables are wide: when stdout is not a terminal (CI logs, pipes), don't wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """A KilnError becomes one line on stderr and exit code 2, with no traceback; Ctrl-C and
    SIGTERM become "kiln: interrupted" and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (what Slurm and Kubernetes send) stops a command exactly as Ctrl-C does
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return fn(*args, **kwargs)
        except KilnError as exc:
            sys.stdout.flush()
            print(f"kiln: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("kiln: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


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
