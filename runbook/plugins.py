"""Plugin registries: built-in kinds by import path, third-party ones through entry-point groups."""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import EntryPoint, EntryPoints, entry_points
from typing import Generic, TypeVar

from runbook.errors import RunbookError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class. Built-ins are import paths; entry points of `group` add names (never replace a built-in).

    Nothing is imported until a name is asked for, so a run that uses only `local` never imports SSH.
    """

    def __init__(self, group: str, what: str, builtins: Mapping[str, str] | Callable[[], Mapping[str, object]],
                 check: Callable[[str, object], T]):
        self.group = group
        self.what = what
        self._builtins = builtins   # import paths, or a function that finds the built-in classes
        self._check = check
        self._sources: dict[str, object] | None = None
        self._classes: dict[str, T] = {}
        self._lock = threading.RLock()

    def _table(self) -> dict[str, object]:
        with self._lock:
            if self._sources is None:
                found = self._builtins() if callable(self._builtins) else self._builtins
                sources: dict[str, object] = dict(found)
                for ep in _entry_points().select(group=self.group):
                    sources.setdefault(ep.name, ep)
                self._sources = sources
            return self._sources

    def get(self, name: str) -> T:
        """The class registered under `name`; an unknown name is an error listing the known ones."""
        with self._lock:
            if name in self._classes:
                return self._classes[name]
            table = self._table()
            if name not in table:
                raise RunbookError(f"unknown {self.what} `{name}`", hint=f"known: {', '.join(self.names())}")
            source = table[name]
            try:
                loaded = (_import(source) if isinstance(source, str) else
                          source.load() if isinstance(source, EntryPoint) else source)
            except Exception as exc:  # a broken plugin is named, not a traceback
                raise RunbookError(f"cannot load {self.what} plugin `{name}`: {type(exc).__name__}: {exc}",
                                   hint=f"fix or uninstall the package that provides it (entry-point group `{self.group}`)") from None
            self._classes[name] = self._check(name, loaded)
            return self._classes[name]

    def names(self) -> list[str]:
        """Every registered name, built-ins first."""
        with self._lock:
            return list(dict.fromkeys([*self._table(), *self._classes]))

    def all(self) -> dict[str, T]:
        """Every registered class, loaded (for the schema, the docs and validation)."""
        return {name: self.get(name) for name in self.names()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def add(self, name: str, cls: object) -> None:
        """Register a class at run time (embedding programs, tests); entry points are the usual way."""
        with self._lock:
            checked = self._check(name, cls)
            self._table()[name] = f"<added {name}>"
            self._classes[name] = checked

    def remove(self, name: str) -> None:
        """Forget a class added with `add`; built-ins and entry points come back on the next lookup."""
        with self._lock:
            self._classes.pop(name, None)
            self._sources = None

    def reload(self) -> None:
        """Read the entry points again (after installing a plugin into the running interpreter)."""
        _entry_points.cache_clear()
        with self._lock:
            self._sources = None
            self._classes.clear()


@functools.lru_cache(maxsize=1)
def _entry_points() -> EntryPoints:
    """Every installed entry point, read once per process (reading them costs tens of milliseconds)."""
    found = entry_points()
    if isinstance(found, EntryPoints):   # Python 3.12+
        return found
    return EntryPoints(ep for group in found.groups for ep in found.select(group=group))   # 3.11: by group


def _import(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
