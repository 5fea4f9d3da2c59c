"""A distributed run's facts: gathered where the host's connection is, and known to the controller too.

A worker gathers a host's facts when one of its tasks reads them, and sends them back once, with
that task's outcome. So a step that runs on the controller for that host (`on: controller`,
`delegate_to:`) reads the same facts an in-process run would; when none of the host's tasks has
gathered them yet, the controller asks the host's worker, which gathers and keeps them. A host
that moves to another worker (its worker lost) takes them along with its next order: a host is
gathered once per run, wherever its tasks run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from runbook.cluster.wire import Gathered
from runbook.connections import Connection
from runbook.errors import ConnectionFailed
from runbook.facts import Facts, FactsError, FactStore


class RunFacts:
    """The controller's side: the run's fact store, fed by the workers, asking a worker for what it lacks."""

    def __init__(self, store: FactStore, is_remote: Callable[[str], bool], worker_of: Callable[[str], str | None],
                 ask: Callable[[str, str], Gathered]):
        self.store = store
        self.gather_here = store.gatherer   # hosts of the local kind gather on the controller, as in-process
        self.is_remote = is_remote
        self.worker_of = worker_of
        self.ask = ask                     # (worker, host) -> its answer; OSError when the worker is gone
        self.at: dict[str, str] = {}       # host -> the worker that has the controller's copy of its facts
        self.lock = threading.Lock()
        store.gatherer = self._gather

    def received(self, host: str, worker: str | None, facts: object) -> None:
        """Facts a worker sent for one of its hosts (anything but facts is ignored)."""
        if isinstance(facts, Facts) and worker is not None:
            self.store.put(host, facts)
            with self.lock:
                self.at[host] = worker

    def for_order(self, worker: str, host: str) -> Facts | None:
        """The host's facts when `worker` has not got them (the host moved there): they go with its next order."""
        known = self.store.known(host)
        with self.lock:
            if known is None or self.at.get(host) == worker:
                return None
            self.at[host] = worker
        return known

    def _gather(self, host: str, conn: Connection) -> Facts:
        if not self.is_remote(host):
            return self.gather_here(host, conn)
        worker = self.worker_of(host)
        if worker is None:
            raise ConnectionFailed(host, "no cluster worker is left for it")
        reply = self.ask(worker, host)
        if not isinstance(reply.facts, Facts):   # the task fails as it would in-process
            reason = str(reply.reason or "its cluster worker sent no facts")
            if reply.failed == "connect":
                raise ConnectionFailed(host, reason)
            if reply.failed == "connection":
                raise OSError(reason)
            raise FactsError(host, reason)
        with self.lock:
            self.at[host] = worker
        return reply.facts
