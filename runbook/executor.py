"""Schedules (step, host) tasks over a bounded pool and emits events; failure, batch, window and interrupt rules."""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol
from collections.abc import Callable

import networkx as nx
from jinja2 import meta

from runbook.actions import Action, Outcome, Prediction, TaskEnv, action_for
from runbook.connections import Connection, ReadOnlyConnection
from runbook.connections.local import LocalConnection
from runbook.errors import ConnectionFailed, ReadOnlyViolation, RunbookError
from runbook.events import EventStream, RunInfo, TaskRef
from runbook.graph import StepGraph, TaskKey, expand
from runbook.model import Playbook, Step
from runbook.results import RunResult, Status, TaskResult
from runbook.template import build_context, environment, strip_braces, truth

# Statuses after which a task's dependents must not run.
BLOCKING = frozenset({Status.FAILED, Status.UNREACHABLE, Status.NOT_RUN, Status.DRIFT, Status.DEFERRED})

WINDOW_CLOSED = "maintenance window closed"
ABORTED = "aborted by a second interrupt"
ABORT_WAIT = 3.0   # seconds to let tasks whose connections were closed report before giving up on them

_PREDICTION_STATUS = {"change": Status.CHANGED, "ok": Status.OK, "skip": Status.SKIPPED,
                      "unknown": Status.UNKNOWN, "fail": Status.FAILED}


class HostLike(Protocol):
    """What the executor needs of an inventory host."""

    name: str
    vars: dict[str, Any]


class WindowGuardLike(Protocol):
    """What the executor needs of a maintenance window guard."""

    def allows_start(self, max_duration: float | None) -> bool: ...


@dataclass
class SavedPrediction:
    """One prediction of a reviewed plan, as `apply` needs it."""

    kind: str
    reason: str = ""
    state: str | None = None


@dataclass
class ExecOptions:
    """How to execute: mode, variables, filters, interaction, and what a plan or earlier run decided."""

    mode: str = "run"                                   # run | plan | apply | resume
    extra_vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    skip_tags: frozenset[str] = frozenset()
    assume_yes: bool = False
    interactive: bool = False
    ask: Callable[[str], bool] | None = None
    concurrency: int | None = None
    connect: Callable[[HostLike], Connection] | None = None    # host -> unopened connection
    window_guard: WindowGuardLike | None = None
    predictions: dict[TaskKey, SavedPrediction] | None = None   # apply: the reviewed plan
    allow_drift: bool = False
    previous: dict[TaskKey, TaskResult] = field(default_factory=dict)  # resume: tasks already done
    registers: dict[str, dict[str, Any]] = field(default_factory=dict)   # resume: their registers
    groups: dict[str, list[str]] = field(default_factory=dict)
    interrupt_grace: float = 10.0
    handle_signals: bool = False
    playbook_dir: str = "."


class _Stop(Exception):
    """Raised inside the loop when a run must stop scheduling."""


class Executor:
    """Runs one playbook over hosts: expands the task graph and schedules ready tasks on a bounded pool."""

    def __init__(self, playbook: Playbook, hosts: list[HostLike], run: RunInfo, events: EventStream,
                 options: ExecOptions, steps: StepGraph | None = None):
        self.playbook = playbook
        self.steps = steps or StepGraph.build(playbook)
        self.hosts = {h.name: h for h in hosts}
        self.host_order = [h.name for h in hosts]
        self.info = run
        self.events = events
        self.opt = options
        self.tasks: nx.DiGraph = expand(self.steps, self.host_order)
        self.actions: dict[str, Action] = {s.step_id: action_for(s) for s in playbook.all_steps()}
        self.result = RunResult(run.run_id, options.mode, list(self.host_order))
        self.results: dict[TaskKey, TaskResult] = {}
        self.conns: dict[str, Connection] = {}
        self.local = LocalConnection("controller")
        self.registers: dict[str, dict[str, Any]] = {h: dict(options.registers.get(h, {})) for h in self.host_order}
        self.shared_registers: dict[str, Any] = {}
        self.unknown_registers: dict[str, dict[str, str]] = {h: {} for h in self.host_order}  # plan: name -> step
        self._stale_registers: set[tuple[str, str]] = set()   # plan: (host, name) read before a planned change
        self.host_failed: set[str] = set()
        self.host_stopped: dict[str, str] = {}
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._aborting = False
        self._ask_lock = threading.Lock()
        self._drift_checkable = self._compute_drift_checkable()

    # --- public ------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        """Run every task and return the run's result; never raises for task or host failures."""
        self.result.started_at = time.time()
        self.events.run_started(self.info)
        old_term = None
        if self.opt.handle_signals and threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._loop()
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            for conn in list(self.conns.values()):
                _quiet_close(conn)
        self.result.finished_at = time.time()
        position = {h: i for i, h in enumerate(self.host_order)}  # not list.index: O(tasks x hosts) at scale
        self.result.results.sort(key=lambda r: (position.get(r.host, 0), r.started_at or 0.0))
        self.events.run_finished(self.info, self.result)
        return self.result

    # --- scheduling ----------------------------------------------------------------------------

    def _batches(self) -> list[list[str]]:
        if self.playbook.batch is None or not self.host_order:
            return [list(self.host_order)]
        size = max(1, self.playbook.batch.of(len(self.host_order)))
        return [self.host_order[i:i + size] for i in range(0, len(self.host_order), size)]

    def _loop(self) -> None:
        concurrency = self.opt.concurrency or self.playbook.concurrency
        width = max((len(layer) for layer in self.steps.layers()), default=1)
        pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency * width, 256)), thread_name_prefix="runbook")
        pending_preds = {n: self.tasks.in_degree(n) for n in self.tasks}
        host_left = {h: 0 for h in self.host_order}
        for _, h in self.tasks:
            host_left[h] += 1
        host_ready: dict[str, deque[TaskKey]] = {h: deque() for h in self.host_order}
        for n in self.tasks:
            if pending_preds[n] == 0:
                host_ready[n[1]].append(n)
        rescue_queue: dict[str, deque[str]] = {}
        batches = deque(self._batches())
        waiting: deque[str] = deque()
        active: set[str] = set()
        connecting: dict[Future, str] = {}
        running: dict[Future, TaskKey | tuple[str, str, str]] = {}
        stopping = False
        abort_deadline: float | None = None
        limit = self.playbook.max_failures.of(len(self.host_order)) if self.playbook.max_failures is not None else None

        def finish(node: TaskKey, res: TaskResult) -> None:
            """Record a terminal result and release or block the successors."""
            self._record(node, res)
            host_left[node[1]] -= 1
            # An ignored failure (ignore_errors) lets the host go on to the next steps.
            block = (res.status in BLOCKING and not res.ignored) or res.failed
            for succ in self.tasks.successors(node):
                if succ in self.results:
                    continue
                if block:
                    self._block(succ, node, res, finish)
                    continue
                pending_preds[succ] -= 1
                if pending_preds[succ] == 0:
                    host_ready[succ[1]].append(succ)
            if res.failed or res.status in (Status.UNREACHABLE, Status.DRIFT):
                self._host_failed(node[1])

        def host_settled(h: str) -> bool:
            return host_left[h] == 0 and not rescue_queue.get(h)

        # Resumed runs: tasks already done count as finished before anything starts.
        for node, old in self.opt.previous.items():
            if node in self.tasks and node not in self.results:
                if node in host_ready[node[1]]:
                    host_ready[node[1]].remove(node)
                finish(node, TaskResult(**{**old.__dict__, "data": {**old.data, "from_run": old.data.get("from_run", "previous")}}))

        admit = True       # false once max_failures is exceeded: hosts already started go on
        try:
            while True:
                try:
                    if admit and not stopping and limit is not None and len(self.host_failed) > limit:
                        admit = False
                        self.result.stop_reason = (f"max_failures exceeded: {len(self.host_failed)} of "
                                                   f"{len(self.host_order)} hosts failed (limit {self.playbook.max_failures})")
                        self.events.notice(self.info, "warning", self.result.stop_reason + "; no new host or batch starts")
                    # Admit hosts of the current batch up to the concurrency limit; the next batch when it is done.
                    if admit and not stopping:
                        if not waiting and not active and not connecting and batches:
                            waiting.extend(batches.popleft())
                        while waiting and len(active) < concurrency:
                            h = waiting.popleft()
                            if host_left[h] == 0:
                                continue
                            active.add(h)
                            connecting[pool.submit(self._connect, h)] = h
                    for h in list(active):
                        if h not in self.conns:
                            continue
                        busy = any(key[1] == h for key in running.values())
                        ready = host_ready[h]
                        while ready and not stopping:
                            node = ready.popleft()
                            if node in self.results:
                                continue
                            if h in self.host_stopped:
                                finish(node, self._not_run(node, self.host_stopped[h]))
                                continue
                            step = self.steps.step(node[0])
                            guard = self.opt.window_guard
                            if guard is not None and not guard.allows_start(step.max_duration):
                                if step.max_duration is not None and guard.allows_start(None):
                                    # Only this step cannot finish before the close: defer it (its
                                    # successors wait for it); other tasks may still start while it is open.
                                    finish(node, TaskResult(h, node[0], step.action, Status.DEFERRED,
                                                            message="not started: max_duration does not fit "
                                                                    "before the maintenance window closes"))
                                    continue
                                ready.appendleft(node)
                                stopping = True
                                self.result.stop_reason = WINDOW_CLOSED
                                self.events.notice(self.info, "warning", "the maintenance window closed: no new task "
                                                   "starts; the rest is deferred (`runbook resume RUN_ID` continues it)")
                                break
                            running[pool.submit(self._run_task, node)] = node
                            busy = True
                        # on_failure steps run one at a time once the host's main tasks have settled.
                        if (not stopping and not busy and host_left[h] == 0 and h in self.host_failed
                                and h not in rescue_queue and h not in self.result.unreachable):
                            rescue_queue[h] = deque(self.steps.rescue_order())
                        queue = rescue_queue.get(h)
                        if queue and not busy and not stopping:
                            sid = queue.popleft()
                            running[pool.submit(self._run_rescue, sid, h)] = ("rescue", h, sid)
                            busy = True
                        if not busy and host_settled(h):
                            active.discard(h)
                            conn = self.conns.pop(h, None)
                            if conn is not None:
                                _quiet_close(conn)
                    if not running and not connecting:
                        if stopping or not (active or (admit and (waiting or batches))):
                            break
                        continue
                    done, _ = wait(list(running) + list(connecting), timeout=0.25, return_when=FIRST_COMPLETED)
                    for fut in done:
                        if fut in connecting:
                            h = connecting.pop(fut)
                            err = fut.exception()
                            if err is not None:
                                reason = err.reason if isinstance(err, ConnectionFailed) else f"{type(err).__name__}: {err}"
                                self.result.unreachable[h] = reason
                                self.events.host_unreachable(self.info, h, reason)
                                self._rehome_once_steps(h, pending_preds, host_left, host_ready, finish)
                                for node in [n for n in self.tasks if n[1] == h]:
                                    if node not in self.results:
                                        finish(node, TaskResult(h, node[0], self.steps.step(node[0]).action,
                                                                Status.UNREACHABLE, message=reason))
                                self._host_failed(h)
                                active.discard(h)
                            continue
                        key = running.pop(fut)
                        res = fut.result()
                        if len(key) == 3:
                            self._record(("rescue:" + key[2], key[1]), res)
                        else:
                            finish(key, res)
                    if abort_deadline is not None and time.monotonic() > abort_deadline:
                        raise _Stop()
                except KeyboardInterrupt:
                    if self.result.interrupted:
                        raise _Stop() from None
                    stopping = True
                    self.result.interrupted = True
                    self.result.stop_reason = "interrupted"
                    abort_deadline = time.monotonic() + self.opt.interrupt_grace
                    self.events.run_interrupted(self.info, "interrupted: no new task starts; running tasks may "
                                                "finish (interrupt again to abort them)")
        except _Stop:
            # Second interrupt or grace over: drop the connections so running commands end now.
            self._aborting = True
            self._cancel.set()
            for conn in list(self.conns.values()):
                _quiet_close(conn)
            # With their connections gone the running tasks end at once; record what they report.
            done, _ = wait(list(running), timeout=ABORT_WAIT)
            for fut in done:
                key = running.pop(fut)
                if len(key) == 2 and key not in self.results:
                    self._record(key, fut.result())
            for fut, key in list(running.items()):
                if len(key) == 2 and key not in self.results:
                    step = self.steps.step(key[0])
                    res = TaskResult(key[1], key[0], step.action, Status.FAILED, message=ABORTED)
                    self._record(key, res)
                    self.events.task_finished(self.info, res)
        finally:
            pool.shutdown(wait=not self.result.interrupted, cancel_futures=True)
        # Whatever never started: deferred (window), or not run (interrupt, max_failures).
        status = Status.DEFERRED if self.result.stop_reason == WINDOW_CLOSED else Status.NOT_RUN
        reason = self.result.stop_reason or "not started"
        missing = any(node not in self.results for node in self.tasks)  # the sort below is O(N log N): skip it when all ran
        for node in nx.lexicographical_topological_sort(self.tasks, key=str) if missing else ():
            if node not in self.results:
                self._record(node, TaskResult(node[1], node[0], self.steps.step(node[0]).action, status,
                                              message=f"not started: {reason}"))

    def _rehome_once_steps(self, lost: str, pending_preds: dict[TaskKey, int], host_left: dict[str, int],
                           host_ready: dict[str, deque[TaskKey]],
                           finish: Callable[[TaskKey, TaskResult], None]) -> None:
        """Move the `once: true` tasks of an unreachable host to the next host that may still run them.

        A once step (notify, open a ticket) must not be lost because the first selected host is the
        sick one; it runs on the next host instead, after that host's own copies of what it needs.
        """
        once = [n for n in nx.topological_sort(self.tasks)
                if n[1] == lost and n not in self.results and self.steps.step(n[0]).once]
        target = next((h for h in self.host_order if h != lost and h not in self.result.unreachable
                       and host_left[h] > 0), None)
        if not once or target is None:
            return
        moved: dict[TaskKey, TaskKey] = {}
        for node in once:
            new = (node[0], target)
            preds = [moved.get(p, (p[0], target) if p[1] == lost else p) for p in self.tasks.predecessors(node)]
            succs = list(self.tasks.successors(node))
            self.tasks.remove_node(node)
            self.tasks.add_node(new)
            self.tasks.add_edges_from((p, new) for p in preds if p in self.tasks)
            self.tasks.add_edges_from((new, q) for q in succs)
            moved[node] = new
            host_left[lost] -= 1
            host_left[target] += 1
            pending_preds.pop(node, None)
            self.events.notice(self.info, "warning", f"{lost} is unreachable: once step `{node[0]}` runs on {target}")
            done = [p for p in self.tasks.predecessors(new) if p in self.results]
            blocked = next((p for p in done if self.results[p].status in BLOCKING or self.results[p].failed), None)
            if blocked is not None:
                self._block(new, blocked, self.results[blocked], finish)
                continue
            pending_preds[new] = sum(1 for p in self.tasks.predecessors(new) if p not in self.results)
            if pending_preds[new] == 0:
                host_ready[target].append(new)

    def _block(self, node: TaskKey, cause: TaskKey, res: TaskResult, finish: Callable[[TaskKey, TaskResult], None]) -> None:
        if res.status == Status.UNREACHABLE and node[1] == cause[1]:
            return finish(node, TaskResult(node[1], node[0], self.steps.step(node[0]).action, Status.UNREACHABLE,
                                           message=res.message))
        why = {Status.UNREACHABLE: "unreachable", Status.DRIFT: "drifted", Status.DEFERRED: "deferred",
               Status.NOT_RUN: "not run"}.get(res.status, "failed")
        if self.opt.mode == "plan" and res.status == Status.FAILED:
            why = "would fail"
        finish(node, self._not_run(node, f"upstream step `{cause[0]}` {why}"
                                   + (f" on {cause[1]}" if cause[1] != node[1] else "")))

    def _not_run(self, node: TaskKey, message: str) -> TaskResult:
        return TaskResult(node[1], node[0], self.steps.step(node[0]).action, Status.NOT_RUN, message=message)

    def _host_failed(self, host: str) -> None:
        with self._lock:
            self.host_failed.add(host)

    def _record(self, node: TaskKey, res: TaskResult) -> None:
        with self._lock:
            self.results[node] = res
            self.result.results.append(res)
        if res.status in (Status.NOT_RUN, Status.DEFERRED, Status.UNREACHABLE) or res.data.get("from_run"):
            self.events.task_finished(self.info, res)

    def _connect(self, host: str) -> None:
        h = self.hosts[host]
        conn = self.opt.connect(h) if self.opt.connect else LocalConnection(host)
        conn.open()
        with self._lock:
            self.conns[host] = conn

    # --- one task ----------------------------------------------------------------------------------

    def _context(self, host: str, step: Step, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        h = self.hosts[host]
        regs = {**self.shared_registers, **self.registers.get(host, {}), **(extra or {})}
        builtins = {
            "host": {"name": host, "vars": h.vars, "groups": list(getattr(h, "groups", []) or [])},
            "inventory_hostname": host,
            "groups": self.opt.groups,
            "run": {"id": self.info.run_id, "mode": self.opt.mode, "operator": self.info.operator},
            "playbook_dir": self.opt.playbook_dir,
        }
        return build_context(playbook_vars=self.playbook.vars, inventory_vars=h.vars, registers=regs,
                             extra_vars=self.opt.extra_vars, secrets=self.opt.secrets, builtins=builtins)

    def _env(self, host: str, step: Step, conn: Connection, ctx: dict[str, Any]) -> TaskEnv:
        h = self.hosts[host]
        become = h.vars.get("ansible_become_user", h.vars.get("become_user"))

        def approval(granted: bool, who: str) -> None:
            self.events.approval(self.info, host, step.step_id, granted, who)

        return TaskEnv(step=step, host=host, conn=conn, vars=ctx, playbook=self.playbook, become_user=become,
                       assume_yes=self.opt.assume_yes, interactive=self.opt.interactive, ask=self._ask,
                       on_approval=approval, cancelled=self._cancel.is_set)

    def _ask(self, prompt: str) -> bool:
        """Ask the operator, one question at a time even when several hosts reach a gate together."""
        with self._ask_lock:
            return bool(self.opt.ask and self.opt.ask(prompt))

    def _conn_for(self, host: str, step: Step) -> Connection:
        return self.local if step.on == "controller" else self.conns[host]

    def _run_rescue(self, sid: str, host: str) -> TaskResult:
        return self._run_task((sid, host), rescue=True)

    def _run_task(self, node: TaskKey, rescue: bool = False) -> TaskResult:
        sid, host = node
        step = self.steps.step(sid)
        action = self.actions[sid]
        res = TaskResult(host, sid, step.action, Status.OK, started_at=time.time())
        if rescue:
            res.data["on_failure"] = True
        try:
            conn = self._conn_for(host, step)
            ctx = self._context(host, step)
            mode = self.opt.mode
            if mode == "plan":
                self._plan_task(step, action, host, conn, ctx, res)
            elif mode == "apply" and not rescue and self.opt.predictions is not None:
                self._apply_task(node, step, action, host, conn, ctx, res)
            else:
                self._real_task(step, action, host, conn, ctx, res)
        except ReadOnlyViolation as exc:
            res.status, res.message = Status.FAILED, f"dry-run safety stop: {exc.message}"
        except RunbookError as exc:
            res.status, res.message = Status.FAILED, str(exc)
        except (OSError, EOFError) as exc:
            res.status, res.message = Status.FAILED, f"connection error: {exc}"
        except Exception as exc:  # a bug or an unexpected library error must not kill the whole run
            res.status, res.message = Status.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        if self._aborting and res.status == Status.FAILED:
            res.message = f"{ABORTED}: {res.message}" if res.message else ABORTED
        res.finished_at = time.time()
        res.duration = round(res.finished_at - (res.started_at or res.finished_at), 6)
        if res.status == Status.FAILED and step.ignore_errors and self.opt.mode != "plan":
            res.ignored = True
        if step.register_as and "registered" not in res.data:
            self._register(host, step, res, skipped=res.status == Status.SKIPPED)
        res.data.pop("registered", None)
        self.events.task_finished(self.info, res)
        return res

    def _start(self, host: str, step: Step, res: TaskResult, attempt: int, command: str | None) -> None:
        res.attempts = attempt
        res.command = command
        self.events.task_started(self.info, TaskRef(host, step.step_id, step.name, step.action, attempt, command))

    def _tags_allow(self, step: Step) -> bool:
        tags = set(step.tags)
        if self.opt.tags and not (tags & self.opt.tags or "always" in tags):
            return False
        return not (tags & self.opt.skip_tags)

    def _skip(self, res: TaskResult, reason: str) -> None:
        res.status, res.message, res.changed = Status.SKIPPED, reason, False

    def _guards(self, step: Step, env: TaskEnv) -> tuple[str | None, str, list[str]]:
        """Evaluate the guards (read-only by contract): (reason to skip or None, state fingerprint, passed reasons)."""
        state: list[str] = []
        passed: list[str] = []
        for name, value in step.guards.items():
            text = env.render(value)
            if name in ("creates", "removes"):
                st = env.conn.stat(text)
                state.append(f"{name}:{int(st.exists)}")
                if name == "creates" and st.exists:
                    return f"creates: {text} exists", "|".join(state), passed
                if name == "removes" and not st.exists:
                    return f"removes: {text} does not exist", "|".join(state), passed
                passed.append(f"{name}: {text} {'does not exist' if name == 'creates' else 'exists'}")
            else:
                r = env.run(text)   # the step's env, sudo and timeout, like the step itself
                state.append(f"{name}:{int(r.rc == 0)}")
                if name == "unless" and r.rc == 0:
                    return f"unless: `{_short(text)}` succeeded", "|".join(state), passed
                if name == "only_if" and r.rc != 0:
                    return f"only_if: `{_short(text)}` failed (rc={r.rc})", "|".join(state), passed
                passed.append(f"{name}: `{_short(text)}` {'failed' if name == 'unless' else 'succeeded'}")
        return None, "|".join(state), passed

    def _real_task(self, step: Step, action: Action, host: str, conn: Connection, ctx: dict[str, Any],
                   res: TaskResult) -> None:
        env = self._env(host, step, conn, ctx)
        if not self._tags_allow(step):
            return self._skip(res, "tag filter")
        if step.when is not None and not truth(step.when, ctx):
            return self._skip(res, f"when: `{step.when}` is false")
        if step.guards:
            self._start(host, step, res, 1, action.describe(env))
            skip, _, _ = self._guards(step, env)
            if skip:
                return self._skip(res, skip)
        attempts = step.retries + 1 if (step.retries or not step.until) else 4  # `until` alone retries 3 times
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if self._cancel.wait(step.delay):
                    break
            self._start(host, step, res, attempt, action.describe(env))
            out = action.apply(env)
            self._apply_outcome(step, res, out, ctx)
            if step.until is not None:
                reg = self._register_value(res)
                if truth(step.until, {**ctx, "result": reg, **({step.register_as: reg} if step.register_as else {})}):
                    if res.status == Status.FAILED and step.failed_when is None:
                        continue
                    break
                if attempt == attempts:
                    res.status = Status.FAILED
                    res.message = f"`until: {step.until}` still false after {attempt} attempt(s)" + (
                        f"; {res.message}" if res.message else "")
                continue
            if res.status != Status.FAILED:
                break

    def _apply_outcome(self, step: Step, res: TaskResult, out: Outcome, ctx: dict[str, Any]) -> None:
        res.rc, res.stdout, res.stderr = out.rc, out.stdout, out.stderr
        res.command = out.command or res.command
        res.message, res.diff = out.message, out.diff
        res.data.update(out.data)
        changed, failed = out.changed, out.failed
        if step.read_only:
            changed = False  # read-only by contract: it observes, never changes
        if step.changed_when is not None or step.failed_when is not None:
            reg = {"stdout": out.stdout, "stderr": out.stderr, "rc": out.rc, "changed": changed, "failed": failed,
                   "stdout_lines": out.stdout.splitlines(), "data": out.data}
            local = {**ctx, "result": reg, **({step.register_as: reg} if step.register_as else {})}
            if step.changed_when is not None:
                changed = truth(step.changed_when, local)
            if step.failed_when is not None:
                failed = truth(step.failed_when, local)
                if not failed and out.failed:
                    res.message = ""
        res.changed = changed and not failed
        res.status = Status.FAILED if failed else (Status.CHANGED if res.changed else Status.OK)

    @staticmethod
    def _register_value(res: TaskResult, skipped: bool = False) -> dict[str, Any]:
        return {"stdout": res.stdout, "stderr": res.stderr, "rc": res.rc, "changed": res.changed,
                "failed": res.status == Status.FAILED, "skipped": skipped, "status": res.status.value,
                "duration": res.duration, "stdout_lines": res.stdout.splitlines(), "msg": res.message,
                "data": res.data}

    def _register(self, host: str, step: Step, res: TaskResult, skipped: bool = False) -> None:
        value = self._register_value(res, skipped)
        with self._lock:
            if step.once:
                self.shared_registers[step.register_as] = value
            else:
                self.registers.setdefault(host, {})[step.register_as] = value

    # --- dry run -----------------------------------------------------------------------------------

    def _unknown_inputs(self, host: str, step: Step) -> list[tuple[str, str]]:
        """Registers the step's `when` reads that a dry run could not produce: (name, step id)."""
        if step.when is None:
            return []
        names = meta.find_undeclared_variables(environment().parse("{{ " + strip_braces(step.when) + " }}"))
        unknown = self.unknown_registers.get(host, {})
        return [(n, unknown[n]) for n in sorted(names) if n in unknown]

    def _plan_task(self, step: Step, action: Action, host: str, conn: Connection, ctx: dict[str, Any],
                   res: TaskResult) -> None:
        pred = self.predict(step, action, host, conn, ctx, res)
        res.status = _PREDICTION_STATUS[pred.kind]
        res.changed = pred.kind == "change"
        res.message = pred.reason
        res.diff = pred.diff
        res.command = pred.command or res.command
        res.data.update(pred.data)
        res.data["prediction"] = pred.kind
        if pred.state is not None:
            res.data["state"] = pred.state
        # A read_only step after a predicted (or possible) change read the host as it is *before* that
        # change, so later steps must not predict from its output: its register is unknown too.
        stale = step.read_only and self._after_change(step, host)
        if step.register_as and (not step.read_only or stale) and pred.kind != "skip":
            with self._lock:
                self.unknown_registers.setdefault(host, {})[step.register_as] = step.step_id
                if stale:
                    self._stale_registers.add((host, step.register_as))
            res.data["registered"] = True   # nothing real to register

    def _after_change(self, step: Step, host: str) -> bool:
        """True when a task this one waits for is predicted to change something, or may (unknown)."""
        with self._lock:
            return any(a in self.results and self.results[a].data.get("prediction") in ("change", "unknown")
                       for a in nx.ancestors(self.tasks, (step.step_id, host)))

    def _why_unknown(self, host: str, name: str) -> str:
        sid = self.unknown_registers[host][name]
        if (host, name) in self._stale_registers:
            return f"registered by `{sid}`, which reads the host before changes planned ahead of it"
        return f"registered by `{sid}`, which cannot run in a dry run"

    def predict(self, step: Step, action: Action, host: str, conn: Connection, ctx: dict[str, Any],
                res: TaskResult | None = None) -> Prediction:
        """What the step would do on the host now, reading only (guards and read_only steps run for real)."""
        if not self._tags_allow(step):
            return Prediction("skip", "tag filter")
        unknown = self._unknown_inputs(host, step)
        if unknown:
            name, _sid = unknown[0]
            return Prediction("unknown", f"`when` reads `{name}`, {self._why_unknown(host, name)}")
        try:
            if step.when is not None and not truth(step.when, ctx):
                return Prediction("skip", f"when: `{step.when}` is false")
            guard_env = self._env(host, step, ReadOnlyConnection(conn, allow_run=True), ctx)
            passed: list[str] = []
            state = None
            if step.guards:
                skip, state, passed = self._guards(step, guard_env)
                if skip:
                    return Prediction("skip", skip, state=state)
            if step.read_only:
                probe = res or TaskResult(host, step.step_id, step.action, Status.OK)
                self._real_task(step, action, host, ReadOnlyConnection(conn, allow_run=True), ctx, probe)
                kind = "fail" if probe.status == Status.FAILED else ("skip" if probe.status == Status.SKIPPED else "ok")
                if kind == "fail" and self._after_change(step, host):
                    # It read the host before the changes planned ahead of it (e.g. a check of what an
                    # earlier step uploads): failing now says nothing about the real run.
                    return Prediction("unknown", "reads the host before changes planned ahead of it; now: "
                                      + (probe.message or "fails"), command=probe.command, state=state,
                                      data={"read_only": True})
                return Prediction(kind, probe.message or "read_only: ran for real", command=probe.command,
                                  state=state, data={"read_only": True})
            # wait_for's probe (test -e, a port probe, its command) is a condition check, read-only by
            # contract like a guard; every other action's plan() only reads files.
            env = self._env(host, step, ReadOnlyConnection(conn, allow_run=step.action == "wait_for"), ctx)
            pred = action.plan(env)
        except RunbookError as exc:
            missing = [n for n in self.unknown_registers.get(host, {}) if f"'{n}'" in str(exc)]
            if missing:
                return Prediction("unknown", f"needs `{missing[0]}`, {self._why_unknown(host, missing[0])}")
            raise
        if passed and pred.kind == "unknown" and step.action in ("shell", "command"):
            return Prediction("change", "would run: " + "; ".join(passed), state=state, command=pred.command)
        if state and pred.state is None:
            pred.state = state
        return pred

    # --- apply a reviewed plan ---------------------------------------------------------------------

    def _compute_drift_checkable(self) -> set[TaskKey]:
        """Tasks whose saved prediction rests only on state nothing in this run changes before them."""
        preds = self.opt.predictions
        if not preds:
            return set()
        checkable = set()
        for node in self.tasks:
            before = nx.ancestors(self.tasks, node)
            if all(preds.get(a, SavedPrediction("unknown")).kind in ("ok", "skip") for a in before):
                checkable.add(node)
        return checkable

    def _apply_task(self, node: TaskKey, step: Step, action: Action, host: str, conn: Connection,
                    ctx: dict[str, Any], res: TaskResult) -> None:
        saved = (self.opt.predictions or {}).get(node)
        if saved is None:
            return self._real_task(step, action, host, conn, ctx, res)
        if node in self._drift_checkable and saved.kind in ("change", "ok", "skip") and saved.state is not None:
            now = self.predict(step, action, host, conn, ctx)
            if now.kind != saved.kind or (now.state or None) != saved.state:
                message = (f"drift: the plan said {saved.kind} ({saved.reason}); now {now.kind} ({now.reason})")
                if not self.opt.allow_drift:
                    res.status, res.message = Status.DRIFT, message
                    with self._lock:
                        self.host_stopped[host] = f"host stopped: `{step.step_id}` drifted from the plan"
                    return None
                self.events.notice(self.info, "warning", f"{host}: {message} (--allow-drift)")
        # Checks (assert, wait_for) change nothing and are the point of a run: they always run again.
        if saved.kind in ("ok", "skip") and not step.read_only and step.action not in ("assert", "wait_for"):
            res.status = Status.SKIPPED if saved.kind == "skip" else Status.OK
            res.message = f"as planned: {saved.reason}"
            return None
        return self._real_task(step, action, host, conn, ctx, res)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quiet_close(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # closing is best effort; the run's outcome is already decided
        pass


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

