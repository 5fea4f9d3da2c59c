"""Result types: one result per (step, host) task, and the run that collects them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from runbook.errors import EXIT_ENVIRONMENT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_TASK_FAILED, EXIT_UNREACHABLE, EXIT_WINDOW_CLOSED


class Status(str, Enum):
    """What happened to one task (or, in a dry run, what would happen)."""

    OK = "ok"                    # ran (or would run) and changed nothing
    CHANGED = "changed"          # ran and changed something
    SKIPPED = "skipped"          # when false, guard satisfied, tag filter, upstream skipped
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    DEFERRED = "deferred"        # the maintenance window closed before it could start
    DRIFT = "drift"              # apply: remote state no longer matches the reviewed plan
    NOT_RUN = "not_run"          # never started: upstream failure, max_failures, interrupt
    UNKNOWN = "unknown"          # dry run: nothing can tell whether it would change
    LOST = "lost"                # cluster: running on a worker that was lost; its outcome is unknown

    def __str__(self) -> str:
        return self.value


class RunMode(str, Enum):
    """What a run does: run, plan (dry run), apply a reviewed plan, or resume an earlier run."""

    RUN = "run"
    PLAN = "plan"
    APPLY = "apply"
    RESUME = "resume"

    def __str__(self) -> str:
        return self.value


class PredictionKind(str, Enum):
    """What a dry run expects of one task."""

    CHANGE = "change"
    OK = "ok"
    SKIP = "skip"
    UNKNOWN = "unknown"
    FAIL = "fail"

    def __str__(self) -> str:
        return self.value


# Statuses that count as "this task is done" when resuming a run.
DONE_STATUSES = frozenset({Status.OK, Status.CHANGED, Status.SKIPPED})


@dataclass
class TaskResult:
    """The outcome of one step on one host."""

    host: str
    step_id: str
    action: str
    status: Status
    changed: bool = False
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    command: str | None = None
    message: str = ""
    duration: float = 0.0
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    diff: str | None = None
    data: dict = field(default_factory=dict)   # action-specific facts (e.g. checksums, bytes); never engine flags
    ignored: bool = False                      # failed, but ignore_errors let the host go on
    on_failure: bool = False                   # an on_failure (rescue) step, not a main step
    prediction: PredictionKind | None = None   # dry run: what the task would do
    state: str | None = None                   # dry run: fingerprint of the remote state the prediction rests on
    read_only: bool = False                    # dry run: a read_only step that ran for real
    from_run: str | None = None                # resume: done in this earlier run, not run again
    rescued: bool = False                      # failed inside a block whose `rescue:` steps then succeeded
    delegated_to: str | None = None            # delegate_to: where it ran for `host` (an inventory host or "controller")
    worker: str | None = None                  # cluster: the worker that ran it (None: the controller itself)
    # Loops: an item's result is keyed `step[label]` (step_id) and names its step (parent); the step's own
    # result (the aggregate the scheduler and registers use) counts its items and carries them in memory.
    parent: str | None = None                  # a loop item: the id of its step
    item_label: str | None = None              # a loop item: its label as shown (sanitized, redacted)
    item_index: int | None = None              # a loop item: its position in the item list
    item: Any = None                           # a loop item: the item itself (for the register on resume)
    items: int | None = None                   # a looped step's own result: how many items it had
    item_results: list[TaskResult] = field(default_factory=list, repr=False, compare=False)   # not saved

    @property
    def failed(self) -> bool:
        """True when the task failed and the failure was neither ignored nor rescued by its block."""
        return self.status == Status.FAILED and not self.ignored and not self.rescued

    @property
    def tally(self) -> str:
        """The status it counts as in totals and recaps: its status, or `rescued` for a rescued failure."""
        return "rescued" if self.rescued else self.status.value

    def as_dict(self) -> dict:
        """Return a JSON-ready mapping."""
        # Shallow on purpose: asdict() deep-copies every nested value, which dominates large runs.
        d = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "item_results"}
        d["status"] = self.status.value
        d["prediction"] = self.prediction.value if self.prediction is not None else None
        d["data"] = dict(self.data)
        if d.get("worker") is None:
            d.pop("worker", None)   # in-process runs: the same documents as before clusters existed
        if d.get("delegated_to") is None:
            d.pop("delegated_to", None)   # ran on its own host: the same documents as before delegate_to
        if not d.get("rescued"):
            d.pop("rescued", None)   # only a rescued failure says so: the same documents as before blocks
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskResult:
        """Rebuild a result saved with `as_dict` (files of earlier versions kept these flags in `data`)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "item_results"}
        data = dict(fields.get("data") or {})
        for flag in ("on_failure", "prediction", "state", "read_only", "from_run"):
            if flag in data and fields.get(flag) is None:
                fields[flag] = data.pop(flag)
        data.pop("registered", None)
        data.pop("gate", None)
        fields["data"] = data
        fields["status"] = Status(fields["status"])
        if fields.get("prediction") is not None:
            fields["prediction"] = PredictionKind(fields["prediction"])
        return cls(**fields)


@dataclass
class RunResult:
    """Every task result of a run, with the run's identity and how it ended."""

    run_id: str
    mode: RunMode
    hosts: list[str]
    results: list[TaskResult] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    interrupted: bool = False
    stop_reason: str | None = None       # e.g. "max_failures exceeded", "window closed"
    unreachable: dict[str, str] = field(default_factory=dict)  # host -> reason
    observer_failed: str | None = None   # a critical observer (audit trail, run state) failed: the run stopped
    environment_failed: bool = False     # ... because the control machine could not write (disk full, read-only)

    @property
    def wall_time(self) -> float:
        """Seconds from start to finish."""
        return max(0.0, self.finished_at - self.started_at)

    def for_host(self, host: str) -> list[TaskResult]:
        """Results of one host, in completion order."""
        return [r for r in self.results if r.host == host]

    def get(self, host: str, step_id: str) -> TaskResult | None:
        """The result of one task, if it has one."""
        for r in self.results:
            if r.host == host and r.step_id == step_id:
                return r
        return None

    def recap(self) -> dict[str, Counter]:
        """Counts per status per host, like Ansible's PLAY RECAP (a loop's items count, not the step over them)."""
        table: dict[str, Counter] = {h: Counter() for h in self.hosts}
        for r in self.results:
            if counted(r):
                table.setdefault(r.host, Counter())[r.tally] += 1
        return table

    def totals(self) -> Counter:
        """Counts per status over all hosts (a loop's items count, not the step over them)."""
        return Counter(r.tally for r in self.results if counted(r))

    def rescued_hosts(self) -> list[str]:
        """Hosts where a block's rescue steps handled a failure and nothing else failed."""
        rescued = {r.host for r in self.results if r.rescued}
        failed = {r.host for r in self.results if r.failed or r.status in (Status.UNREACHABLE, Status.DRIFT)}
        return [h for h in self.hosts if h in rescued and h not in failed]

    @property
    def ok(self) -> bool:
        """True when nothing failed, nothing was unreachable and the run was not interrupted."""
        return self.exit_code() == EXIT_OK

    def exit_code(self) -> int:
        """The documented exit code for this outcome."""
        if self.observer_failed:
            return EXIT_ENVIRONMENT if self.environment_failed else EXIT_ERROR
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.unreachable or any(r.status in (Status.UNREACHABLE, Status.LOST) for r in self.results):
            return EXIT_UNREACHABLE
        if any(r.failed or r.status == Status.DRIFT for r in self.results):
            return EXIT_TASK_FAILED
        if any(r.status == Status.DEFERRED for r in self.results):
            return EXIT_WINDOW_CLOSED   # unfinished: the window closed; `runbook resume` continues it
        return EXIT_OK

    def as_dict(self) -> dict:
        """Return a JSON-ready mapping."""
        return {
            "run_id": self.run_id,
            "mode": str(self.mode),
            "hosts": self.hosts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_time": round(self.wall_time, 3),
            "interrupted": self.interrupted,
            "stop_reason": self.stop_reason,
            "observer_failed": self.observer_failed,
            "unreachable": self.unreachable,
            "totals": dict(self.totals()),
            "recap": {h: dict(c) for h, c in self.recap().items()},
            **({"rescued_hosts": rescued} if (rescued := self.rescued_hosts()) else {}),
            "exit_code": self.exit_code(),
            "results": [r.as_dict() for r in self.results],
        }


def register_value(res: TaskResult, skipped: bool = False) -> dict[str, Any]:
    """What `register:` stores for a task (the same shape Ansible users expect: stdout, rc, changed, ...)."""
    return {"stdout": res.stdout, "stderr": res.stderr, "rc": res.rc, "changed": res.changed,
            "failed": res.status == Status.FAILED, "skipped": skipped, "status": res.status.value,
            "duration": res.duration, "stdout_lines": res.stdout.splitlines(), "msg": res.message,
            "data": res.data}


def loop_register_value(res: TaskResult, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What `register:` stores for a looped step: its own outcome, and each item's register (with the item) in `results`."""
    value = register_value(res, skipped=res.status == Status.SKIPPED)
    value["results"] = entries
    value["failed"] = res.status == Status.FAILED or any(e.get("failed") is True for e in entries)
    return value


def item_register_value(res: TaskResult, loop_name: str, index_var: str | None,
                        base: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a loop register's `results`: the item's register value with the item under `item` and its loop_var."""
    value = dict(base) if base is not None else register_value(res, skipped=res.status == Status.SKIPPED)
    value.update({"item": res.item, loop_name: res.item})
    if index_var:
        value[index_var] = res.item_index
    return value


def counted(res: TaskResult) -> bool:
    """Whether a result counts as a task in totals: not a looped step's own result when its items are counted."""
    return not res.items


def item_step_id(step_id: str, label: str) -> str:
    """The key of a loop item's result: `step[label]` (step ids never hold `[`, so it names its step)."""
    return f"{step_id}[{label}]"


def parent_step(step_id: str) -> str:
    """The step a result key belongs to: the step id itself, or the part of `step[label]` before the `[`."""
    return step_id.split("[", 1)[0]
