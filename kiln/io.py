"""Atomic writes: a command that fails leaves no half-written output behind.

One way to write a file (`atomic_write`: a hidden temp sibling renamed into place) and one way
to build a directory (`StagedDir`: a hidden temp sibling renamed into place when complete)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(tmp_name)` fills a hidden temp sibling of `path`, which then replaces `path`; on
    any failure the temp file is removed and `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise KilnError(f"cannot write {path}: {exc.strerror}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; a published file is ordinary
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise KilnError(f"cannot write {path}: {exc.strerror}") from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


class StagedDir:
    """A new directory built in a hidden temp sibling of `out`: `path` is where to write until
    `publish()` renames it to `out`; `discard()` removes it. So `out` is absent until it holds
    something complete (a long run publishes after its first checkpoint and writes atomically
    in place from then on)."""

    def __init__(self, out: str | Path):
        self.out = check_new_dir(out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        except OSError as exc:
            raise KilnError(f"cannot write {out}: {exc.strerror}") from None
        self.published = False

    def publish(self) -> Path:
        if not self.published:
            os.chmod(self.path, 0o777 & ~_umask())
            if self.out.is_dir():
                self.out.rmdir()   # check_new_dir let it through only empty
            os.replace(self.path, self.out)
            self.path, self.published = self.out, True
        return self.out

    def discard(self) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a hidden sibling directory to fill; on success it is renamed to `out`, on any
    failure removed, so `out` is either complete or absent."""
    staged = StagedDir(out)
    try:
        yield staged.path
        staged.publish()
    finally:
        staged.discard()
