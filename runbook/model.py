"""Pydantic models of the playbook format (v1); no I/O."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PrivateAttr, StringConstraints, field_validator,
                      model_validator)

ACTIONS = ("shell", "command", "upload", "template", "fetch", "wait_for", "assert", "approve")
GUARDS = ("creates", "removes", "unless", "only_if")

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?!s))?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*(?:(\d+)\s*ms)?\s*$")


def parse_duration(value: Any) -> float:
    """Parse `30s`, `5m`, `2h`, `1h30m`, `250ms` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 2h, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            m = _DURATION_RE.match(text)
            if not m or not any(m.groups()):
                raise ValueError(f"invalid duration {value!r}: expected a number with a unit, like 30s, 5m, 2h or 1h30m")
            h, mi, s, ms = m.groups()
            seconds = float(h or 0) * 3600 + float(mi or 0) * 60 + float(s or 0) + float(ms or 0) / 1000
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number with a unit, like 30s, 5m or 2h")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def _format_duration(seconds: float) -> str:
    return f"{seconds:g}s"


# What editors see in the JSON Schema: the text forms the validators accept, not the parsed result.
_DURATION_TEXT = Annotated[str, StringConstraints(pattern=r"^\s*(\d+(\.\d+)?\s*(h|m|s|ms)?\s*)+$")]
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=Annotated[float, Field(ge=0)] | _DURATION_TEXT),
                     PlainSerializer(_format_duration, return_type=str)]


@dataclass(frozen=True)
class Limit:
    """A count or a percentage of hosts (batch sizes, failure limits)."""

    value: float
    percent: bool = False

    def of(self, total: int) -> int:
        """Resolve against a number of hosts; a percentage rounds up so that 1% of 3 hosts is 1."""
        if not self.percent:
            return int(self.value)
        import math

        return max(1, math.ceil(total * self.value / 100)) if total else 0

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


def parse_limit(value: Any) -> Limit:
    """Parse an integer or a percentage like `25%`."""
    if isinstance(value, Limit):
        return value
    if isinstance(value, bool):
        raise ValueError("expected an integer or a percentage like 25%, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid limit {value}: must not be negative")
        return Limit(value)
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
        if m:
            pct = float(m.group(1))
            if not 0 <= pct <= 100:
                raise ValueError(f"invalid percentage {value!r}: must be between 0% and 100%")
            return Limit(pct, percent=True)
        if text.isdigit():
            return Limit(int(text))
    raise ValueError(f"invalid limit {value!r}: expected an integer like 5 or a percentage like 25%")


_LIMIT_TEXT = Annotated[str, StringConstraints(pattern=r"^\s*\d+(\.\d+)?\s*%?\s*$")]
LimitValue = Annotated[Limit, BeforeValidator(parse_limit, json_schema_input_type=Annotated[int, Field(ge=0)] | _LIMIT_TEXT),
                       PlainSerializer(str, return_type=str)]


def _cron_valid(expr: str) -> bool:
    """True for a five-field cron expression croniter accepts (it raises odd errors on odd input)."""
    from croniter import croniter

    if not expr.strip().startswith("@") and len(expr.split()) != 5:
        return False  # croniter also takes 6-7 fields (seconds, years), which the format does not promise
    try:
        return bool(croniter.is_valid(expr))
    except Exception:  # croniter may raise anything on hostile text; invalid is the honest answer
        return False


def _no_bool(value: Any) -> Any:
    """Refuse true/false where a number is expected (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got a boolean {str(value).lower()}")
    return value


def _none_as_empty(value: Any) -> Any:
    """An empty YAML key (`vars:` with nothing under it) means an empty collection."""
    return {} if value is None else value


def _none_as_empty_list(value: Any) -> Any:
    return [] if value is None else value


Int = Annotated[int, BeforeValidator(_no_bool)]


def slugify(name: str) -> str:
    """Default step id: lower-case words of the name joined by dashes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "step"


def _str_list(value: Any) -> Any:
    """Accept a single string where a list of strings is expected."""
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_str_list, json_schema_input_type=str | list[str])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class Blackout(_Strict):
    """A date range in which a window never opens (a change freeze)."""

    start: str = Field(description="Start date or date-time (ISO 8601), inclusive.")
    end: str = Field(description="End date or date-time (ISO 8601), inclusive for dates.")
    reason: str | None = None


class Window(_Strict):
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


class UploadSpec(_Strict):
    """Copy a local file to the host when its checksum or mode differs."""

    src: str
    dest: str
    mode: str | None = Field(None, description="Octal file mode, e.g. '0644'.")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # the loader reads 0644 as the digits 644 (YAML 1.2), never as octal 420
        if v is not None and not re.fullmatch(r"0?[0-7]{3,4}", str(v)):
            raise ValueError(f"invalid mode {v!r}: expected an octal string like '0644'")
        return None if v is None else str(v)


class TemplateSpec(UploadSpec):
    """Render a local jinja2 file and upload it when the result differs."""


class FetchSpec(_Strict):
    """Copy a remote file to a local directory, one subdirectory per host."""

    src: str
    dest: str = Field(description="Local directory; the file lands in DEST/HOST/basename.")


class WaitForSpec(_Strict):
    """Wait until a TCP port accepts, a file exists, or a command succeeds."""

    port: Annotated[Int, Field(ge=1, le=65535)] | Annotated[str, Field(pattern=r"\{\{")] | None = Field(
        None, description="A TCP port, or a template that renders to one, e.g. '{{ app_port }}'.")
    host: str = "127.0.0.1"
    path: str | None = None
    command: str | None = None
    state: Literal["present", "absent", "started", "stopped"] = "present"
    timeout: Duration = 60.0
    interval: Duration = 1.0

    @model_validator(mode="after")
    def _one_target(self) -> WaitForSpec:
        targets = [k for k in ("port", "path", "command") if getattr(self, k) is not None]
        if len(targets) != 1:
            raise ValueError("wait_for needs exactly one of `port`, `path` or `command`")
        return self


class AssertSpec(_Strict):
    """Jinja2 conditions that must all be true."""

    that: StrList
    msg: str | None = None
    success_msg: str | None = None


def _assert_shorthand(v: Any) -> Any:
    """`assert: expr` or `assert: [expr, ...]` is short for `assert: {that: ...}`."""
    if isinstance(v, (str, list)):
        return {"that": v}
    return v


def _approve_shorthand(v: Any) -> Any:
    """`approve: "question?"` is short for `approve: {prompt: ...}`."""
    if isinstance(v, str):
        return {"prompt": v}
    return v


class ApproveSpec(_Strict):
    """A yes/no gate asked on the terminal before the run goes on."""

    prompt: str = "Continue?"


def action_count_problem(present: list[str]) -> str | None:
    """The complaint about a step declaring these actions, or None when it declares exactly one."""
    if not present:
        return f"step has no action: expected exactly one of {', '.join(ACTIONS)}"
    if len(present) > 1:
        return f"step has {len(present)} actions ({', '.join(present)}): expected exactly one; split it into several steps"
    return None


class Step(_Strict):
    """One step of a playbook: exactly one action plus conditions, guards and options."""

    name: str = Field(description="What the step does, in words.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique id; defaults to a slug of the name.")
    needs: StrList | None = Field(None, description="Ids this step waits for; default: the previous step; [] makes a root.")

    shell: str | None = Field(None, description="A command line run through `sh -c`.")
    command: Annotated[list[str], Field(min_length=1)] | None = Field(None, description="An argv list, run without a shell.")
    upload: UploadSpec | None = None
    template: TemplateSpec | None = None
    fetch: FetchSpec | None = None
    wait_for: WaitForSpec | None = None
    assert_: Annotated[AssertSpec, BeforeValidator(_assert_shorthand, json_schema_input_type=str | list[str] | AssertSpec)] | None = Field(None, alias="assert")
    approve: Annotated[ApproveSpec, BeforeValidator(_approve_shorthand, json_schema_input_type=str | ApproveSpec)] | None = None

    when: str | None = None
    # `register` would shadow ABCMeta.register on the model class, hence the alias.
    register_as: str | None = Field(None, alias="register", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="Name under which later steps of the host see this step's result.")
    sudo: bool | str = False
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

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, (int, float)) else x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        problem = action_count_problem(self.actions_present())
        if problem:
            raise ValueError(problem)
        return self

    def actions_present(self) -> list[str]:
        """Names of the actions this step declares (valid steps have exactly one)."""
        return [a for a in ACTIONS if getattr(self, "assert_" if a == "assert" else a) is not None]

    @property
    def action(self) -> str:
        """The name of this step's action."""
        return self.actions_present()[0]

    @property
    def action_spec(self) -> Any:
        """The value of this step's action key."""
        return getattr(self, "assert_" if self.action == "assert" else self.action)

    @property
    def step_id(self) -> str:
        """The explicit id, or the slug of the name."""
        return self.id or slugify(self.name)

    @property
    def guards(self) -> dict[str, str]:
        """The guards this step declares."""
        return {g: getattr(self, g) for g in GUARDS if getattr(self, g) is not None}


class Playbook(_Strict):
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
