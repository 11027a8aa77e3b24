"""Atomic file writes: a command that fails leaves no half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from kiln.errors import KilnError


def check_writable(path: str | Path) -> Path:
    """Fail early, before any work, on an output path that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise KilnError(f"output path {path} is a directory")
    _check_ancestor(path)
    return path


def _check_ancestor(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory we may write into."""
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise KilnError(f"cannot write {path}: {parent} is not a writable directory")


def publish(tmp: str, path: Path) -> None:
    """Give a finished temp file ordinary permissions (mkstemp makes 0600), then move it in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise KilnError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise KilnError(f"cannot write {path}: {exc.strerror}") from None
        raise
    return path


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json_text(data))


def json_text(data) -> str:
    """kiln's JSON: indented, enums as their values, tuples and sets as lists."""
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


def _jsonable(obj):
    if hasattr(obj, "value"):   # enums
        return obj.value
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def check_new_dir(out: str | Path) -> Path:
    """An output directory must not exist yet, or be empty: runs are never overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KilnError(f"output directory {out} is an existing file: give a new directory path")
    if out.exists() and any(out.iterdir()):
        raise KilnError(f"output directory {out} already exists and is not empty")
    _check_ancestor(out)   # checked before the work, not when the run is written
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a hidden sibling directory to fill; on success it is renamed to `out`, on any
    failure removed, so `out` is either complete or absent."""
    out = check_new_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise KilnError(f"cannot write {out}: {exc.strerror}") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

