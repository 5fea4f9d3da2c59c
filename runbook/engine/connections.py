"""A run's connections: one per host while it has work, the controller's own, one per delegate host."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from runbook.connections import Connection, quiet_close
from runbook.connections.local import LocalConnection
from runbook.engine.delegates import DelegatePool
from runbook.engine.options import HostLike
from runbook.model import CONTROLLER, Step


class RunConnections:
    """Where the tasks of one run send their commands: the executor opens a host's, and closes it when the host is done."""

    def __init__(self, hosts: Mapping[str, HostLike], connect: Callable[[HostLike], Connection] | None,
                 delegates: Mapping[str, Any]):
        self.hosts = hosts
        self._connect = connect
        self._open: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self.controller = LocalConnection(CONTROLLER)
        self.delegates = DelegatePool(delegates, self._new)

    def _new(self, host: HostLike) -> Connection:
        return self._connect(host) if self._connect else LocalConnection(host.name)

    def open(self, host: str) -> None:
        """Connect `host` for its tasks; ConnectionFailed when it cannot be reached."""
        conn = self._new(self.hosts[host])
        conn.open()
        self.add(host, conn)

    def add(self, host: str, conn: Connection | Any) -> None:
        """`host`'s tasks use `conn` from now on (a cluster worker may hold the real connection)."""
        with self._lock:
            self._open[host] = conn

    def is_open(self, host: str) -> bool:
        """Whether `host` is connected, so its tasks may start."""
        return host in self._open

    def for_task(self, host: str, step: Step | None = None, delegate: str | None = None) -> Connection:
        """A task's connection: its host's, the controller's, or its delegate's (one per delegate for the run)."""
        if delegate is None:
            return self._open[host]
        return self.controller if delegate == CONTROLLER else self.delegates.get(delegate)

    def close(self, host: str) -> None:
        """`host` has no more work: its connection is closed."""
        with self._lock:
            conn = self._open.pop(host, None)
        if conn is not None:
            quiet_close(conn)

    def close_all(self) -> None:
        """Close every connection (the run's end, or an abort: running commands end); tasks still see theirs, closed."""
        with self._lock:
            conns = list(self._open.values())
        for conn in conns:
            quiet_close(conn)
        self.delegates.close()
