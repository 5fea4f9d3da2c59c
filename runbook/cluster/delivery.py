"""The controller's delivery thread: a run's worker streams taken in order, one reply at a time.

Events are re-emitted once each into the run's own `EventStream` (so the console, audit trail and
run state see what an in-process run shows); an outcome's register writes and drift stops are
applied before its result reaches the executor (the facts its task gathered too), so dependents
start only after everything their predecessor did is recorded. A worker is trusted for nothing
beyond the task it was given.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from runbook.cluster.facts import RunFacts
from runbook.cluster.wire import StreamItem, TaskError, TaskOutcome, WireEvent
from runbook.events import ObserverFailed
from runbook.graph import TaskKey
from runbook.results import Status, TaskResult

_HOOKS = frozenset({"task_started", "task_finished", "approval", "notice"})   # what a worker may emit
_WRITES = frozenset({"store", "mark_unknown"})                                # what it may do to registers


@dataclass
class Call:
    """One remote call in flight: a task (or a connect) on a worker, and the future the executor waits on."""

    future: Future[Any]
    host: str
    key: TaskKey | None = None
    rescue: bool = False
    worker: str | None = None
    delivered: int = 0
    started_at: float = field(default_factory=time.time)
    done: bool = False


class Delivery:
    """One thread for everything that comes back from the workers, and the table of remote calls in flight."""

    def __init__(self, executor: Any, names: dict[str, str], facts: RunFacts | None = None):
        self.executor = executor
        self.facts = facts
        self.events = executor.events
        self.info = executor.info
        self.names = names
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runbook-cluster-events")
        self.ops: dict[int, Call] = {}
        self.lock = threading.Lock()
        self.failure: ObserverFailed | None = None
        self.closing = False

    def close(self) -> None:
        """The run is over: deliver what is queued, then take nothing more."""
        self.closing = True
        self.thread.shutdown(wait=True)

    def post(self, fn: Any, *args: Any) -> None:
        """Hand work to the delivery thread (after the run's end there is nothing left to deliver to)."""
        if self.closing:
            return
        try:
            self.thread.submit(fn, *args)
        except RuntimeError:   # shut down meanwhile
            pass

    def _emit(self, event: WireEvent) -> None:
        if event.hook in _HOOKS:
            getattr(self.events, event.hook)(self.info, *event.args)

    def notice(self, message: str) -> None:
        """A warning for the operator (a worker was lost)."""
        try:
            self.events.notice(self.info, "warning", message)
        except ObserverFailed as exc:
            self.failure = self.failure or exc

    def take(self, events: list[StreamItem]) -> None:
        """One reply of a worker's stream, in order: events re-emitted once, outcomes applied."""
        for event in events:
            if isinstance(event, TaskOutcome):
                self._finish(event.task_id, event)
                continue
            if isinstance(event, TaskError):
                self.lose(event.task_id, f"internal error on a cluster worker: {event.message}", Status.FAILED)
                continue
            with self.lock:
                op = self.ops.get(event.task_id) if event.task_id is not None else None
            if event.task_id is not None and (op is None or op.done or event.seq != op.delivered):
                continue   # delivered already with its outcome, or not this run's
            try:
                self._emit(event)
            except ObserverFailed as exc:
                self.failure = self.failure or exc
            if op is not None:
                op.delivered += 1

    def _finish(self, task_id: int, outcome: TaskOutcome) -> None:
        with self.lock:
            op = self.ops.pop(task_id, None)
        if op is None or op.done:
            return
        op.done = True
        failure = self.failure   # a critical observer failed on one of the run's events: the run stops
        result = outcome.result
        if op.key is None or (result.host, result.step_id) != (op.key.host, op.key.step_id):
            # A worker answers only for the task it was given: anything else is refused, not recorded.
            op.done = False
            with self.lock:
                self.ops[task_id] = op
            return self.lose(task_id, "internal error: the cluster worker answered for another task", Status.FAILED)
        registers = self.executor.runner.registers
        for name, args, kwargs in outcome.writes:   # only register writes, only for the task's own host
            if name in _WRITES and args and args[0] == op.host and set(kwargs) <= {"shared", "stale"}:
                getattr(registers, name)(*args, **kwargs)
        for host, reason in outcome.stopped:
            if host == op.host:
                self.executor.scheduler.stop_host(host, reason)
        if self.facts is not None and outcome.facts is not None:   # the facts its task gathered, of its host
            self.facts.received(op.host, op.worker, outcome.facts)
        if failure is not None:
            op.future.set_exception(failure)
        else:
            op.future.set_result(result)

    def lose(self, task_id: int, message: str, status: Status = Status.LOST) -> None:
        """A task that produced no outcome: lost with its worker, refused, or never started (unreachable)."""
        with self.lock:
            op = self.ops.pop(task_id, None)
        if op is None or op.done or op.key is None:
            return
        op.done = True
        step = self.executor.steps.step(op.key.step_id)
        now = time.time()
        res = TaskResult(op.host, op.key.step_id, step.action, status, message=message, started_at=op.started_at,
                         finished_at=now, duration=round(now - op.started_at, 6), on_failure=op.rescue,
                         worker=self.names.get(op.worker or "", op.worker))
        if status != Status.UNREACHABLE:   # the scheduler reports results that no task produced itself
            try:
                self.events.task_finished(self.info, res)
            except ObserverFailed as exc:
                op.future.set_exception(exc)
                return
        op.future.set_result(res)
