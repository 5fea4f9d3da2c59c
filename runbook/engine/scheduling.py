"""The task scheduler: decides what is ready — dependencies, batches, failure limits, `once`, on_failure order.

It holds no threads and does no I/O: the executor asks it which hosts to admit and which task a
host may start next, and tells it how each task ended.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from enum import Enum

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
                 max_failures: Limit | None, emit: Callable[[TaskResult], None], notice: Callable[[str], None],
                 rescued: Callable[[str, str, list[str]], None] = lambda host, block, steps: None):
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
        self.blocks = BlockOutcomes(steps, tasks, mode, rescued, self.results) if steps.playbook._groups else None

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
        # A failure inside a block with `rescue:` counts for the host only if the rescue does not handle it.
        protected = self.blocks is not None and self.blocks.protects(key.step_id)
        if self.blocks is not None:
            for host in self.blocks.done(key):
                self.host_failed(host)
                with self.lock:
                    self.rescue_due.add(host)
        # An ignored failure (ignore_errors) lets the host go on to the next steps.
        block = (res.status in BLOCKING and not res.ignored) or res.failed
        for succ, edge in self.tasks.succ[key].items():
            if succ in self.results:
                continue
            if block and not edge.get("settled"):   # a settled edge (into rescue/always) waits, never blocks
                self._block(succ, key, res)
                continue
            self.pending[succ] -= 1
            if self.pending[succ] == 0:
                self._release(succ)
        if (res.failed and not protected) or res.status in (Status.UNREACHABLE, Status.DRIFT):
            self.host_failed(key.host)
        if res.failed and not protected:
            # Drift is refused before any planned change on the host: there is nothing to rescue or
            # roll back, so a host whose only "failure" is drift does not run on_failure.
            with self.lock:
                self.rescue_due.add(key.host)

    def replay(self, previous: Mapping[TaskKey, TaskResult]) -> None:
        """A resumed run: the tasks an earlier run did count as finished before anything starts."""
        for node, old in previous.items():
            key = TaskKey(*node)
            if key in self.tasks and key not in self.results:
                if key in self.ready[key.host]:
                    self.ready[key.host].remove(key)
                self.finish(key, dataclasses.replace(old, from_run=old.from_run or "previous"))

    def _block(self, node: TaskKey, cause: TaskKey, res: TaskResult) -> None:
        if res.status == Status.UNREACHABLE and node.host == cause.host:
            return self.finish(node, self.result(node, Status.UNREACHABLE, res.message))
        why = _WHY.get(res.status, "failed")
        if self.mode == RunMode.PLAN and res.status == Status.FAILED:
            why = "would fail"
        where = f" on {cause.host}" if cause.host != node.host else ""
        return self.finish(node, self.result(node, Status.NOT_RUN, f"upstream step `{cause.step_id}` {why}{where}"))

    def _release(self, node: TaskKey) -> None:
        """A task whose dependencies all settled: ready, unless the block it waits for failed."""
        reason = self.blocks.blocked(node) if self.blocks is not None else None
        if reason is not None:
            return self.finish(node, self.result(node, Status.NOT_RUN, reason))
        self.ready[node.host].append(node)

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
            if self.blocks is not None:
                self.blocks.moved(node.step_id, lost, target)
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
            self._release(new)

    def record_unstarted(self, status: Status, message: str) -> None:
        """Record every task that never started with `status` (deferred, not run) and why."""
        for node in self.unstarted():
            self.record(node, self.result(node, status, message))

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


# --- blocks ---------------------------------------------------------------------------------------

class Outcome(str, Enum):
    """How a block ended on one host."""

    OK = "ok"
    RESCUED = "rescued"          # a step failed, and the block's rescue steps handled it
    FAILED = "failed"
    INCOMPLETE = "incomplete"    # a step did not run (upstream failure elsewhere, window, interrupt)


NO_RESCUE = "block succeeded: no rescue needed"
PLANNED_NO_RESCUE = "block predicted to succeed"   # a plan's reason for a rescue step; apply knows it by this


class BlockOutcomes:
    """Per host, how each block ended: what its rescue steps, and the steps after it, wait for.

    A failed step inside a block with `rescue:` does not count for its host (max_failures,
    on_failure) until the block's steps all ended: if the rescue succeeded, the failure is marked
    rescued; otherwise the host counts as failed then.
    """

    def __init__(self, steps: StepGraph, tasks: nx.DiGraph, mode: RunMode, rescued: Callable[[str, str, list[str]], None],
                 results: dict[TaskKey, TaskResult]):
        from runbook.compose import enclosing_groups, rescue_of

        pb = steps.playbook
        self.pb = pb
        self.mode = mode
        self.rescued = rescued    # (host, block, failed step ids): once the block's rescue handled them
        self.groups = {gid: g for gid, g in pb._groups.items() if g.section == "steps"}
        self.within: dict[str, tuple[str, ...]] = {}     # step id -> its groups, innermost first
        self.protected: set[str] = set()
        self.rescue_of: dict[str, tuple[str, ...]] = {}
        self.gates: dict[str, tuple[str, ...]] = {}
        for sid in steps.graph:
            step = steps.step(sid)
            around = enclosing_groups(step)
            self.within[sid] = tuple(g for g, _, _ in reversed(around) if g in self.groups)
            if any(part == "block" and self.groups[g].parts.get("rescue") for g, part, _ in around if g in self.groups):
                self.protected.add(sid)
            self.rescue_of[sid] = tuple(g for g in rescue_of(step) if g in self.groups)
            self.gates[sid] = tuple(steps.graph.nodes[sid].get("gates", ()))
        self.left: Counter[tuple[str, str]] = Counter()
        for node in tasks:
            for gid in self.within.get(node.step_id, ()):
                self.left[(gid, node.host)] += 1
        self.outcomes: dict[tuple[str, str], tuple[Outcome, str]] = {}
        self.results = results    # the scheduler's: every task's result so far
        from runbook.compose import group_steps

        self.block_steps = {gid: group_steps(pb, gid, ("block",)) for gid in self.groups}   # computed once
        self.all_steps = {gid: group_steps(pb, gid) for gid in self.groups}

    def protects(self, step_id: str) -> bool:
        """True when a failure of the step may still be rescued (it is in the steps of a block with `rescue:`)."""
        return step_id in self.protected

    def moved(self, step_id: str, lost: str, target: str) -> None:
        """A `once` task moved from an unreachable host to another."""
        for gid in self.within.get(step_id, ()):
            self.left[(gid, lost)] -= 1
            self.left[(gid, target)] += 1

    def done(self, key: TaskKey) -> list[str]:
        """Note a finished task; return the hosts whose failure a block just failed to rescue."""
        failed_hosts = []
        for gid in self.within.get(key.step_id, ()):   # innermost first: an outer block sees inner outcomes
            at = (gid, key.host)
            self.left[at] -= 1
            if self.left[at] != 0:
                continue
            outcome = self.outcomes[at] = self._outcome(gid, key.host)
            grp = self.groups[gid]
            if outcome[0] == Outcome.RESCUED:
                self._mark_rescued(gid, key.host)
            elif (grp.parts.get("rescue") and outcome[0] == Outcome.FAILED and not self.protects_group(gid)
                  and self._state(grp.parts["block"], key.host)[0] == Outcome.FAILED):
                failed_hosts.append(key.host)
        return failed_hosts

    def protects_group(self, gid: str) -> bool:
        """True when a block sits in the steps of an outer block with `rescue:`."""
        parent = self.groups[gid].parent
        while parent is not None:
            outer = self.groups.get(parent[0])
            if outer is None:
                return False
            if parent[1] == "block" and outer.parts.get("rescue"):
                return True
            parent = outer.parent
        return False

    def _mark_rescued(self, gid: str, host: str) -> None:
        names = []
        for sid in self.block_steps[gid]:
            res = self.results.get(TaskKey(sid, host))
            if res is not None and res.failed:
                res.rescued = True
                names.append(sid)
        if names:
            self.rescued(host, gid, names)

    def _state(self, members: list[str], host: str) -> tuple[Outcome, str, bool]:
        """Failed, incomplete or ok over a part's units (steps and nested groups), the first cause, any unknown."""
        state, cause, unknown = Outcome.OK, "", False
        for unit in members:
            if unit in self.groups:
                sub = self.outcomes.get((unit, host))
                sub_state, sub_cause = sub if sub is not None else (Outcome.OK, "")
                unknown = unknown or (self.mode == RunMode.PLAN and any(
                    (r := self.results.get(TaskKey(s, host))) is not None and r.status == Status.UNKNOWN
                    for s in self.all_steps[unit]))
            else:
                res = self.results.get(TaskKey(unit, host))
                if res is None:
                    continue   # a `once` step that ran on another host
                unknown = unknown or res.status == Status.UNKNOWN
                sub_state = (Outcome.FAILED if res.failed else
                             Outcome.INCOMPLETE if res.status in BLOCKING and not res.ignored and not res.rescued
                             else Outcome.OK)
                sub_cause = (f"step `{unit}` {'would fail' if self.mode == RunMode.PLAN else 'failed'}"
                             if sub_state == Outcome.FAILED else res.message)
            if sub_state == Outcome.FAILED and state != Outcome.FAILED:
                state, cause = Outcome.FAILED, sub_cause
            elif sub_state == Outcome.INCOMPLETE and state == Outcome.OK:
                state, cause = Outcome.INCOMPLETE, sub_cause
        return state, cause, unknown

    def _outcome(self, gid: str, host: str) -> tuple[Outcome, str]:
        grp = self.groups[gid]
        state, cause, _ = self._state(grp.parts.get("block", []), host)
        outcome = (state, cause)
        if state == Outcome.FAILED and grp.parts.get("rescue"):
            rescue, why, _ = self._state(grp.parts["rescue"], host)
            outcome = (Outcome.RESCUED, cause) if rescue == Outcome.OK else (Outcome.FAILED, why or cause)
        if grp.parts.get("always"):
            after, why, _ = self._state(grp.parts["always"], host)
            if after == Outcome.FAILED or (after == Outcome.INCOMPLETE and outcome[0] in (Outcome.OK, Outcome.RESCUED)):
                outcome = (after, why)
        return outcome

    def blocked(self, node: TaskKey) -> str | None:
        """Why a task after a block with rescue/always must not run (the block failed), or None."""
        for gid in self.gates.get(node.step_id, ()):
            outcome, cause = self.outcomes.get((gid, node.host), (Outcome.OK, ""))
            if outcome == Outcome.FAILED:
                verb = "would fail" if self.mode == RunMode.PLAN else "failed"
                return f"block `{gid}` {verb}" + (f" ({cause})" if cause else "")
            if outcome == Outcome.INCOMPLETE:
                return cause or f"block `{gid}` did not complete"
        return None

    def rescue_gate(self, key: TaskKey) -> tuple[Status, str] | None:
        """Whether a rescue step runs: None when a step of its block failed on the host; else its result."""
        for gid in self.rescue_of.get(key.step_id, ()):
            state, _, unknown = self._state(self.groups[gid].parts.get("block", []), key.host)
            if state == Outcome.FAILED:
                continue
            if self.mode == RunMode.PLAN:
                if unknown:
                    return Status.UNKNOWN, f"block `{gid}` may fail (a step of it is unknown): this rescue step may run"
                return Status.SKIPPED, PLANNED_NO_RESCUE
            return Status.SKIPPED, NO_RESCUE
        return None
