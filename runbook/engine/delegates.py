"""`delegate_to`: where a task runs instead of its own host, and one connection per delegate host for the run."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from runbook.connections import Connection, quiet_close
from runbook.errors import ConnectionFailed, RunbookError, did_you_mean
from runbook.model import CONTROLLER, Step, delegate_name_problem
from runbook.template import render

_WHERE_HINT = "a delegate is a host of the inventory (it need not be selected by `hosts:` or --limit)"


def resolve_delegate(step: Step, ctx: dict[str, Any], known: Mapping[str, Any], host: str) -> str | None:
    """Where a task of `host` runs: None (on `host` itself), CONTROLLER, or another inventory host; RunbookError when refused.

    A template must render to an inventory host: never to the control machine (a host variable or
    -e must not move a step onto the controller) and never to text with shell or path characters.
    """
    written = step.delegate
    if written is None:
        return None
    templated = "{" in written
    name = str(render(written, ctx)).strip() if templated else written.strip()
    source = f" (rendered from `{_short(written)}`)" if templated else ""
    problem = delegate_name_problem(name)
    if problem:
        raise RunbookError(problem + source, hint="delegate_to names one inventory host, or `controller`")
    if name == CONTROLLER:
        if templated:
            raise RunbookError(f"delegate_to{source} names the control machine: only a literal `delegate_to: "
                               "controller` (or `on: controller`) may run a step there",
                               hint="write `delegate_to: controller`, or render the name of an inventory host")
        return CONTROLLER
    if name == host:
        return None   # delegated to itself: its own connection, as if not delegated
    if name not in known:
        raise RunbookError(f"delegate_to `{name}`{source} is not a host of the inventory",
                           hint=did_you_mean(name, list(known)) or _WHERE_HINT)
    return name


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DelegatePool:
    """One connection per delegate host for the whole run, opened on first use and shared by the tasks delegated to it.

    A delegate that cannot be reached fails the tasks delegated to it (their own hosts stay reachable);
    the failure is kept, so later tasks fail at once instead of each waiting for a connect timeout.
    """

    def __init__(self, hosts: Mapping[str, Any], open_for: Callable[[Any], Connection]):
        self.hosts = hosts
        self.open_for = open_for
        self.conns: dict[str, Connection] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self.closed = False

    def get(self, name: str) -> Connection:
        """The open connection to delegate `name` (opened now when it is the first use)."""
        with self._lock:
            if name in self.conns:
                return self.conns[name]
            lock = self._opening.setdefault(name, threading.Lock())
        with lock:   # one opening per delegate; tasks for other delegates do not wait for it
            with self._lock:
                if name in self.conns:
                    return self.conns[name]
                if name in self.failed:
                    raise RunbookError(f"delegate {name} is unreachable: {self.failed[name]}")
                if self.closed:
                    raise RunbookError(f"delegate {name}: the run is stopping")
            if name not in self.hosts:
                raise RunbookError(f"delegate_to `{name}` is not a host of the inventory", hint=_WHERE_HINT)
            conn = self.open_for(self.hosts[name])
            try:
                conn.open()
            except ConnectionFailed as exc:
                with self._lock:
                    self.failed[name] = exc.reason
                raise RunbookError(f"delegate {name} is unreachable: {exc.reason}", hint=exc.hint) from None
            with self._lock:
                self.conns[name] = conn
            return conn

    def close(self) -> None:
        """Close every delegate connection (the end of the run, or an abort: running commands end)."""
        with self._lock:
            self.closed = True
            conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            quiet_close(conn)
