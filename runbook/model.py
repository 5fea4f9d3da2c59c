"""Pydantic models of the playbook format (v1); no I/O."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from runbook.actions import ACTIONS, field_name
from runbook.errors import RunbookError
from runbook.fields import (YAML11_BOOLEANS, Duration, Int, Limit, LimitValue, Strict, StrList, _none_as_empty,
                            _none_as_empty_list, bool_hint, parse_duration, parse_limit)

GUARDS = ("creates", "removes", "unless", "only_if")

def _cron_valid(expr: str) -> bool:
    """True for a five-field cron expression croniter accepts (it raises odd errors on odd input)."""
    from croniter import croniter

    if not expr.strip().startswith("@") and len(expr.split()) != 5:
        return False  # croniter also takes 6-7 fields (seconds, years), which the format does not promise
    try:
        return bool(croniter.is_valid(expr))
    except Exception:  # croniter may raise anything on hostile text; invalid is the honest answer
        return False


def slugify(name: str) -> str:
    """Default step id: lower-case words of the name joined by dashes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "step"


class Blackout(Strict):
    """A date range in which a window never opens (a change freeze)."""

    start: str = Field(description="Start date or date-time (ISO 8601), inclusive.")
    end: str = Field(description="End date or date-time (ISO 8601), inclusive for dates.")
    reason: str | None = None


class Window(Strict):
    """A maintenance window: opens on a cron schedule for a duration, in a timezone."""

    cron: str = Field(description='Opening times, e.g. "0 2 * * SAT".')
    duration: Duration = Field(description="How long the window stays open, e.g. 2h.")
    timezone: str = "UTC"
    blackout: list[Blackout] = Field(default_factory=list)
    schedule: Literal["on-open"] | None = Field(None, description="`on-open`: the scheduler starts the playbook when the window opens.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not _cron_valid(v):
            raise ValueError(f"invalid cron expression {v!r}: expected five fields, minute hour day-of-month month day-of-week")
        return v

    @field_validator("duration")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("window duration must be positive")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory, a too-long name
            raise ValueError(f"unknown timezone {v!r}: expected an IANA name like UTC or Europe/Berlin") from None
        return v


def action_count_problem(present: list[str]) -> str | None:
    """The complaint about a step declaring these actions, or None when it declares exactly one."""
    if not present:
        return f"step has no action: expected exactly one of {', '.join(action_names())}"
    if len(present) > 1:
        return f"step has {len(present)} actions ({', '.join(present)}): expected exactly one; split it into several steps"
    return None


class StepBase(Strict):
    """One step of a playbook: exactly one action plus conditions, guards and options.

    The action keys (`shell:`, `upload:`, ...) are not listed here: `Step` below is this model plus
    one optional field per registered action, each with the action's own spec type.
    """

    name: str = Field(description="What the step does, in words.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique id; defaults to a slug of the name.")
    needs: StrList | None = Field(None, description="Ids this step waits for; default: the previous step; [] makes a root.")

    when: str | None = None
    # `register` would shadow ABCMeta.register on the model class, hence the alias.
    register_as: str | None = Field(None, alias="register", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="Name under which later steps of the host see this step's result.")
    sudo: bool | str = Field(False, description="true (root, or the host's become_user), false, or a user name.")
    timeout: Duration | None = None
    retries: Int = Field(0, ge=0)
    delay: Duration = 0.0
    until: str | None = None
    ignore_errors: bool = False
    changed_when: str | bool | None = None
    failed_when: str | bool | None = None
    creates: str | None = None
    removes: str | None = None
    unless: str | None = None
    only_if: str | None = None
    read_only: bool = False
    on: Literal["controller"] | None = None
    once: bool = False
    tags: Annotated[StrList, BeforeValidator(_none_as_empty_list, json_schema_input_type=str | list[str] | None)] = Field(default_factory=list)
    env: Annotated[dict[str, str], BeforeValidator(_none_as_empty, json_schema_input_type=dict[str, str | int | float | bool] | None)] = Field(default_factory=dict)
    max_duration: Duration | None = Field(None, description="Do not start when the maintenance window closes sooner than this.")

    _action: str = PrivateAttr("")

    @field_validator("sudo", mode="before")
    @classmethod
    def _sudo_unambiguous(cls, v: Any) -> Any:
        # `sudo: yes` would otherwise run as a user named "yes": a YAML 1.1 boolean word is never a user here.
        if isinstance(v, str) and v.strip().lower() in (*YAML11_BOOLEANS, "true", "false"):
            raise PydanticCustomError(
                "sudo_word", "`sudo: {value}` is neither true/false nor a user name", {"value": v,
                "hint": f"{bool_hint(v)}; `sudo: true` runs as root (or the host's become_user), `sudo: USER` as USER"})
        if isinstance(v, (int, float)) and not isinstance(v, bool):   # pydantic would read 0 and 1 as booleans
            raise PydanticCustomError("bool_word", "expected true or false or a string, got {shown}",
                                      {"shown": f"{'an integer' if isinstance(v, int) else 'a number'} {v}",
                                       "hint": "write `sudo: true`, `sudo: false` or `sudo: USER`"})
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, (int, float)) else x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one_action(self) -> StepBase:
        present = self.actions_present()
        problem = action_count_problem(present)
        if problem:
            raise ValueError(problem)
        self._action = present[0]
        return self

    def actions_present(self) -> list[str]:
        """Names of the actions this step declares (valid steps have exactly one)."""
        return [a for a in action_names() if getattr(self, field_name(a), None) is not None]

    @property
    def action(self) -> str:
        """The name of this step's action."""
        return self._action or self.actions_present()[0]

    @property
    def action_spec(self) -> Any:
        """The value of this step's action key."""
        return getattr(self, field_name(self.action))

    @property
    def step_id(self) -> str:
        """The explicit id, or the slug of the name."""
        return self.id or slugify(self.name)

    @property
    def guards(self) -> dict[str, str]:
        """The guards this step declares."""
        return {g: getattr(self, g) for g in GUARDS if getattr(self, g) is not None}


def action_names() -> list[str]:
    """The registered actions: built-ins first, then plugins."""
    return ACTIONS.names()


def _step_model() -> type[StepBase]:
    """StepBase plus one optional field per registered action (its key, spec type and summary)."""
    fields: dict[str, Any] = {}
    for name, cls in ACTIONS.all().items():
        attr = field_name(name)
        if attr in StepBase.model_fields or name in ("register",):
            raise RunbookError(f"action `{name}` has the name of a step key", hint="rename the action plugin")
        fields[attr] = (cls.spec_type | None, Field(None, alias=name if attr != name else None, description=cls.summary()))
    return create_model("Step", __base__=StepBase, __module__=__name__, **fields)


if TYPE_CHECKING:
    Step = StepBase
else:
    Step = _step_model()


class Playbook(Strict):
    """A runbook: metadata, targets, execution limits and steps."""

    runbook: str = Field(description="The playbook's name.")
    description: str | None = None
    hosts: str = Field("all", description="Inventory host pattern, e.g. web:&prod.")
    vars: Annotated[dict[str, Any], BeforeValidator(_none_as_empty, json_schema_input_type=dict[str, Any] | None)] = Field(default_factory=dict)
    secrets: Annotated[dict[str, Annotated[str, Field(pattern=r"^(env|file):.+$")]], BeforeValidator(_none_as_empty)] = Field(
        default_factory=dict, description="NAME: env:VAR or file:PATH; values are redacted everywhere.")
    concurrency: Int = Field(10, ge=1, description="Hosts at once.")
    batch: LimitValue | None = Field(None, description="Rolling batch size: an integer or a percentage.")
    max_failures: LimitValue | None = Field(None, description="Failed hosts tolerated before no new host or batch starts.")
    window: Window | str | None = Field(None, description="A maintenance window, or the name of one in windows.yml.")
    schedule: str | None = Field(None, description="Cron expression for the scheduler, or `on-open`.")
    host_key_checking: Literal["strict", "accept-new", "off"] | None = None
    steps: Annotated[list[Step], Field(min_length=1)]
    on_failure: Annotated[list[Step], BeforeValidator(_none_as_empty_list, json_schema_input_type=list[Step] | None)] = Field(default_factory=list)

    # Where the playbook came from: path and node positions (set by the loader, not part of the format).
    _source: Any = PrivateAttr(None)

    @field_validator("batch")
    @classmethod
    def _batch_positive(cls, v: Limit | None) -> Limit | None:
        if v is not None and v.value <= 0:
            raise ValueError("batch must be at least 1 host or more than 0%")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is not None and v != "on-open" and not _cron_valid(v):
            raise ValueError(f"invalid schedule {v!r}: expected a cron expression or `on-open`")
        return v

    def all_steps(self) -> list[Step]:
        """Main steps followed by on_failure steps."""
        return [*self.steps, *self.on_failure]

    def step(self, step_id: str) -> Step:
        """The step with this id (main or on_failure)."""
        for s in self.all_steps():
            if s.step_id == step_id:
                return s
        raise KeyError(step_id)


__all__ = ["ACTIONS", "GUARDS", "Blackout", "Limit", "Playbook", "Step", "StepBase", "Window", "action_count_problem",
           "action_names", "parse_duration", "parse_limit", "slugify"]
