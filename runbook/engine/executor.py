"""The executor: connects hosts and runs ready tasks on a bounded thread pool; interrupts and windows stop it.

What is ready is the scheduler's decision (scheduling.py); how one task runs is the task runner's
(task.py) and, in a dry run or an apply, the predictor's (predict.py). The executor only moves work
between them and emits events; it prints, logs and saves nothing itself.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import networkx as nx

from runbook.engine.connections import RunConnections
from runbook.engine.interrupts import Interrupts
from runbook.engine.options import ExecOptions, HostLike, WindowGuardLike
from runbook.engine.predict import Predictor
from runbook.engine.registers import Registers
from runbook.engine.scheduling import TaskScheduler
from runbook.engine.task import ABORTED, TaskRunner
from runbook.errors import ConnectionFailed
from runbook.events import EventStream, ObserverFailed, RunInfo
from runbook.facts import FactStore
from runbook.graph import StepGraph, TaskKey, expand
from runbook.model import Playbook, Step
from runbook.results import RunResult, Status, TaskResult

WINDOW_CLOSED = "maintenance window closed"
ABORT_WAIT = 3.0   # seconds to let tasks whose connections were closed report before giving up on them


class _Stop(Exception):
    """Raised inside the loop when a run must stop scheduling at once (second interrupt, grace over)."""


@dataclasses.dataclass(frozen=True)
class _Rescue:
    """A running on_failure task (it is recorded, but neither releases nor blocks main tasks)."""

    key: TaskKey


class TaskPool(Protocol):
    """Where the executor's work runs: connecting a host and running one task, each as a future."""

    def connect(self, host: str) -> Future[None]:
        """Connect `host`; the future fails with the reason when it cannot be reached."""
    def run(self, key: TaskKey, rescue: bool = False) -> Future[TaskResult]:
        """Run one task (`rescue`: an on_failure step) and report it; the future holds its result."""
    def drain(self) -> None:
        """A first interrupt (or a caller's stop): running loops start no further item."""
    def abort(self) -> None:
        """A second interrupt: make running tasks end now."""
    def shutdown(self, wait: bool) -> None:
        """No more work: release what the pool holds."""


class ThreadPool:
    """The default pool: every task runs in this process, on a bounded thread pool."""

    def __init__(self, executor: Executor, workers: int):
        self.executor = executor
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runbook")

    def connect(self, host: str) -> Future[None]:
        return self.pool.submit(self.executor.connections.open, host)

    def run(self, key: TaskKey, rescue: bool = False) -> Future[TaskResult]:
        return self.pool.submit(self.executor.runner.run, key, rescue)

    def drain(self) -> None:
        return None   # the executor's runner is this pool's: its `draining` is set already

    def abort(self) -> None:
        return None   # the executor closes the connections and cancels the runner itself

    def shutdown(self, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


class Executor:
    """Runs one playbook over hosts: expands the task graph and runs ready tasks on a bounded pool."""

    def __init__(self, playbook: Playbook, hosts: Sequence[HostLike], run: RunInfo, events: EventStream,
                 options: ExecOptions, steps: StepGraph | None = None):
        self.playbook = playbook
        self.steps = steps or StepGraph.build(playbook)
        self.hosts = {h.name: h for h in hosts}
        self.host_order = [h.name for h in hosts]
        self.info = run
        self.events = events
        self.opt = options
        self.tasks: nx.DiGraph = expand(self.steps, self.host_order)
        self.result = RunResult(run.run_id, options.mode, list(self.host_order))
        self.connections = RunConnections(self.hosts, options.connect, options.inventory_hosts)
        self.scheduler = TaskScheduler(self.tasks, self.steps, self.host_order, mode=options.mode, batch=playbook.batch,
                                       max_failures=playbook.max_failures, emit=self._emit, notice=self._warn,
                                       rescued=self._rescued)
        self.result.unreachable = self.scheduler.unreachable
        self.runner = TaskRunner(playbook, self.steps, self.hosts, run, events, options,
                                 Registers(self.host_order, options.registers), self.connections.for_task, FactStore())
        self.runner.notifications.results = self.scheduler.results   # handlers run by what their notifiers did
        if self.scheduler.blocks is not None:   # a block's rescue steps run only where the block failed
            self.runner.block_gate = self.scheduler.blocks.rescue_gate
        self.predictor = Predictor(self.runner, self.tasks, self.scheduler.results, options.predictions,
                                   allow_drift=options.allow_drift, stop_host=self.scheduler.stop_host, warn=self._warn)
        self.runner.handler = self.predictor.handler_for(options.mode) or self.runner.handler
        self.concurrency = options.concurrency or playbook.concurrency
        self.running = RunningTasks()
        self.interrupts = Interrupts()
        self.connecting: dict[Future[None], str] = {}
        self.stopping = False
        self.abort_deadline: float | None = None
        self.pool: TaskPool | None = None

    # --- public ------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        """Run every task and return the run's result; never raises for task or host failures."""
        self.result.started_at = time.time()
        if self.opt.handle_signals:
            self.interrupts.install()
        try:
            self.events.run_started(self.info)
            self._loop()
        except ObserverFailed as exc:
            if not self.scheduler.recorded:
                self._record_unstarted_after(exc)
            # An observer that must not lose events (audit trail, run state) failed: stop cleanly.
            self.result.stop_reason = str(exc)
            self.result.observer_failed = str(exc)
            self.result.environment_failed = exc.environment
        finally:
            self.interrupts.restore()
            self.connections.close_all()
        self.result.finished_at = time.time()
        position = {h: i for i, h in enumerate(self.host_order)}  # not list.index: O(tasks x hosts) at scale
        self.result.results = sorted(self.scheduler.recorded, key=lambda r: (position.get(r.host, 0), r.started_at or 0.0))
        try:
            self.events.run_finished(self.info, self.result)
        except ObserverFailed as exc:   # e.g. the audit trail could not write the run's last record
            if not self.result.observer_failed:
                self.result.observer_failed, self.result.environment_failed = str(exc), exc.environment
        return self.result

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        width = max((len(layer) for layer in self.steps.layers()), default=1)
        workers = max(1, min(self.concurrency * width, 256))
        pool: TaskPool = self.opt.pool(self, workers) if self.opt.pool else ThreadPool(self, workers)
        self.pool = pool
        try:
            self.scheduler.replay(self.opt.previous)
            while True:
                try:
                    if not self._tick(pool):
                        break
                except KeyboardInterrupt:
                    self._interrupted()
        except (_Stop, ObserverFailed) as exc:
            self._abort()
            if isinstance(exc, ObserverFailed):
                raise
        finally:
            pool.shutdown(wait=not self.result.interrupted)
            self._record_unstarted()

    def _take_signals(self) -> None:
        """Act on the interrupts received since the last round: the first stops the run, the second aborts it."""
        for _ in range(self.interrupts.take()):
            self._interrupted()

    def _tick(self, pool: TaskPool) -> bool:
        """One round: admit hosts, start what is ready, collect what finished; False when the run is over."""
        self._take_signals()
        if self.opt.stop is not None and self.opt.stop.is_set() and not self.stopping:
            self._stopped_by_caller()
        if not self.stopping:
            reason = self.scheduler.check_failure_limit()
            if reason:
                self.result.stop_reason = reason
                self._warn(reason + "; no new host or batch starts")
            for host in self.scheduler.admit(self.concurrency, len(self.connecting)):
                self.connecting[pool.connect(host)] = host
        for host in list(self.scheduler.active):
            if self.connections.is_open(host):
                self._start_host_work(pool, host)
        if not self.running and not self.connecting:
            return not self.stopping and bool(self.scheduler.active or self.scheduler.more_to_admit())
        futures: list[Future[Any]] = [*self.running.futures, *self.connecting]
        done, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
        self._take_signals()
        if done:
            self.events.sync()   # what finished is durable before anything that depends on it starts
        for fut in done:
            self._collect(fut)
        if self.abort_deadline is not None and time.monotonic() > self.abort_deadline:
            raise _Stop()
        return True

    def _start_host_work(self, pool: TaskPool, host: str) -> None:
        """Start every ready task of a connected host; then its on_failure steps, one at a time; then release it."""
        busy = self.running.on(host) > 0
        while not self.stopping:
            node = self.scheduler.take(host)
            if node is None:
                break
            verdict = window_verdict(self.opt.window_guard, self.steps.step(node.step_id), node, self.scheduler)
            if verdict == "closed":
                self._window_closed()
                break
            if verdict == "deferred":
                continue
            self.running.add(pool.run(node), node)
            busy = True
        if not self.stopping and not busy:
            sid = self.scheduler.next_rescue(host)
            if sid is not None:
                self.running.add(pool.run(TaskKey(sid, host), True), _Rescue(TaskKey(sid, host)))
                busy = True
        if not busy and self.scheduler.settled(host):
            self.scheduler.release(host)
            self.connections.close(host)

    def _window_closed(self) -> None:
        self.stopping = True
        self.result.stop_reason = WINDOW_CLOSED
        self._warn("the maintenance window closed: no new task starts; the rest is deferred "
                   "(`runbook resume RUN_ID` continues it)")

    def _collect(self, fut: Future[Any]) -> None:
        """Take in one finished connection attempt or task."""
        if fut in self.connecting:
            host = self.connecting.pop(fut)
            err = fut.exception()
            if err is not None:
                reason = err.reason if isinstance(err, ConnectionFailed) else f"{type(err).__name__}: {err}"
                self.events.host_unreachable(self.info, host, reason)
                self.scheduler.host_unreachable(host, reason)
            return
        key = self.running.pop(fut)
        res = fut.result()
        if isinstance(key, _Rescue):
            self.scheduler.record(key.key, res)   # step ids are unique across steps and on_failure
        else:
            self.scheduler.finish(key, res)

    # --- stopping --------------------------------------------------------------------------------

    def _interrupted(self) -> None:
        """First interrupt: no new task starts, running ones may finish; a second one aborts them."""
        if self.result.interrupted:
            raise _Stop() from None
        self.abort_deadline = time.monotonic() + self.opt.interrupt_grace
        self._stop_starting("interrupted", "interrupted: no new task starts; running tasks may finish "
                                           "(interrupt again to abort them)")

    def _stopped_by_caller(self) -> None:
        """The embedding program asked to stop: like a first interrupt (no new task; running ones finish)."""
        reason = "stopped: the program running it is shutting down"
        self._stop_starting(reason, reason + "; no new task starts, running tasks finish (`runbook resume RUN_ID` "
                                             "continues it)")

    def halt(self, reason: str) -> None:
        """Stop starting work for a reason outside the run (its cluster was lost); running tasks are collected."""
        if not self.stopping:
            self._stop_starting(reason, reason + "; no new task starts (`runbook resume RUN_ID` continues it)",
                                drain=False)

    def _stop_starting(self, reason: str, message: str, drain: bool = True) -> None:
        """No new task starts; with `drain`, running loops start no further item either, here and on the pool."""
        self.stopping = True
        if drain:
            self.runner.draining.set()
            if self.pool is not None:
                self.pool.drain()
        self.result.interrupted = True
        self.result.stop_reason = reason
        self.events.run_interrupted(self.info, message)

    def _abort(self) -> None:
        """Drop the connections so running commands end now; record what the running tasks report."""
        self.stopping = True
        self.runner.aborting = True
        self.runner.cancel.set()
        if self.pool is not None:
            self.pool.abort()
        self.connections.close_all()
        done, _ = wait(list(self.running.futures), timeout=ABORT_WAIT)
        for fut in done:
            key = self.running.pop(fut)
            if isinstance(key, TaskKey) and key not in self.scheduler.results:
                self.scheduler.record(key, fut.result())
        for key in list(self.running.futures.values()):
            if isinstance(key, TaskKey) and key not in self.scheduler.results:
                res = self.scheduler.result(key, Status.FAILED, ABORTED)
                self.scheduler.record(key, res)
                self.events.task_finished(self.info, res)

    def _record_unstarted_after(self, exc: ObserverFailed) -> None:
        """The run could not even start (e.g. the audit trail cannot be written): nothing ran."""
        self.result.stop_reason = str(exc)
        try:
            self._record_unstarted()
        except ObserverFailed:
            pass   # the others got what they could; the first failure is the one reported

    def _record_unstarted(self) -> None:
        """Whatever never started: deferred (window), or not run (interrupt, max_failures, a failed observer)."""
        status = Status.DEFERRED if self.result.stop_reason == WINDOW_CLOSED else Status.NOT_RUN
        self.scheduler.record_unstarted(status, f"not started: {self.result.stop_reason or 'not started'}")

    # --- events -------------------------------------------------------------------------------

    def _emit(self, res: TaskResult) -> None:
        self.events.task_finished(self.info, res)

    def _warn(self, message: str) -> None:
        self.events.notice(self.info, "warning", message)

    def _rescued(self, host: str, block: str, step_ids: list[str]) -> None:
        self.events.block_rescued(self.info, host, block, step_ids)


class RunningTasks:
    """The tasks handed to the pool and not collected yet, counted per host (no scan of them all per host and round)."""

    def __init__(self) -> None:
        self.futures: dict[Future[TaskResult], TaskKey | _Rescue] = {}
        self._per_host: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return bool(self.futures)

    def add(self, fut: Future[TaskResult], key: TaskKey | _Rescue) -> None:
        """`key` runs as `fut`."""
        self.futures[fut] = key
        self._per_host[_host_of(key)] += 1

    def pop(self, fut: Future[TaskResult]) -> TaskKey | _Rescue:
        """`fut` is collected: the task it ran."""
        key = self.futures.pop(fut)
        self._per_host[_host_of(key)] -= 1
        return key

    def on(self, host: str) -> int:
        """How many of `host`'s tasks are running."""
        return self._per_host[host]


def window_verdict(guard: WindowGuardLike | None, step: Step, node: TaskKey,
                   scheduler: TaskScheduler) -> Literal["start", "deferred", "closed"]:
    """Whether the maintenance window lets a task start; one that cannot finish before the close is deferred."""
    if guard is None or guard.allows_start(step.max_duration):
        return "start"
    if step.max_duration is not None and guard.allows_start(None):
        # Only this step cannot finish before the close: defer it (its successors wait for it);
        # other tasks may still start while the window is open.
        scheduler.finish(node, scheduler.result(node, Status.DEFERRED, "not started: max_duration does "
                                                "not fit before the maintenance window closes"))
        return "deferred"
    scheduler.put_back(node)   # the window is closing: it stays for `runbook resume`
    return "closed"


def _host_of(key: TaskKey | _Rescue) -> str:
    return key.key.host if isinstance(key, _Rescue) else key.host


