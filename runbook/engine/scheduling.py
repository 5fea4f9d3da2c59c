"""The task scheduler: decides what is ready — dependencies, batches, failure limits, `once`, on_failure order.

It holds no threads and does no I/O: the executor asks it which hosts to admit and which task a
host may start next, and tells it how each task ended.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import networkx as nx

from runbook.fields import Limit
from runbook.graph import StepGraph, TaskKey
from runbook.results import RunMode, Status, TaskResult

# Statuses after which a task's dependents must not run.
BLOCKING = frozenset({Status.FAILED, Status.UNREACHABLE, Status.NOT_RUN, Status.DRIFT, Status.DEFERRED, Status.LOST})
_WHY = {Status.UNREACHABLE: "unreachable", Status.DRIFT: "drifted", Status.DEFERRED: "deferred", Status.NOT_RUN: "not run",
        Status.LOST: "was lost with its worker"}


class TaskScheduler:
    """The ready set of a run's task graph, host admission by batch and concurrency, and what each result blocks."""

    def __init__(self, tasks: nx.DiGraph, steps: StepGraph, hosts: list[str], *, mode: RunMode, batch: Limit | None,
                 max_failures: Limit | None, emit: Callable[[TaskResult], None], notice: Callable[[str], None]):
        self.tasks = tasks
        self.steps = steps
        self.hosts = hosts
        self.mode = mode
        self.emit = emit            # for results no task produced itself (not run, deferred, unreachable, resumed)
        self.notice = notice
        self.lock = threading.RLock()
        self.results: dict[TaskKey, TaskResult] = {}
        self.recorded: list[TaskResult] = []
        self.pending = {n: tasks.in_degree(n) for n in tasks}
        self.left = dict.fromkeys(hosts, 0)
        for node in tasks:
            self.left[node.host] += 1
        self.ready: dict[str, deque[TaskKey]] = {h: deque() for h in hosts}
        for node in tasks:
            if self.pending[node] == 0:
                self.ready[node.host].append(node)
        self.rescue: dict[str, deque[str]] = {}
        self.batches = deque(_batches(hosts, batch))
        self.waiting: deque[str] = deque()
        self.active: set[str] = set()
        self.failed: set[str] = set()          # for max_failures: failed, unreachable or drifted hosts
        self.rescue_due: set[str] = set()      # for on_failure: hosts with a task that really failed
        self.stopped: dict[str, str] = {}
        self.unreachable: dict[str, str] = {}
        self.admitting = True
        self.limit = max_failures.of(len(hosts)) if max_failures is not None else None
        self.max_failures = max_failures

    # --- results ---------------------------------------------------------------------------------

    def record(self, key: TaskKey, res: TaskResult) -> None:
        """Keep a result; emit it when no running task reported it already."""
        with self.lock:
            self.results[key] = res
            self.recorded.extend(res.item_results)   # a loop's items are results of the run too
            self.recorded.append(res)
        if res.status in (Status.NOT_RUN, Status.DEFERRED, Status.UNREACHABLE) or res.from_run:
            for item in res.item_results if res.from_run else ():
                self.emit(item)
            self.emit(res)

    def finish(self, key: TaskKey, res: TaskResult) -> None:
        """Record a terminal result and release or block the task's successors."""
        self.record(key, res)
        self.left[key.host] -= 1
        # An ignored failure (ignore_errors) lets the host go on to the next steps.
        block = (res.status in BLOCKING and not res.ignored) or res.failed
        for succ in self.tasks.successors(key):
            if succ in self.results:
                continue
            if block:
                self._block(succ, key, res)
                continue
            self.pending[succ] -= 1
            if self.pending[succ] == 0:
                self.ready[succ.host].append(succ)
        if res.failed or res.status in (Status.UNREACHABLE, Status.DRIFT):
            self.host_failed(key.host)
        if res.failed:
            # Drift is refused before any planned change on the host: there is nothing to rescue or
            # roll back, so a host whose only "failure" is drift does not run on_failure.
            with self.lock:
                self.rescue_due.add(key.host)

    def _block(self, node: TaskKey, cause: TaskKey, res: TaskResult) -> None:
        if res.status == Status.UNREACHABLE and node.host == cause.host:
            return self.finish(node, self.result(node, Status.UNREACHABLE, res.message))
        why = _WHY.get(res.status, "failed")
        if self.mode == RunMode.PLAN and res.status == Status.FAILED:
            why = "would fail"
        where = f" on {cause.host}" if cause.host != node.host else ""
        return self.finish(node, self.result(node, Status.NOT_RUN, f"upstream step `{cause.step_id}` {why}{where}"))

    def result(self, node: TaskKey, status: Status, message: str) -> TaskResult:
        """A result for a task that did not run (or could not)."""
        return TaskResult(node.host, node.step_id, self.steps.step(node.step_id).action, status, message=message)

    def host_failed(self, host: str) -> None:
        """Count a host as failed (for `max_failures` and on_failure)."""
        with self.lock:
            self.failed.add(host)

    def stop_host(self, host: str, reason: str) -> None:
        """No further task of `host` starts (e.g. it drifted from the reviewed plan)."""
        with self.lock:
            self.stopped[host] = reason

    # --- admission -----------------------------------------------------------------------------

    def check_failure_limit(self) -> str | None:
        """The stop reason the first time more hosts failed than `max_failures` allows; then no host is admitted."""
        if not self.admitting or self.limit is None or len(self.failed) <= self.limit:
            return None
        self.admitting = False
        return (f"max_failures exceeded: {len(self.failed)} of {len(self.hosts)} hosts failed "
                f"(limit {self.max_failures})")

    def admit(self, concurrency: int, connecting: int) -> list[str]:
        """Hosts to connect now: of the current batch, up to `concurrency`; the next batch once it is done."""
        if not self.admitting:
            return []
        if not self.waiting and not self.active and not connecting and self.batches:
            self.waiting.extend(self.batches.popleft())
        admitted = []
        while self.waiting and len(self.active) < concurrency:
            host = self.waiting.popleft()
            if self.left[host] == 0:
                continue
            self.active.add(host)
            admitted.append(host)
        return admitted

    def more_to_admit(self) -> bool:
        """Whether hosts are still waiting for admission."""
        return self.admitting and bool(self.waiting or self.batches)

    # --- per host --------------------------------------------------------------------------------

    def take(self, host: str) -> TaskKey | None:
        """The next ready task of a host, or None; tasks of a stopped host are recorded as not run."""
        ready = self.ready[host]
        while ready:
            node = ready.popleft()
            if node in self.results:
                continue
            if host in self.stopped:
                self.finish(node, self.result(node, Status.NOT_RUN, self.stopped[host]))
                continue
            return node
        return None

    def put_back(self, node: TaskKey) -> None:
        """Return a task taken but not started (the window closed)."""
        self.ready[node.host].appendleft(node)

    def next_rescue(self, host: str) -> str | None:
        """The next on_failure step of a failed host once its main tasks settled, or None."""
        if host not in self.rescue:
            if self.left[host] or host not in self.rescue_due or host in self.unreachable:
                return None
            self.rescue[host] = deque(self.steps.rescue_order())
        queue = self.rescue[host]
        return queue.popleft() if queue else None

    def settled(self, host: str) -> bool:
        """True when a host has nothing left to run (main tasks and on_failure)."""
        return self.left[host] == 0 and not self.rescue.get(host)

    def release(self, host: str) -> None:
        """A host is done: it frees its concurrency slot."""
        self.active.discard(host)

    def host_unreachable(self, host: str, reason: str) -> None:
        """Every task of an unreachable host ends `unreachable`; its `once` tasks move to another host first."""
        self.unreachable[host] = reason
        self._rehome_once_steps(host)
        for node in [n for n in self.tasks if n.host == host]:
            if node not in self.results:
                self.finish(node, self.result(node, Status.UNREACHABLE, reason))
        self.host_failed(host)
        self.active.discard(host)

    def _rehome_once_steps(self, lost: str) -> None:
        """Move the `once: true` tasks of an unreachable host to the next host that may still run them.

        A once step (notify, open a ticket) must not be lost because the first selected host is the
        sick one; it runs on the next host instead, after that host's own copies of what it needs.
        """
        once = [n for n in nx.topological_sort(self.tasks)
                if n.host == lost and n not in self.results and self.steps.step(n.step_id).once]
        target = next((h for h in self.hosts if h != lost and h not in self.unreachable and self.left[h] > 0), None)
        if not once or target is None:
            return
        moved: dict[TaskKey, TaskKey] = {}
        for node in once:
            new = TaskKey(node.step_id, target)
            preds = [moved.get(p, TaskKey(p.step_id, target) if p.host == lost else p) for p in self.tasks.predecessors(node)]
            succs = list(self.tasks.successors(node))
            self.tasks.remove_node(node)
            self.tasks.add_node(new)
            self.tasks.add_edges_from((p, new) for p in preds if p in self.tasks)
            self.tasks.add_edges_from((new, q) for q in succs)
            moved[node] = new
            self.left[lost] -= 1
            self.left[target] += 1
            self.pending.pop(node, None)
            self.notice(f"{lost} is unreachable: once step `{node.step_id}` runs on {target}")
            self._release_moved(new, target)

    def _release_moved(self, new: TaskKey, target: str) -> None:
        done = [p for p in self.tasks.predecessors(new) if p in self.results]
        blocked = next((p for p in done if self.results[p].status in BLOCKING or self.results[p].failed), None)
        if blocked is not None:
            self._block(new, blocked, self.results[blocked])
            return
        self.pending[new] = sum(1 for p in self.tasks.predecessors(new) if p not in self.results)
        if self.pending[new] == 0:
            self.ready[target].append(new)

    def unstarted(self) -> list[TaskKey]:
        """Tasks never recorded, in a stable topological order."""
        if all(node in self.results for node in self.tasks):   # the sort is O(N log N): skip it when all ran
            return []
        return [n for n in nx.lexicographical_topological_sort(self.tasks, key=str) if n not in self.results]


def _batches(hosts: list[str], batch: Limit | None) -> list[list[str]]:
    if batch is None or not hosts:
        return [list(hosts)]
    size = max(1, batch.of(len(hosts)))
    return [hosts[i:i + size] for i in range(0, len(hosts), size)]
