"""Connection kinds: `local` and `ssh` built in, others through the `runbook.connections` entry-point group.

A kind is one class implementing `ConnectionKind` (runbook/connections/base.py): its `kind` name,
the host variables it reads, and `for_host(host, options)`. The inventory's `connection` variable
names the kind; choosing one is a registry lookup.
"""

from __future__ import annotations

from runbook.connections.base import (TIMEOUT_RC, CommandResult, Connection, ConnectionKind, ConnectOptions, FileStat,
                                      HostLike, quiet_close)
from runbook.connections.readonly import ReadOnlyConnection
from runbook.errors import RunbookError
from runbook.plugins import Registry


def _check(name: str, cls: object) -> type[ConnectionKind]:
    if not isinstance(cls, type) or not callable(getattr(cls, "for_host", None)):
        raise RunbookError(f"connection plugin `{name}` is not a class with a `for_host(host, options)` classmethod",
                           hint="see docs/architecture.md: adding a connection kind")
    for method in ("open", "run", "put", "get", "read", "stat", "close"):
        if not callable(getattr(cls, method, None)):
            raise RunbookError(f"connection plugin `{name}` has no `{method}` method",
                               hint="implement the Connection protocol of runbook/connections/base.py")
    return cls


CONNECTIONS: Registry[type[ConnectionKind]] = Registry(
    "runbook.connections", "connection",
    {"local": "runbook.connections.local:LocalConnection", "ssh": "runbook.connections.ssh:SSHConnection"}, _check)


def connect(host: HostLike, kind: str, options: ConnectOptions) -> Connection:
    """An unopened connection of `kind` to `host`."""
    return CONNECTIONS.get(kind).for_host(host, options)


__all__ = ["CONNECTIONS", "TIMEOUT_RC", "CommandResult", "ConnectOptions", "Connection", "ConnectionKind", "FileStat",
           "HostLike", "ReadOnlyConnection", "connect", "quiet_close"]
