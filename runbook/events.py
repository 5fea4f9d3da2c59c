"""The executor's event stream: lifecycle hooks that observers (console, audit, state, JSON) implement."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from runbook.results import RunResult, TaskResult


@dataclass(frozen=True)
class RunInfo:
    """Who runs what, where: fixed when a run starts."""

    run_id: str
    mode: str                        # plan | run | apply | resume
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


@dataclass(frozen=True)
class TaskRef:
    """One (step, host) task as it starts."""

    host: str
    step_id: str
    step_name: str
    action: str
    attempt: int = 1
    command: str | None = None       # rendered and redacted


class Observer:
    """Lifecycle hooks; every method is optional. Calls arrive one at a time (the stream serialises them)."""

    def run_started(self, run: RunInfo) -> None: ...
    def task_started(self, run: RunInfo, task: TaskRef) -> None: ...
    def task_finished(self, run: RunInfo, result: TaskResult) -> None: ...
    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None: ...
    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None: ...
    def notice(self, run: RunInfo, level: str, message: str) -> None: ...
    def run_interrupted(self, run: RunInfo, reason: str) -> None: ...
    def run_finished(self, run: RunInfo, result: RunResult) -> None: ...


class EventStream(Observer):
    """Fans every event out to a list of observers, one event at a time."""

    def __init__(self, observers: list[Observer] | None = None):
        self.observers: list[Observer] = list(observers or [])
        self._lock = threading.RLock()

    def _emit(self, name: str, *args: Any) -> None:
        with self._lock:
            for obs in self.observers:
                getattr(obs, name)(*args)

    def run_started(self, run: RunInfo) -> None:
        self._emit("run_started", run)

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        self._emit("task_started", run, task)

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        self._emit("task_finished", run, result)

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        self._emit("host_unreachable", run, host, reason)

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        self._emit("approval", run, host, step_id, granted, who)

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        self._emit("notice", run, level, message)

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        self._emit("run_interrupted", run, reason)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        self._emit("run_finished", run, result)
