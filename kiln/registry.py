"""One registry per kind of plug-in (models, hardware profiles, FLOP formulas, ...)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from kiln.errors import KilnError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by a decorator; an unknown name is a KilnError listing the names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KilnError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
