"""`cron:` — one marked entry in a user's crontab, present or absent; every other line is kept as it is.

The entry is the line after a marker comment `# runbook: NAME`. The read is `crontab -l [-u USER]`;
the new table is computed from it (the marked entry replaced, added at the end, or removed) and,
when it differs, written back whole with `crontab [-u USER] -` from stdin.
"""

from __future__ import annotations

import difflib
import hashlib
import shlex
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from runbook.actions._system import ACCOUNT_NAME, checked, failed, first_line, grammar, planned, run_argv, shown
from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.actions.group import NAME_HINT
from runbook.errors import RunbookError
from runbook.fields import Strict

MARKER = "# runbook: "
ENTRY_NAME = r"[A-Za-z0-9_][A-Za-z0-9 _.,:;@/+()=-]{0,127}"
_TOKEN = r"(?:\*|[0-9A-Za-z]{1,9}(?:-[0-9A-Za-z]{1,9})?)(?:/[0-9]{1,4})?"
TIME_FIELD = rf"{_TOKEN}(?:,{_TOKEN}){{0,59}}"
JOB = r"[^\x00\n\r]{1,4096}"
_TIME_HINT = "a cron time field: `*`, numbers, names, ranges (`1-5`), lists (`1,15`) and steps (`*/10`)"
_JOB_HINT = "one line: a crontab entry ends at a newline (cron turns `%` into newlines too: escape it as `\\%`)"


def _text(value: Any) -> Any:
    """YAML reads `minute: 5` as a number; a cron field is text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


TimeField = Annotated[str, BeforeValidator(_text, json_schema_input_type=str | int),
                      AfterValidator(grammar(TIME_FIELD, "cron time field", _TIME_HINT))]


class CronSpec(Strict):
    """One marked entry in a user's crontab, present or absent; every other line is kept."""

    name: Annotated[str, AfterValidator(grammar(ENTRY_NAME, "cron entry name", "one line of letters, digits, spaces "
                                                "and `_ . , : ; @ / + ( ) = -`"))] = Field(
        description="Names the entry: the marker comment `# runbook: NAME` above it.")
    user: Annotated[str, AfterValidator(grammar(ACCOUNT_NAME, "user name", NAME_HINT))] | None = Field(
        None, description="Whose crontab (`crontab -u`); default: the user the step runs as.")
    job: Annotated[str, AfterValidator(grammar(JOB, "cron job", _JOB_HINT))] | None = Field(
        None, description="The command line cron runs (required for `state: present`).")
    minute: TimeField = "*"
    hour: TimeField = "*"
    day: TimeField = "*"
    month: TimeField = "*"
    weekday: TimeField = "*"
    special_time: Literal["reboot", "yearly", "annually", "monthly", "weekly", "daily", "hourly"] | None = None
    disabled: bool = Field(False, description="Keep the entry, commented out.")
    state: Literal["present", "absent"] = "present"

    @model_validator(mode="after")
    def _consistent(self) -> CronSpec:
        if self.state == "present" and self.job is None:
            raise ValueError("cron needs `job` for `state: present`")
        timed = [k for k in ("minute", "hour", "day", "month", "weekday") if getattr(self, k) != "*"]
        if self.special_time and timed:
            raise ValueError(f"cron: `special_time` and `{timed[0]}` exclude each other")
        return self


def entry_line(spec: CronSpec, job: str) -> str:
    """The crontab line of the entry."""
    when = f"@{spec.special_time}" if spec.special_time else " ".join(
        (spec.minute, spec.hour, spec.day, spec.month, spec.weekday))
    return ("#" if spec.disabled else "") + f"{when} {job}"


def new_table(table: str, name: str, line: str | None) -> tuple[str, str | None]:
    """(the table with the marked entry set to `line`, or removed when None; the entry's line now, or None)."""
    marker = MARKER + name
    # Split on newlines only: str.splitlines() also splits on \r, \f and others, which would
    # rewrite other entries' bytes.
    lines = table.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out: list[str] = []
    current: str | None = None
    at: int | None = None
    i = 0
    while i < len(lines):
        if lines[i].rstrip() == marker:
            at = len(out) if at is None else at
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if nxt is not None and not nxt.startswith(MARKER):
                current = nxt if current is None else current
                i += 1
            i += 1
            continue
        out.append(lines[i])
        i += 1
    markers = sum(1 for x in lines if x.rstrip() == marker)
    if (line is None and markers == 0) or (line is not None and markers == 1 and current == line):
        return table, current          # already as wanted: the table is left byte for byte
    where = len(out) if at is None else at
    if line is not None:
        out[where:where] = [marker, line]
    return "".join(f"{x}\n" for x in out), current


def _lines(text: str) -> list[str]:
    return [line + "\n" for line in text.split("\n")[: -1 if text.endswith("\n") else None]] if text else []


def table_diff(old: str, new: str, label: str) -> str:
    """The changed lines only: context lines could be other entries, which are not this step's to show."""
    return "".join(difflib.unified_diff(_lines(old), _lines(new),
                                        fromfile=f"{label} (on host)", tofile=f"{label} (wanted)", n=0))


class Cron(Action):
    """One marked entry in a user's crontab, present or absent; every other line is kept as it is."""

    name = "cron"
    spec_type: ClassVar[Any] = CronSpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("name", "user", "minute", "hour", "day", "month", "weekday"))
        yield from string_fields(self.spec, ("job",), FieldKind.SHELL)   # cron runs it with sh

    def probes_read_only(self) -> bool:
        return True   # plan() runs only `crontab -l`

    def _target(self, env: TaskEnv) -> tuple[str, str | None, str | None]:
        """(entry name, crontab user or None, the entry's line or None for absent), rendered and checked."""
        spec = self.spec
        name = checked(env, spec.name, ENTRY_NAME, "cron entry name", "one line without `#`")
        user = checked(env, spec.user, ACCOUNT_NAME, "user name", NAME_HINT) if spec.user else None
        if spec.state == "absent":
            return name, user, None
        times = {k: checked(env, getattr(spec, k), TIME_FIELD, "cron time field", _TIME_HINT)
                 for k in ("minute", "hour", "day", "month", "weekday")}
        job = checked(env, spec.job or "", JOB, "cron job", _JOB_HINT)
        return name, user, entry_line(spec.model_copy(update=times), job)

    def _who(self, user: str | None) -> str:
        return f"the crontab of {user}" if user else "the crontab"

    def describe(self, env: TaskEnv) -> str | None:
        name, user, _ = self._target(env)
        return f"cron {name!r} in {self._who(user)}: {self.spec.state}"

    def read(self, env: TaskEnv, name: str, user: str | None) -> str:
        """The crontab's text ("" when the user has none)."""
        res = run_argv(env, ["crontab", *(["-u", user] if user else []), "-l"], timeout=env.step.timeout or 60.0)
        if res.rc == 0 and res.truncated:
            # Writing back a table the connection cut short would drop other entries.
            raise RunbookError(f"{env.host}: cron {shown(name)}: {self._who(user)} is larger than the connection's "
                               "output limit; it is not edited", hint="runbook edits a crontab only when it has read all of it")
        if res.rc == 0:
            return res.stdout
        if res.rc == 1 and "no crontab for" in res.stderr:
            return ""
        why = "crontab is not installed on the host" if res.rc == 127 else first_line(res, "crontab -l failed")
        raise RunbookError(f"{env.host}: cron {shown(name)}: cannot read {self._who(user)}: {why}",
                           hint="reading another user's crontab needs `sudo: true`" if user else None)

    def _decide(self, env: TaskEnv) -> tuple[str, str | None, str, str, str | None, str | None]:
        name, user, line = self._target(env)
        old = self.read(env, name, user)
        new, current = new_table(old, name, line)
        return name, user, old, new, current, line

    def _decide_planned(self, env: TaskEnv) -> tuple[str, str | None, str, str, str | None, str | None]:
        """As `_decide`, for a dry run: a user an earlier step is predicted to create has an empty crontab."""
        try:
            return self._decide(env)
        except RunbookError:
            name, user, line = self._target(env)
            if not user or not isinstance(planned(env, "user", user), dict):
                raise
            new, current = new_table("", name, line)
            return name, user, "", new, current, line

    def plan(self, env: TaskEnv) -> Prediction:
        name, user, old, new, current, line = self._decide_planned(env)
        state = hashlib.sha256(old.encode()).hexdigest()[:32]
        data = {"user": user, "before": current, "after": line}
        label = f"cron {name!r}"
        if new == old:
            return Prediction(PredictionKind.OK, f"{label} is {self.spec.state} in {self._who(user)}", state=state,
                              command=self.describe(env), data=data)
        verb = "remove the entry" if line is None else ("add the entry" if current is None else "change the entry")
        return Prediction(PredictionKind.CHANGE, f"{label}: {verb} in {self._who(user)}", state=state, data=data,
                          diff=table_diff(old, new, f"crontab{' of ' + user if user else ''}"),
                          command=shlex.join(["crontab", *(["-u", user] if user else []), "-"]) + " < (the new table)")

    def apply(self, env: TaskEnv) -> Outcome:
        name, user, old, new, current, line = self._decide(env)
        label = f"cron {name!r}"
        data: dict[str, Any] = {"user": user, "before": current, "after": current}
        if new == old:
            return Outcome(changed=False, message=f"{label} is {self.spec.state} in {self._who(user)}",
                           command=self.describe(env), data=data)
        argv = ["crontab", *(["-u", user] if user else []), "-"]
        res = run_argv(env, argv, stdin=new)
        if res.rc != 0:
            return failed(env, f"cron {shown(name)}", f"writing {self._who(user)}", res, command=shlex.join(argv), data=data)
        now = self.read(env, name, user)
        data["after"] = new_table(now, name, None)[1]
        if new_table(now, name, line)[0] != now:
            return failed(env, f"cron {shown(name)}", "checking the result", None, command=shlex.join(argv), data=data,
                          detail=f"crontab accepted the table but {self._who(user)} does not hold the entry as wanted")
        verb = "removed" if line is None else ("added" if current is None else "changed")
        return Outcome(changed=True, message=f"{label}: entry {verb} in {self._who(user)}", command=shlex.join(argv),
                       diff=table_diff(old, now, f"crontab{' of ' + user if user else ''}"), data=data)

