"""One registry per kind of plug-in (models, hardware profiles, FLOP formulas, ...).

A registry names the modules that fill it (`plugins`) and imports them itself the first time
it is asked for its contents, so importing kiln stays light and no caller keeps a list of
modules to import by hand.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from kiln.errors import KilnError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by a decorator; an unknown name is a KilnError listing the names."""

    def __init__(self, kind: str, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self.plugins = plugins
        self._items: dict[str, T] = {}
        self._loaded = not plugins

    def load(self) -> None:
        """Import the plug-in modules (once). A module whose optional dependency is missing is
        skipped; its names then stay unknown."""
        if self._loaded:
            return
        self._loaded = True
        for name in self.plugins:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is None or name == exc.name or name.startswith(exc.name + "."):
                    raise   # the plug-in module itself is missing: a mistake in `plugins`

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except KeyError:
            raise KilnError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
