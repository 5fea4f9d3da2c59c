"""The worker side: one actor per run and worker that holds the run's connections and runs its tasks.

`runbook worker` preloads this module, so a worker has the engine imported before a run arrives.
Everything run-specific comes from the controller in `RunSession.setup` (a direct call to this
worker, never through the scheduler) and lives until `close`: the playbook model, the hosts, the
SSH connections of the hosts routed here, a task runner. Task orders then arrive on the run's
channel (channel.py), and each task's events, then its outcome, go back on it as they happen: one
ordered stream per worker, so an outcome never overtakes the events of its task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runbook.cluster import channel, stopping
from runbook.connections import Connection, ConnectOptions, connect, quiet_close
from runbook.connections.hostkeys import HostKeyPolicy
from runbook.cluster.sources import install_sources
from runbook.cluster.wire import (ChannelItem, Connected, ConnectReply, Gathered, SessionSetup, TaskError, TaskOrder,
                                  TaskOutcome, WireEvent)
from runbook.engine.predict import Predictor
from runbook.engine.registers import Registers
from runbook.engine.task import TaskRunner
from runbook.errors import ConnectionFailed, RunbookError
from runbook.events import EventStream, Observer, RunInfo, TaskRef
from runbook.facts import Facts, FactsError
from runbook.graph import StepGraph, TaskKey, expand
from runbook.results import Status, TaskResult

MAX_EVENTS_PER_BATCH = 2000   # events in one message of the channel, at most
HOLD = 0.005     # seconds a batch of events may wait, after its first event, for an outcome to carry along


class LoggedRegisters(Registers):
    """The run's registers on a worker: loaded from each task's order, every write kept for the controller."""

    def __init__(self, hosts: list[str]):
        super().__init__(hosts)
        self._writes: dict[str, list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = defaultdict(list)

    def load(self, host: str, values: dict[str, Any], unknown: dict[str, str], stale: list[str]) -> None:
        """What the controller says the task on `host` sees."""
        with self._lock:
            self.by_host.setdefault(host, {}).update(values)
            self.unknown.setdefault(host, {}).update(unknown)
            self.stale.update((host, n) for n in stale)

    def store(self, host: str, name: str, value: dict[str, Any], *, shared: bool) -> None:
        super().store(host, name, value, shared=shared)
        with self._lock:
            self._writes[host].append(("store", (host, name, value), {"shared": shared}))

    def mark_unknown(self, host: str, name: str, step_id: str, *, stale: bool) -> None:
        super().mark_unknown(host, name, step_id, stale=stale)
        with self._lock:
            self._writes[host].append(("mark_unknown", (host, name, step_id), {"stale": stale}))

    def drain(self, host: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        """The writes for `host` not yet sent (a task's outcome carries every write made before it ended)."""
        with self._lock:
            return self._writes.pop(host, [])


class _Forward(Observer):
    """The worker's only observer: every event goes to the controller, tagged with its task."""

    critical = True
    what = "the controller's event stream"

    def __init__(self, run: WorkerRun):
        self.run = run

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        self.run.emit(task.host, task.step_id, "task_started", (task,))

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        result.worker = self.run.name
        self.run.emit(result.host, result.step_id, "task_finished", (result,))

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        self.run.emit(host, step_id, "approval", (host, step_id, granted, who))

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        self.run.emit(None, None, "notice", (level, message))


@dataclasses.dataclass
class _TaskLog:
    task_id: int
    count: int = 0   # events emitted so far: the next one's place in the task


class WorkerRun:
    """One run on one worker: its task runner, the connections of its hosts, and the events of running tasks."""

    def __init__(self, setup: SessionSetup, name: str, push: Callable[[WireEvent], None]):
        self.setup = setup
        self.name = name
        self.push = push
        self.info = setup.info
        self.hosts: dict[str, Any] = {h.name: h for h in setup.hosts}
        self.dir = Path(tempfile.mkdtemp(prefix="runbook-run-"))   # 0700: the run's known_hosts copy, its sources
        self.known_hosts = self.dir / "known_hosts"
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(setup.known_hosts)
        self.from_controller = set(setup.known_hosts.splitlines())
        steps = StepGraph.build(setup.playbook)
        tasks = expand(steps, [h.name for h in setup.hosts])
        self.options = setup.options
        self.registers = LoggedRegisters(list(self.hosts))
        self.events = EventStream([_Forward(self)])
        self.runner = TaskRunner(setup.playbook, steps, self.hosts, self.info, self.events, self.options,
                                 self.registers, self._connection)
        self.results: dict[TaskKey, TaskResult] = {}   # what the predictor may ask of the tasks a task waits for
        self.gates: dict[TaskKey, tuple[Status, str] | None] = {}   # blocks: the controller's rescue verdicts
        self.runner.block_gate = self.gates.get
        self.predictor = Predictor(self.runner, tasks, self.results, self.options.predictions,
                                   allow_drift=self.options.allow_drift, stop_host=self._stop_host, warn=self._warn)
        self.runner.handler = self.predictor.handler_for(self.options.mode) or self.runner.handler
        self.conns: dict[str, Connection] = {}
        self.sudo_password: str | None = None
        self.lock = threading.Lock()
        self.host_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self.active: dict[tuple[str, str], _TaskLog] = {}
        self.stopped: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.facts_shared: set[str] = set()   # hosts whose facts the controller has (sent, or came from it)

    # --- events --------------------------------------------------------------------------------

    def emit(self, host: str | None, step_id: str | None, hook: str, args: tuple[Any, ...]) -> None:
        """Tag an event with its task (loop items belong to their step's task) and send it."""
        with self.lock:
            log = self.active.get((host, step_id.split("[", 1)[0])) if host and step_id else None
            event = WireEvent(log.task_id if log else None, log.count if log else 0, hook, args)
            if log is not None:
                log.count += 1
        self.push(event)

    def _stop_host(self, host: str, reason: str) -> None:
        with self.lock:
            self.stopped[host].append((host, reason))

    def _warn(self, message: str) -> None:
        self.events.notice(self.info, "warning", message)

    # --- connections -----------------------------------------------------------------------------

    def connect(self, host: str, sudo_password: str | None) -> ConnectReply:
        """Open the connection of a host routed here (with the controller's host-key policy and known_hosts)."""
        if host not in self.hosts:
            return ConnectReply(f"host {host!r} is not part of this run")
        if sudo_password is not None:
            self.sudo_password = sudo_password
        try:
            self._open(host)
        except ConnectionFailed as exc:
            return ConnectReply(exc.reason, exc.hint, self._learned())
        except Exception as exc:   # reported like the in-process connect reports it
            return ConnectReply(f"{type(exc).__name__}: {exc}")
        return ConnectReply(learned=self._learned())

    def _open(self, host: str) -> Connection:
        with self.host_locks[host]:
            conn = self.conns.get(host)
            if conn is not None:
                return conn
            h = self.hosts[host]
            options = ConnectOptions(host_key_checking=self.setup.host_key_checking, known_hosts=str(self.known_hosts),
                                     connect_timeout=self.setup.connect_timeout, sudo_password=self.sudo_password)
            conn = connect(h, h.connection, options)
            policy = getattr(conn, "host_keys", None)
            if isinstance(policy, HostKeyPolicy):
                policy.system_files = ()   # the controller's system known_hosts came with the run; not this machine's
            conn.open()
            self.conns[host] = conn
            return conn

    def _connection(self, host: str, step: Any = None, delegate: str | None = None) -> Connection:
        if delegate is not None:   # the controller keeps delegated steps (it holds the delegate connections)
            raise RunbookError(f"{host}: a delegated step cannot run on a cluster worker",
                               hint="this is a bug in runbook: delegated steps run on the controller")
        # A host moved here from a lost worker is connected on its first task.
        return self.conns.get(host) or self._open(host)

    def _learned(self) -> list[str]:
        """known_hosts lines recorded here (accept-new) during the run; the controller keeps each host's own."""
        try:
            lines = self.known_hosts.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [line for line in lines if line and line not in self.from_controller]

    def close_host(self, host: str) -> None:
        """A host is done: close its connection."""
        conn = self.conns.pop(host, None)
        if conn is not None:
            quiet_close(conn)

    # --- tasks ---------------------------------------------------------------------------------

    def run(self, order: TaskOrder) -> TaskOutcome:
        """Run one task as the controller ordered it; its outcome carries its register writes and drift stops."""
        key = order.key
        log = _TaskLog(order.task_id)
        with self.lock:
            self.active[(key.host, key.step_id)] = log
            self.options.secrets.update(order.secrets)   # only what this worker's tasks read
        self.registers.load(key.host, order.registers, order.unknown, order.stale)
        if order.facts is not None:   # a host moved here keeps the facts it had: no second gather mid-run
            self.runner.facts.put(key.host, order.facts)
            with self.lock:
                self.facts_shared.add(key.host)
        steps = self.runner.steps
        self.gates[key] = order.gate
        for node, kind in order.ancestors.items():
            self.results[node] = TaskResult(node.host, node.step_id, steps.step(node.step_id).action, Status.OK,
                                            prediction=kind)
        try:
            result = self.runner.run(key, order.rescue)
        finally:
            with self.lock:
                self.active.pop((key.host, key.step_id), None)
            self.gates.pop(key, None)
        result.worker = self.name
        with self.lock:
            stopped = self.stopped.pop(key.host, [])
        return TaskOutcome(order.task_id, result, self.registers.drain(key.host), stopped, self.name,
                           self._share_facts(key.host))

    def gather(self, host: str) -> Gathered:
        """A host's facts for a step on the controller, gathered here (over its connection) unless known."""
        if host not in self.hosts:
            return Gathered(host, reason=f"host {host!r} is not part of this run")
        try:
            facts = self.runner.facts.get(host, lambda: self._connection(host))
        except FactsError as exc:
            return Gathered(host, reason=exc.reason)
        except ConnectionFailed as exc:
            return Gathered(host, reason=exc.reason, failed="connect")
        except (OSError, EOFError) as exc:
            return Gathered(host, reason=str(exc), failed="connection")
        with self.lock:
            self.facts_shared.add(host)
        return Gathered(host, facts)

    def _share_facts(self, host: str) -> Facts | None:
        """The host's facts if the controller has not got them yet (then it has): each crosses once."""
        facts = self.runner.facts.known(host)
        with self.lock:
            if facts is None or host in self.facts_shared:
                return None
            self.facts_shared.add(host)
        return facts

    def abort(self) -> None:
        """A second interrupt on the controller: running commands end now."""
        self.runner.aborting = True
        self.runner.cancel.set()
        for conn in list(self.conns.values()):
            quiet_close(conn)

    def close(self) -> None:
        """The run is over: close every connection and remove the run's files."""
        for host in list(self.conns):
            self.close_host(host)
        shutil.rmtree(self.dir, ignore_errors=True)


class RunSession:
    """A Dask actor: a run's `WorkerRun` on one worker, its blocking work on the session's own threads."""

    def __init__(self) -> None:
        from distributed import get_worker

        worker = get_worker()
        channel.install(worker)   # a plain `dask worker` (no preload) gets the channel's handler here
        self.name = str(worker.name)
        self.token: str | None = None
        self.threads: ThreadPoolExecutor | None = None
        self.work: WorkerRun | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[ChannelItem] | None = None

    async def setup(self, setup: SessionSetup, token: str) -> str:
        """Take the run (sent once per worker); returns this worker's name, recorded in task results.

        `token` is the one its controller's channel presents (channel.py)."""
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.threads = ThreadPoolExecutor(max_workers=max(2, setup.threads + 1), thread_name_prefix="runbook-task")
        self.work = await self._off(WorkerRun, setup, self.name, self._push)
        self.token = token
        channel.offer(token, self)
        return self.name

    def _push(self, event: ChannelItem) -> None:
        loop, queue = self.loop, self.queue
        if loop is not None and queue is not None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:   # the worker is shutting down: the controller counts its tasks as lost
                pass

    async def _off(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self.loop is not None and self.threads is not None
        return await self.loop.run_in_executor(self.threads, fn, *args)

    def _run(self) -> WorkerRun:
        if self.work is None:
            raise RuntimeError("this run session was not set up")
        return self.work

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` on the session's threads; what it has to say comes back through `events`, not awaited here."""
        if self.threads is None:
            raise RuntimeError("this run session was not set up")
        self.threads.submit(fn, *args)

    def connect_later(self, host: str, sudo_password: str | None) -> None:
        """Open a host's connection here (the channel's connect); the answer comes back through `events`."""
        self._later(self._connect_one, self._run(), host, sudo_password)

    def _connect_one(self, work: WorkerRun, host: str, sudo_password: str | None) -> None:
        try:
            reply = work.connect(host, sudo_password)
        except Exception as exc:   # connect reports its own failures: this is a bug, said as such
            reply = ConnectReply(f"internal error on this cluster worker: {type(exc).__name__}: {exc}")
        self._push(Connected(host, reply))

    def gather_later(self, host: str) -> None:
        """Gather a host's facts here (the channel's facts request); the answer comes back through `events`."""
        self._later(self._gather_one, self._run(), host)

    def _gather_one(self, work: WorkerRun, host: str) -> None:
        try:
            reply = work.gather(host)
        except Exception as exc:   # gather reports its own failures: this is a bug, said as such
            reply = Gathered(host, reason=f"internal error on this cluster worker: {type(exc).__name__}: {exc}")
        self._push(reply)

    def run_later(self, orders: list[TaskOrder]) -> None:
        """Start tasks here (the channel's orders); each one's outcome comes back through `events`, after its events."""
        work = self._run()
        for order in orders:
            # Before any task starts: a later order of the step (not carrying them) may run first.
            install_sources(work.setup.playbook, order.sources, work.dir)
            self._later(self._run_one, work, order)

    def _run_one(self, work: WorkerRun, order: TaskOrder) -> None:
        with stopping.RUNNING.task():   # a stopping `runbook worker` lets it finish
            try:
                self._push(work.run(order))
            except Exception as exc:   # the runner itself reports task failures: this is a bug, said as such
                self._push(TaskError(order.task_id, f"{type(exc).__name__}: {exc}"))

    async def events(self, wait: float = 1.0) -> list[ChannelItem]:
        """The next batch for the channel: events and outcomes since the last, in order, waiting up to `wait` s for one.

        A batch holds on (up to HOLD) until it carries an outcome: a task's start and its end then
        travel together when the task is quick, and a slow task's start still goes out at once.
        """
        queue, loop = self.queue, self.loop
        if queue is None or loop is None:
            return []
        try:
            out: list[ChannelItem] = [await asyncio.wait_for(queue.get(), wait)]
        except TimeoutError:
            return []
        deadline = loop.time() + HOLD
        while len(out) < MAX_EVENTS_PER_BATCH:
            while not queue.empty() and len(out) < MAX_EVENTS_PER_BATCH:
                out.append(queue.get_nowait())
            left = deadline - loop.time()
            if left <= 0 or any(not isinstance(item, WireEvent) for item in out):
                break
            try:
                out.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return out

    def close_later(self, host: str) -> None:
        """Close one host's connection (the channel's close), on the session's threads."""
        self._later(self._run().close_host, host)

    def drain(self) -> None:
        """A first interrupt on the controller: running loops here start no further item."""
        self._run().runner.draining.set()

    async def abort(self) -> None:
        """End running commands now (a second interrupt)."""
        await self._off(self._run().abort)

    async def close(self) -> None:
        """End the run here: connections closed, the run's files removed, the threads let go."""
        if self.token is not None:
            channel.withdraw(self.token)
        if self.work is not None:
            await self._off(self.work.close)
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)


def dask_setup(worker: Any) -> None:
    """Preload hook of `dask worker --preload runbook.cluster.worker`: the engine is imported, the channel ready."""
    import runbook.connections.ssh  # noqa: F401  (paramiko and Fabric too: a run's first connects need not wait)

    channel.install(worker)


def dask_teardown(worker: Any) -> None:
    """Preload hook, run as the worker begins to close: under `runbook worker`, the process then ends (stopping.py)."""
    stopping.arm(os.environ)
