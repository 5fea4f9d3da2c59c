"""The controller side: a task pool that runs each host's tasks on its Dask worker.

The executor asks this pool (its `TaskPool`) to connect hosts and run tasks, and gets futures back,
as from the in-process thread pool. The orders made in one pass of the executor go to each worker
in one message of its channel (channel.py); each worker's events and outcomes come back, in order,
on the same channel, and go to the run's delivery thread (delivery.py), which re-emits them and
resolves the futures.

A worker that disappears takes its running tasks with it: they end `lost` (never run again
elsewhere), and its hosts move to other workers of their zone. A lost scheduler stops the run like an
interrupt: nothing new starts, and `runbook resume` continues it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from runbook.actions import action_class
from runbook.cluster.channel import Channel
from runbook.cluster.hostkeys import KnownHostsSink
from runbook.cluster.routing import Router
from runbook.cluster.secrets import SecretNeeds
from runbook.cluster.sources import Shipments
from runbook.cluster.delivery import Delivery, Call
from runbook.cluster.facts import RunFacts
from runbook.cluster.wire import Gathered, SessionSetup, StreamItem, TaskOrder
from runbook.cluster.worker import RunSession
from runbook.errors import ConnectionFailed, RunbookError
from runbook.graph import TaskKey
from runbook.model import Step
from runbook.results import PredictionKind, RunMode, Status, TaskResult

WATCH_EVERY = 0.5         # seconds between checks that every worker and the scheduler are still there
SCHEDULER_GRACE = 3       # failed checks in a row before the scheduler counts as lost
CLOSE_TIMEOUT = 5.0


class RemoteHost:
    """What the executor holds as a remote host's connection: closing it closes the connection on its worker."""

    def __init__(self, pool: ClusterPool, host: str):
        self.pool = pool
        self.name = host

    def close(self) -> None:
        self.pool.close_host(self.name)

    def __getattr__(self, name: str) -> Any:
        raise RunbookError(f"{self.name}: its connection is on cluster worker {self.pool.router.worker_of(self.name)}",
                           hint="a step that runs on the controller cannot use a remote host's connection")


class ClusterPool:
    """The executor's TaskPool on a Dask cluster (see the module docstring)."""

    def __init__(self, run: ClusterRun, executor: Any):
        self.cluster = run
        self.executor = executor
        self.client = run.client
        self.router: Router = run.router
        self.sessions = run.sessions
        self.names = run.names
        self.loop: asyncio.AbstractEventLoop = run.client.loop.asyncio_loop
        self.local = ThreadPoolExecutor(max_workers=8, thread_name_prefix="runbook")   # controller-side tasks
        self.facts = RunFacts(executor.runner.facts, lambda host: host in self.router.zones, self.router.worker_of,
                              self._ask_facts)
        self.delivery = Delivery(executor, self.names, self.facts)
        self.ops = self.delivery.ops
        self.ids = itertools.count(1)
        self.lock = self.delivery.lock
        self.connected: dict[str, set[str]] = {a: set() for a in self.sessions}
        self.outbox: dict[str, list[TaskOrder]] = {}
        self.asks: dict[str, bool] = {}   # action -> whether it prompts the operator (looked up once)
        self.gone: set[str] = set()
        self.halted: str | None = None
        self.closing = False
        self.background = [self._spawn(self._stream(a)) for a in self.sessions] + [self._spawn(self._watch())]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    # --- the TaskPool protocol ---------------------------------------------------------------------

    def connect(self, host: str) -> Future[None]:
        """Connect a host on its worker (hosts of the local kind connect here, as in-process)."""
        if host not in self.router.zones:
            return self.local.submit(self.executor.connections.open, host)
        fut: Future[None] = Future()
        if self.halted:
            fut.set_result(None)   # nothing starts: its tasks are recorded not run
            return fut
        self._spawn(self._connect(host, fut))
        return fut

    def run(self, key: TaskKey, rescue: bool = False) -> Future[TaskResult]:
        """Run one task on its host's worker, or here when it must run on the controller."""
        step = self.executor.steps.step(key.step_id)
        if not self._remote(key.host, step):
            return self.local.submit(self.executor.runner.run, key, rescue)
        fut: Future[TaskResult] = Future()
        if self.halted:
            self.executor.halt(self.halted)
            fut.set_result(self.executor.scheduler.result(key, Status.NOT_RUN, f"not started: {self.halted}"))
            return fut
        worker = self.router.worker_of(key.host)
        if worker is None:   # its zone has no worker left: from here, the host cannot be reached
            fut.set_result(self.executor.scheduler.result(
                key, Status.UNREACHABLE, f"no cluster worker is left for it{_zone(self.router, key.host)}"))
            return fut
        task_id = next(self.ids)
        op = Call(fut, key.host, key, rescue, worker=worker)
        with self.lock:
            self.ops[task_id] = op
        order = task_order(self.executor, task_id, key, rescue, self.cluster.needs.of(step))
        order.sources = self.cluster.shipments.for_order(worker, self.executor.runner, key, step)
        with self.lock:   # orders made in one pass of the executor go to their worker in one call
            outbox = self.outbox.setdefault(worker, [])
            outbox.append(order)
            flush = len(outbox) == 1
        if flush:
            self.loop.call_soon_threadsafe(self._flush_soon, worker)
        return fut

    def drain(self) -> None:
        """A first interrupt: loops running on the workers start no further item."""
        for worker, chan in self.cluster.channels.items():
            if worker not in self.gone:
                self._spawn(_quietly(chan.drain()))

    def abort(self) -> None:
        """A second interrupt: every worker ends its running commands now."""
        for session in self.sessions.values():
            self._spawn(_quietly(session.abort()))

    def shutdown(self, wait: bool) -> None:
        """The run is over: stop watching, let every task's delivery finish, release the local threads."""
        self.closing = True
        for fut in self.background:
            fut.cancel()
        self.delivery.close()
        self.local.shutdown(wait=wait, cancel_futures=True)

    def close_host(self, host: str) -> None:
        """A host is done (or the run aborts): close its connection on its worker."""
        worker = self.router.worker_of(host)
        if worker is not None and worker in self.sessions and not self.closing:
            self._spawn(_quietly(self.cluster.channels[worker].close_host(host)))

    # --- what runs where ---------------------------------------------------------------------------

    def _remote(self, host: str, step: Step) -> bool:
        """Tasks run on the host's worker unless they belong on the controller (a local host, `on: controller`,
        an operator's prompt, a delegated step: the delegate connections are the controller's)."""
        if host not in self.router.zones or step.delegate is not None:
            return False
        asks = self.asks.get(step.action)
        if asks is None:
            asks = self.asks[step.action] = bool(action_class(step.action).asks_operator)
        return not asks

    # --- remote calls (on the client's event loop) ----------------------------------------------------

    async def _connect(self, host: str, fut: Future[None]) -> None:
        for _ in range(len(self.sessions) + 1):   # a worker lost meanwhile: its hosts moved, try the new one
            worker = self.router.worker_of(host)
            if worker is None:
                break
            try:
                reply = await self.cluster.channels[worker].connect(host, self.cluster.sudo_password)
            except OSError as exc:   # the worker is gone: the host moves, and connects on its new worker
                self._worker_gone(worker, f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:   # the worker answered with an error: a bug there
                fut.set_exception(ConnectionFailed(host, f"internal error on cluster worker "
                                                         f"{self.names.get(worker, worker)}: {type(exc).__name__}: {exc}"))
                return
            self.cluster.known_hosts.record(host, reply.learned)
            if reply.reason is not None:
                fut.set_exception(ConnectionFailed(host, reply.reason, hint=reply.hint))
                return
            with self.lock:
                self.connected.setdefault(worker, set()).add(host)
            self.executor.connections.add(host, RemoteHost(self, host))
            fut.set_result(None)
            return
        if not fut.done():
            fut.set_exception(ConnectionFailed(host, f"no cluster worker is left for it{_zone(self.router, host)}",
                                               hint="start a worker there: runbook worker tcp://SCHEDULER:8786 --zone NAME"))

    def _flush_soon(self, worker: str) -> None:
        asyncio.ensure_future(self._flush(worker))

    async def _flush(self, worker: str) -> None:
        """Send a worker every order waiting for it, in one call; its outcomes come back on its event stream."""
        with self.lock:
            orders = self.outbox.pop(worker, [])
        if not orders:
            return
        for order in orders:   # a host moved here brings the facts it had
            order.facts = self.facts.for_order(worker, order.key.host)
        try:
            for host in sorted({o.key.host for o in orders} - self.connected.get(worker, set())):
                reply = await self.cluster.channels[worker].connect(host, self.cluster.sudo_password)   # moved
                self.cluster.known_hosts.record(host, reply.learned)
                with self.lock:
                    self.connected.setdefault(worker, set()).add(host)
            await self.cluster.channels[worker].send(orders)
        except OSError as exc:   # the worker went away (or could not be reached): the tasks' outcome is unknown
            self._worker_gone(worker, f"{type(exc).__name__}: {exc}")
            for order in orders:
                self._lose(order.task_id, _lost_message(self.names.get(worker, worker)))
        except Exception as exc:   # the worker answered with an error: a bug there, not lost tasks
            for order in orders:
                self._lose(order.task_id, f"internal error on cluster worker {self.names.get(worker, worker)}: "
                                          f"{type(exc).__name__}: {exc}", Status.FAILED)

    def _ask_facts(self, worker: str, host: str) -> Gathered:
        """A host's facts from its worker, for a step on the controller (blocks that task's thread)."""
        try:
            return asyncio.run_coroutine_threadsafe(self.cluster.channels[worker].gather(host), self.loop).result()
        except OSError as exc:   # the worker is gone: its hosts move on; this task fails as on a broken connection
            self._worker_gone(worker, f"{type(exc).__name__}: {exc}")
            raise

    async def _stream(self, worker: str) -> None:
        """Read a worker's channel; what it sends is delivered in order."""
        channel = self.cluster.channels[worker]
        while not self.closing:
            try:
                events: list[StreamItem] = await channel.receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._worker_gone(worker, f"{type(exc).__name__}: {exc}")
                return
            if events:
                self.delivery.post(self.delivery.take, events)

    async def _watch(self) -> None:
        """Notice lost workers (their calls may hang) and a lost scheduler."""
        misses = 0
        while not self.closing:
            await asyncio.sleep(WATCH_EVERY)
            try:
                identity = await asyncio.wait_for(self.client.scheduler.identity(n_workers=-1), 5.0)
                misses = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                misses += 1
                if misses >= SCHEDULER_GRACE:
                    return self._scheduler_gone()
                continue
            alive = set(identity.get("workers", {}))
            for worker in self.sessions:
                if worker not in alive:
                    self._worker_gone(worker, "it left the cluster")

    # --- losses ------------------------------------------------------------------------------------

    def _worker_gone(self, worker: str, why: str) -> None:
        """A worker is gone: its running tasks are lost, its hosts move to other workers of their zone."""
        with self.lock:
            if worker in self.gone:
                return
            self.gone.add(worker)
            self.connected.pop(worker, None)
            unsent = self.outbox.pop(worker, [])   # never reached the worker: they go to the host's new one
            waiting = {o.task_id for o in unsent}
            running = [tid for tid, op in self.ops.items() if op.worker == worker and not op.done and tid not in waiting]
        # Connects waiting for its answer fail: their hosts move on.
        self.loop.call_soon_threadsafe(self.cluster.channels[worker].fail, ConnectionError(f"worker {worker} is gone"))
        moved = self.router.worker_lost(worker)
        self._resend(unsent)
        name = self.names.get(worker, worker)
        where = ", ".join(f"{h} -> {self.names.get(a, a) if a else 'no worker'}" for h, a in sorted(moved.items()))
        self.delivery.post(self.delivery.notice, f"cluster worker {name} was lost ({why}); {len(running)} task(s) running there "
                                          f"are lost" + (f"; hosts moved: {where}" if where else ""))
        for tid in running:
            self._lose(tid, _lost_message(name))

    def _resend(self, orders: list[TaskOrder]) -> None:
        """Orders of a lost worker that it never got: to their host's new worker (or lost: none is left)."""
        flush: set[str] = set()
        for order in orders:
            target = self.router.worker_of(order.key.host)
            with self.lock:
                op = self.ops.get(order.task_id)
                if op is not None and target is not None:
                    op.worker = target
                    self.outbox.setdefault(target, []).append(order)
                    flush.add(target)
            if target is None:   # it never started: unreachable from here, as a host whose connection fails
                self._lose(order.task_id, f"no cluster worker is left for it{_zone(self.router, order.key.host)}",
                           Status.UNREACHABLE)
        for target in flush:
            self._spawn(self._flush(target))

    def _scheduler_gone(self) -> None:
        """The scheduler is unreachable: running tasks are lost, nothing new starts."""
        self.halted = "the cluster scheduler was lost"
        with self.lock:
            running = [tid for tid, op in self.ops.items() if not op.done]
        for tid in running:
            self._lose(tid, "lost: the cluster scheduler was lost while this task ran; whether it ran is unknown "
                            "(check the host, then `runbook resume RUN_ID --rerun-in-flight`)")

    def _lose(self, task_id: int, message: str, status: Status = Status.LOST) -> None:
        self.delivery.post(self.delivery.lose, task_id, message, status)


def task_order(executor: Any, task_id: int, key: TaskKey, rescue: bool, secrets: dict[str, str]) -> TaskOrder:
    """A task's order: what the controller knows that the task needs (registers, plan context, a block's verdict)."""
    registers = executor.runner.registers
    ancestors: dict[TaskKey, PredictionKind | None] = {}
    if executor.opt.mode in (RunMode.PLAN, RunMode.APPLY):
        results = executor.scheduler.results
        for node in nx.ancestors(executor.tasks, key):
            found = results.get(node)
            if found is not None and found.prediction in (PredictionKind.CHANGE, PredictionKind.UNKNOWN):
                ancestors[node] = found.prediction
    stale = [name for host, name in list(registers.stale) if host == key.host]
    gate = executor.runner.block_gate
    return TaskOrder(task_id, key, rescue, registers.visible(key.host), registers.unknown_names(key.host), stale,
                     secrets, ancestors, gate(key) if gate is not None and not rescue else None)


def _lost_message(worker: str) -> str:
    return (f"lost: cluster worker {worker} was lost while it ran this task; whether it ran is unknown "
            "(check the host, then `runbook resume RUN_ID --rerun-in-flight`)")


def _zone(router: Router, host: str) -> str:
    zone = router.zones.get(host)
    return f" in zone {zone}" if zone else ""


async def _quietly(call: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(_awaited(call), CLOSE_TIMEOUT)


async def _awaited(call: Any) -> Any:
    return await call


@dataclass
class ClusterRun:
    """A run's cluster: the client, the routing, one set-up session per worker; made before anything runs."""

    client: Any
    router: Router
    sessions: dict[str, Any]          # worker address -> RunSession actor
    channels: dict[str, Channel]      # worker address -> the session's channel (orders out, events back)
    names: dict[str, str]             # worker address -> its name (recorded in task results)
    needs: SecretNeeds
    sudo_password: str | None
    known_hosts: KnownHostsSink
    shipments: Shipments
    actor_futures: list[Any] = field(default_factory=list)

    def pool(self, executor: Any, threads: int) -> ClusterPool:
        """The executor's pool for this run (ExecOptions.pool)."""
        return ClusterPool(self, executor)

    @classmethod
    def start(cls, client: Any, router: Router, setup: SessionSetup, needs: SecretNeeds, sudo_password: str | None,
              known_hosts: KnownHostsSink, shipments: Shipments) -> ClusterRun:
        """One session per worker that has hosts, each set up with the run (sent directly to its worker)."""
        used = router.eligible()   # every worker a host may run on, now or after a loss
        futures = [client.submit(RunSession, workers=[a], allow_other_workers=False, actor=True, pure=False, retries=0,
                                 key=f"runbook-session-{setup.info.run_id}-{i}") for i, a in enumerate(used)]
        sessions: dict[str, Any] = {}
        names: dict[str, str] = {}
        channels: dict[str, Channel] = {}
        loop = client.loop.asyncio_loop
        worker = "?"
        try:
            for worker, future in zip(used, futures):
                sessions[worker] = future.result(timeout=60)
            tokens = {a: secrets.token_urlsafe(32) for a in sessions}
            replies = {a: s.setup(setup, tokens[a]) for a, s in sessions.items()}
            for worker, reply in replies.items():
                names[worker] = str(reply.result(timeout=120))
            for worker in sessions:
                opening = Channel.open(worker, client.connection_args, tokens[worker])
                channels[worker] = asyncio.run_coroutine_threadsafe(opening, loop).result(timeout=60)
        except Exception as exc:   # nothing has run yet: say which worker, and what the controller needs of it
            for chan in channels.values():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(chan.close(), loop).result(timeout=CLOSE_TIMEOUT)
            with contextlib.suppress(Exception):
                client.cancel(futures)
            raise RunbookError(f"cannot set up the run on cluster worker {worker}: {type(exc).__name__}: {exc}",
                               hint="the controller must reach every worker directly at its address, and every "
                                    "worker must run the controller's runbook version (docs/cluster.md)") from None
        return cls(client, router, sessions, channels, names, needs, sudo_password, known_hosts, shipments, futures)

    def close(self) -> None:
        """End the sessions (connections closed on the workers) and release the actors."""
        pending = []
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                pending.append(session.close())
        for call in pending:
            with contextlib.suppress(Exception):
                call.result(timeout=CLOSE_TIMEOUT)
        loop = self.client.loop.asyncio_loop
        for chan in self.channels.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(chan.close(), loop).result(timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(Exception):
            self.client.cancel(self.actor_futures)
