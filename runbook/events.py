"""The executor's event stream: lifecycle hooks that observers (console, audit, state, reports) implement.

Two kinds of observer:

- **critical** (`critical = True`: the audit trail, the run state): called in the emitting thread,
  one event at a time, in order. If one raises, the run stops cleanly: no new task starts, the
  failure is recorded, the run exits 1, and `run_finished` still reaches every observer that can
  take it.
- **best effort** (the default: console, reports, notifications): called on a thread of their own
  from a queue, so a slow one never stalls a worker; an exception is reported once on stderr and
  the run goes on. The stream waits for them to catch up before `run_finished` returns.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from runbook.errors import RunbookError
from runbook.results import RunMode, RunResult, TaskResult

FLUSH_TIMEOUT = 30.0   # seconds the end of a run waits for best-effort observers to catch up
_STOP = ("stop", ())   # ends the delivery thread


@dataclass(frozen=True)
class RunInfo:
    """Who runs what, where: fixed when a run starts."""

    run_id: str
    mode: RunMode
    playbook_path: str
    playbook_name: str
    playbook_hash: str
    inventory_source: str
    inventory_hash: str
    hosts: list[str]
    operator: str
    control_host: str
    host_key_checking: str
    extra_vars: dict[str, Any] = field(default_factory=dict)   # already redacted
    plan_hash: str | None = None
    git_commit: str | None = None
    started_at: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)     # e.g. ignore_window + reason, resumed_from
    playbook_files: dict[str, str] = field(default_factory=dict)   # included, role and vars files: path -> sha256


@dataclass(frozen=True)
class TaskRef:
    """One (step, host) task as it starts."""

    host: str
    step_id: str
    step_name: str
    action: str
    attempt: int = 1
    command: str | None = None       # rendered and redacted
    on_failure: bool = False         # an on_failure (rescue) step


class Observer(Protocol):
    """Lifecycle hooks of a run; every hook is optional (subclass this to get no-op defaults)."""

    #: True for observers that must not lose an event (audit trail, run state): see the module docstring.
    critical: ClassVar[bool] = False
    #: What it records, for messages ("the audit trail").
    what: ClassVar[str] = "an observer"

    def run_started(self, run: RunInfo) -> None:
        """The run begins: identity, inputs' hashes and selected hosts are known; no host was contacted yet."""
        return None

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        """A task (or a retry of it: `task.attempt`) starts on a host, with its rendered command."""
        return None

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        """A task ended (also for tasks that never ran: not_run, deferred, unreachable, done in an earlier run)."""
        return None

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        """Connecting to a host failed (refused, timed out, authentication, host key); its tasks end unreachable."""
        return None

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        """An `approve` gate was answered."""
        return None

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        """A block's `rescue:` steps handled the failure of `step_ids` on `host` (a plan: are predicted to)."""
        return None

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        """Something the operator should know that is not a task result (max_failures, window closing)."""
        return None

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        """The first Ctrl-C or SIGTERM: no new task starts; running ones may finish."""
        return None

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        """The run ended; `result` holds every task result and the exit code."""
        return None

    def sync(self) -> None:
        """Critical observers that buffer: make everything received so far durable (called before dependents start)."""
        return None


class ObserverFailed(Exception):
    """A critical observer raised: the run must stop cleanly."""

    def __init__(self, observer: object, hook: str, error: BaseException):
        self.observer = observer
        self.hook = hook
        self.error = error
        # Disk full, a read-only directory, permissions: a problem of the control machine, not a bug.
        self.environment = isinstance(error, (OSError, RunbookError))
        what = getattr(observer, "what", type(observer).__name__)
        if isinstance(error, RunbookError):
            text = str(error)
        elif isinstance(error, OSError):
            text = f"cannot write {what}: {error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        else:
            text = f"{type(observer).__name__} failed in {hook}: {type(error).__name__}: {error}"
        super().__init__(text)


def rescued_text(mode: RunMode, host: str, block: str, step_ids: list[str]) -> str:
    """What the console and reports say when a block's rescue handled a failure."""
    steps = f"step{'s' if len(step_ids) > 1 else ''} {', '.join(f'`{s}`' for s in step_ids)}"
    if mode == RunMode.PLAN:
        return f"{host}: block `{block}` would be rescued: {steps} would fail, and its rescue steps are predicted to handle it"
    return f"{host}: block `{block}` rescued: {steps} failed, its rescue steps succeeded"


def _stderr(message: str) -> None:
    print(f"runbook: {message}", file=sys.stderr, flush=True)


class EventStream:
    """Fans every event out: to critical observers in order and in the caller's thread, to the others via a queue."""

    def __init__(self, observers: list[Any] | None = None, *, report: Callable[[str], None] = _stderr):
        observers = list(observers or [])
        self.observers = observers
        self.critical = [o for o in observers if getattr(o, "critical", False)]
        self.best_effort = [o for o in observers if not getattr(o, "critical", False)]
        self._report = report
        self._lock = threading.RLock()
        self._broken: set[int] = set()          # critical observers that raised: not called again
        self.failure: ObserverFailed | None = None   # the first critical failure: no task may start after it
        self._reported: set[int] = set()        # best-effort observers whose failure was reported
        self._queue: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | threading.Event] = queue.SimpleQueue()  # FIFO
        self._thread: threading.Thread | None = None

    def _emit(self, hook: str, *args: Any, optional: bool = False) -> None:
        with self._lock:
            if hook == "task_started" and self.failure is not None:
                raise self.failure   # another worker's task must not start unrecorded either
            failure = self._call_critical(hook, args, optional=optional)
            if self.best_effort:
                self._start_thread()
                self._queue.put((hook, args))
        self._raise(failure)

    def _call_critical(self, hook: str, args: tuple[Any, ...], *,
                       optional: bool = False) -> tuple[ObserverFailed, bool] | None:
        """Call `hook` on every working critical observer (lock held); the first failure, and whether it is the run's first.

        `optional`: observers without the hook are passed over (`sync` is for those that buffer; hooks newer
        than an observer).
        """
        failure: ObserverFailed | None = None
        for obs in self.critical:
            if id(obs) in self._broken or (optional and not callable(getattr(obs, hook, None))):
                continue
            try:
                getattr(obs, hook)(*args)
            except Exception as exc:
                self._broken.add(id(obs))
                failure = failure or ObserverFailed(obs, hook, exc)
        if failure is None:
            return None
        first = self.failure is None
        if first:
            self.failure = failure
        return failure, first

    def _raise(self, failure: tuple[ObserverFailed, bool] | None) -> None:
        """Report a critical failure once (the run's first), then stop the caller with it."""
        if failure is None:
            return
        error, first = failure
        if first:
            self._report(f"the run stops (no new task starts): {error}")
        raise error

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver, name="runbook-observers", daemon=True)
            self._thread.start()

    def _deliver(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            hook, args = item
            for obs in self.best_effort:
                method = getattr(obs, hook, None)
                if method is None:
                    continue   # an observer written before this hook existed
                try:
                    method(*args)
                except Exception as exc:   # best effort: report once, the run goes on
                    if id(obs) not in self._reported:
                        self._reported.add(id(obs))
                        self._report(f"{type(obs).__name__} failed in {hook}: {type(exc).__name__}: {exc} "
                                     "(the run goes on; this output may be incomplete)")

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until best-effort observers have taken every event so far; False when they did not in time."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        if done.wait(timeout):
            return True
        self._report(f"observers did not catch up within {timeout:g}s; their output may be incomplete")
        return False

    def sync(self) -> None:
        """Ask critical observers that buffer (the run state's journal) to make what they hold durable."""
        with self._lock:
            failure = self._call_critical("sync", (), optional=True)
        self._raise(failure)

    def run_started(self, run: RunInfo) -> None:
        """Emit `run_started`."""
        self._emit("run_started", run)

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        """Emit `task_started`."""
        self._emit("task_started", run, task)

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        """Emit `task_finished`."""
        self._emit("task_finished", run, result)

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        """Emit `host_unreachable`."""
        self._emit("host_unreachable", run, host, reason)

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        """Emit `approval` (synchronously for best-effort observers too: the prompt's output must come first)."""
        self._emit("approval", run, host, step_id, granted, who)
        self.flush()

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        """Emit `block_rescued` (observers written before this hook, without it, are passed over)."""
        self._emit("block_rescued", run, host, block, list(step_ids), optional=True)

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        """Emit `notice`."""
        self._emit("notice", run, level, message)

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        """Emit `run_interrupted`."""
        self._emit("run_interrupted", run, reason)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        """Emit `run_finished`, wait for every observer to have taken it, and end the delivery thread."""
        try:
            self._emit("run_finished", run, result)
        finally:
            self.flush()
            self.close()

    def close(self) -> None:
        """End the delivery thread (a later event starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
