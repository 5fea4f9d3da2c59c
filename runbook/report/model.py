"""The report's typed model: what a run report or a plan review page shows, before it is rendered."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field

REPORT_FORMAT_VERSION = 1

# Outcome order for counts, bars and the graph: the worst first, so problems are seen first.
RUN_STATUSES = ("failed", "drift", "unreachable", "rescued", "changed", "ok", "skipped", "deferred", "not_run", "unknown")
# The counts the header always shows, even when zero (the others appear only when they occur).
SHOWN_STATUSES = ("ok", "changed", "failed", "unreachable", "skipped", "rescued", "deferred")
PLAN_PREDICTIONS = ("fail", "change", "unknown", "gate", "ok", "skip", "not_run")
PLAN_LABELS = {"fail": "would fail", "change": "change", "unknown": "unknown", "gate": "gate", "ok": "no change",
               "skip": "skip", "not_run": "not reached"}

# The README's exit code table, for the header.
EXIT_MEANINGS = {
    0: "everything ok (changes included)",
    1: "internal error (a bug)",
    2: "a task failed, or a host drifted from the reviewed plan",
    3: "a host was unreachable",
    4: "invalid input",
    5: "outside the maintenance window, or it closed mid-run and tasks were deferred",
    130: "interrupted: no new task started, running tasks finished",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuditCheck(_Model):
    """Whether the audit trail's hash chain verifies, and whether this run's records are complete."""

    state: Literal["ok", "broken", "missing", "incomplete", "not_checked"] = "not_checked"
    detail: str = ""
    records: int = 0
    path: str | None = None


class StepInfo(_Model):
    """One step of the playbook as the graph and the table show it."""

    id: str
    name: str
    action: str = ""
    section: Literal["steps", "on_failure"] = "steps"
    index: int = 0
    needs: list[str] = Field(default_factory=list)
    cluster: str | None = None        # a block the step belongs to, drawn as a cluster


class RunHeader(_Model):
    """Who ran what, where and when, and how it ended."""

    run_id: str
    mode: str
    status: str = "unknown"
    playbook_name: str = ""
    playbook_path: str = ""
    playbook_hash: str = ""
    inventory_source: str = ""
    inventory_hash: str = ""
    operator: str = ""
    control_host: str | None = None
    host_key_checking: str | None = None
    git_commit: str | None = None
    plan_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    stop_reason: str | None = None
    window: str | None = None
    window_note: str | None = None
    limit: str | None = None
    tags: list[str] = Field(default_factory=list)
    skip_tags: list[str] = Field(default_factory=list)
    extra_vars: dict[str, Any] = Field(default_factory=dict)
    resumed_from: str | None = None
    audit: AuditCheck = Field(default_factory=AuditCheck)
    notes: list[str] = Field(default_factory=list)

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def exit_meaning(self) -> str:
        """What the exit code means (the README's table)."""
        return EXIT_MEANINGS.get(self.exit_code, "") if self.exit_code is not None else "the run did not finish"


TaskStatus = Literal["ok", "changed", "skipped", "failed", "unreachable", "deferred", "drift", "not_run", "unknown", "lost"]


class TaskEntry(BaseModel):
    """One (step, host) task: its outcome, timing, output and, for apply runs, the plan's prediction.

    Validated straight from a saved result (a run-state task, an audit `task.finished` record,
    `TaskResult.as_dict()`): the field names are TaskResult's, other keys are ignored, and the
    aliases below are the one place that knows where a saved document keeps each engine flag.
    """

    model_config = ConfigDict(extra="ignore")

    host: str
    step_id: str
    action: str = ""
    status: TaskStatus
    changed: bool = False
    rc: int | None = None
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration: float = 0.0
    command: str | None = None
    stdout: str = ""
    stderr: str = ""
    message: str = ""
    diff: str | None = None
    ignored: bool = False
    # An on_failure step run for this host (files of earlier versions kept the flag inside `data`).
    rescue: bool = Field(False, validation_alias=AliasChoices("rescue", "on_failure", AliasPath("data", "on_failure")))
    # Failed inside a block whose `rescue:` steps then handled it (TaskResult.rescued).
    block_rescued: bool = Field(False, validation_alias="rescued")
    # A loop's item: the loop step's id, the item's label and position (its step_id is `step[label]`).
    parent: str | None = None
    item_label: str | None = None
    item_index: int | None = None
    # A looped step's own result: how many items it had (they are counted, not it).
    items: int | None = None
    # Done by an earlier run (resume).
    from_run: str | None = Field(None, validation_alias=AliasChoices("from_run", AliasPath("data", "from_run")))
    # apply: what the reviewed plan predicted (set from the plan, never read from a saved result).
    prediction: str | None = Field(None, validation_alias="planned_prediction")
    prediction_reason: str | None = Field(None, validation_alias="planned_reason")

    @property
    def step(self) -> str:
        """The playbook step it belongs to: a loop item's is its loop step."""
        return self.parent or self.step_id

    @property
    def counted(self) -> bool:
        """Whether it counts in totals, as in the console's recap: a loop's items do, the step over them does not."""
        return not self.items

    @property
    def outcome(self) -> str:
        """The status as counted: an on_failure step that succeeded, or a failure its block rescued, is `rescued`."""
        if (self.rescue and self.status in ("ok", "changed")) or (self.block_rescued and self.status == "failed"):
            return "rescued"
        return self.status

    @property
    def mismatch(self) -> bool:
        """True when an apply run's outcome differs from what the plan predicted."""
        return prediction_mismatch(self.prediction, self.status)


def prediction_mismatch(prediction: str | None, status: str) -> bool:
    """Whether an outcome contradicts a prediction (`unknown` predicts nothing, so never contradicts)."""
    if prediction is None or prediction == "unknown":
        return False
    expected = {"change": {"changed"}, "ok": {"ok"}, "skip": {"skipped"}, "fail": {"failed"},
                "not_run": {"not_run", "unreachable", "deferred"}}.get(prediction)
    return expected is not None and status not in expected


class Event(_Model):
    """Something that happened during the run besides task results: unreachable hosts, approvals, notices."""

    at: float | None = None
    kind: Literal["unreachable", "approval", "notice", "interrupted"]
    level: str = "info"
    host: str | None = None
    step_id: str | None = None
    message: str


class RunReport(_Model):
    """Everything a run report shows."""

    kind: Literal["run"] = "run"
    header: RunHeader
    hosts: list[str]
    steps: list[StepInfo]
    tasks: list[TaskEntry]
    events: list[Event] = Field(default_factory=list)
    resume_command: str | None = None
    generated_at: float
    runbook_version: str


class PlanHeader(_Model):
    """A plan's identity: what was planned, over which inputs, by whom and when."""

    plan_file: str
    plan_hash: str
    playbook_name: str
    playbook_path: str
    playbook_hash: str
    inventory_source: str
    inventory_hash: str
    extra_vars_hash: str = ""
    extra_vars: dict[str, Any] = Field(default_factory=dict)
    operator: str = ""
    control_host: str = ""
    created_at: str = ""
    run_id: str = ""
    limit: str | None = None
    tags: list[str] = Field(default_factory=list)
    skip_tags: list[str] = Field(default_factory=list)
    host_key_checking: str | None = None
    runbook_version: str = ""
    local_files: dict[str, str] = Field(default_factory=dict)


class PlanEntry(_Model):
    """One prediction of a plan, per host and step."""

    host: str
    step_id: str
    action: str = ""
    prediction: str = Field(pattern=r"^[a-z_]{1,20}$")
    reason: str = ""
    diff: str | None = None
    command: str | None = None
    gate: bool = False
    read_only: bool = False

    @property
    def label(self) -> str:
        """The prediction as counted: an approval gate is its own kind."""
        return "gate" if self.gate else self.prediction


class PlanReview(_Model):
    """Everything a plan review page shows."""

    kind: Literal["plan"] = "plan"
    header: PlanHeader
    hosts: list[str]
    steps: list[StepInfo]
    entries: list[PlanEntry]
    unreachable: dict[str, str] = Field(default_factory=dict)
    apply_command: str
    generated_at: float
    runbook_version: str
