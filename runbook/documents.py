"""The files runbook writes and reads back — plan files and run-state files — as versioned pydantic models.

Both are untrusted input when read (a plan is reviewed on one machine and applied on another; a
state file sits on disk between a crash and a resume), so they are validated against these models
before anything uses them. Readers keep accepting every file the current format version writes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runbook.errors import Location, PlanFileError, ValidationError as RunbookValidationError

PLAN_FORMAT = "runbook-plan"
# 2: the plan keeps the reviewed playbook text, a salted (or keyed) extra vars hash, and may be signed.
PLAN_VERSION = 2
STATE_VERSION = 1


class _Doc(BaseModel):
    # Unknown keys are kept (not refused): a file made by a newer patch release stays readable, and
    # plan files are protected against edits by their hash, not by this schema.
    model_config = ConfigDict(extra="allow")


class PlanPrediction(_Doc):
    """One task's prediction in a plan."""

    host: str
    step_id: str
    action: str
    prediction: Literal["change", "ok", "skip", "unknown", "fail", "not_run", "deferred", "drift"]
    reason: str | None = ""
    diff: str | None = None
    state: str | None = None
    command: str | None = None
    gate: bool = False
    read_only: bool = False
    # Loops: an item's prediction (step_id `step[label]`) names its step (namespaced `role/step`, or `handler:ID`).
    parent: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./:-]*$")
    item_label: str | None = None
    item_index: int | None = Field(None, ge=0)
    items: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _item_of_its_step(self) -> PlanPrediction:
        if self.parent is not None and not (self.step_id.startswith(self.parent + "[") and self.step_id.endswith("]")):
            raise ValueError(f"loop item {self.step_id!r} is not keyed `{self.parent}[LABEL]`")
        return self


HostKeyLevel = Literal["strict", "accept-new", "off"]
_HEX64 = r"^[0-9a-f]{64}$"


class PlanPlaybook(_Doc):
    """The playbook a plan was made from: its text is what `apply` runs (None: it held a secret value)."""

    path: str
    name: str
    hash: str = Field(pattern=r"^([0-9a-f]{64})?$")   # empty: a playbook built in code, without a file
    text: str | None


class PlanSignature(_Doc):
    """HMAC-SHA256 of the canonical plan document (every field but this one) under the plan key."""

    alg: Literal["hmac-sha256"]
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    value: str = Field(pattern=_HEX64)


class PlanInventory(_Doc):
    """The inventory a plan was made from."""

    source: str
    hash: str


class PlanDocument(_Doc):
    """A saved plan: identity, the inputs' hashes, every prediction (secrets redacted), and its own hash."""

    format: Literal["runbook-plan"]
    version: int
    runbook_version: str
    created_at: str
    created_ts: float
    operator: str
    control_host: str
    run_id: str
    playbook: PlanPlaybook
    inventory: PlanInventory
    limit: str | None = None
    tags: list[str] = Field(default_factory=list)
    skip_tags: list[str] = Field(default_factory=list)
    extra_vars: dict[str, Any] = Field(default_factory=dict)
    extra_vars_hash: str = Field(pattern=_HEX64)
    extra_vars_salt: str = Field(pattern=r"^[0-9a-f]{32}$")
    extra_vars_scheme: Literal["keyed", "scrypt", "salted"]
    host_key_checking: HostKeyLevel | None = None
    hosts: list[str]
    unreachable: dict[str, str] = Field(default_factory=dict)
    predictions: list[PlanPrediction]
    local_files: dict[str, str] = Field(default_factory=dict)
    hash: str = Field(pattern=_HEX64)
    signature: PlanSignature | None = None


class RunStateDocument(_Doc):
    """A run's state file: identity, inputs' hashes, and each finished task (as `TaskResult.as_dict`)."""

    version: int
    run_id: str
    mode: Literal["run", "plan", "apply", "resume"]
    status: str
    playbook_path: str
    playbook_name: str
    playbook_hash: str
    playbook_files: dict[str, str] = Field(default_factory=dict)   # included, role, vars files: path -> sha256
    inventory_source: str
    inventory_hash: str
    hosts: list[str]
    operator: str
    limit: str | None = None
    extra_vars: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    skip_tags: list[str] = Field(default_factory=list)
    plan_hash: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    stop_reason: str | None = None
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict)


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"`{where}`: {err['msg']}"


def check_plan(doc: object, path: str) -> PlanDocument:
    """Validate a plan document read from `path`; a malformed one is a PlanFileError naming the field."""
    try:
        return PlanDocument.model_validate(doc)
    except ValidationError as exc:
        raise PlanFileError(f"malformed plan file: {_first_problem(exc)}", location=Location(path),
                            hint="make a new plan with `runbook plan ... --out FILE`") from None


def check_state(doc: object, path: str) -> RunStateDocument:
    """Validate a run-state document read from `path`; a malformed one is an invalid-input error naming the field."""
    try:
        return RunStateDocument.model_validate(doc)
    except ValidationError as exc:
        raise RunbookValidationError(f"malformed run state {path}: {_first_problem(exc)}",
                                     hint="the file was damaged or edited; `runbook runs` lists the runs") from None
