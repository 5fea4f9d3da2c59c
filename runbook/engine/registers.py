"""Registered results: per host, shared (`once` steps), and, in a dry run, the ones nothing could produce."""

from __future__ import annotations

import threading
from typing import Any



class Registers:
    """Thread-safe store of registers, and the dry run's unknown ones with the step that would have set them."""

    def __init__(self, hosts: list[str], resumed: dict[str, dict[str, Any]] | None = None):
        self._lock = threading.Lock()
        self.by_host: dict[str, dict[str, Any]] = {h: dict((resumed or {}).get(h, {})) for h in hosts}
        self.shared: dict[str, Any] = {}
        self.unknown: dict[str, dict[str, str]] = {h: {} for h in hosts}   # plan: host -> name -> step id
        self.stale: set[tuple[str, str]] = set()   # plan: (host, name) read before a planned change

    def visible(self, host: str) -> dict[str, Any]:
        """The registers a task on `host` sees: shared ones, then the host's own."""
        with self._lock:
            return {**self.shared, **self.by_host.get(host, {})}

    def store(self, host: str, name: str, value: dict[str, Any], *, shared: bool) -> None:
        """Register a value for one host, or for every host (`once` steps)."""
        with self._lock:
            if shared:
                self.shared[name] = value
            else:
                self.by_host.setdefault(host, {})[name] = value

    def mark_unknown(self, host: str, name: str, step_id: str, *, stale: bool) -> None:
        """Plan: `name` on `host` has no real value (its step cannot run in a dry run, or read the host too early)."""
        with self._lock:
            self.unknown.setdefault(host, {})[name] = step_id
            if stale:
                self.stale.add((host, name))

    def unknown_names(self, host: str) -> dict[str, str]:
        """Plan: the unknown registers of a host, name -> step id."""
        with self._lock:
            return dict(self.unknown.get(host, {}))

    def why_unknown(self, host: str, name: str) -> str:
        """Plan: why a register has no value, for the prediction's reason."""
        with self._lock:
            sid = self.unknown[host][name]
            stale = (host, name) in self.stale
        if stale:
            return f"registered by `{sid}`, which reads the host before changes planned ahead of it"
        return f"registered by `{sid}`, which cannot run in a dry run"
