"""Shared pieces of the system resource actions (service, package, user, group, cron).

Each of those actions reads the host's current state in one read-only round trip: one `sh -c`
script, with the names as positional arguments (never spliced into the script), that detects the
backend (init system, package manager) and prints its findings in marked sections. The action then
computes the difference, reports it as a prediction or applies only it, and reads once more after
a change to confirm the result. Detection happens inside that same script, so nothing is cached
between steps and a step that installs a tool is seen by the next one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from runbook.actions.base import Outcome, TaskEnv
from runbook.connections import CommandResult
from runbook.errors import RunbookError

#: Default time limit of a read (a step's own `timeout` wins).
READ_TIMEOUT = 120.0

# Printed before each section of a read script's output; the parser splits on these lines.
SECTION_FUNCTION = "sec() { printf '\\n--rb:%s--\\n' \"$1\"; }\n"
_SECTION = re.compile(r"^--rb:([A-Za-z0-9_.-]+)--$", re.MULTILINE)

# Grammars of the names these actions accept. None may start with `-` (it would read as an option)
# or hold spaces, quotes or shell metacharacters.
SERVICE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.@:+\-]{0,254}"
PACKAGE_NAME = r"[A-Za-z0-9][A-Za-z0-9+._\-]{0,127}(:[a-z0-9\-]{1,32})?"
ACCOUNT_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]{0,30}\$?"
PATH_TEXT = r"/[^\x00-\x1f\x7f:]{0,4095}"          # passwd fields: absolute, no control characters, no `:`
COMMENT_TEXT = r"[^\x00-\x1f\x7f:]{0,255}"


def is_template(value: str) -> bool:
    """Whether a string holds jinja2 syntax (checked against its grammar only once rendered)."""
    return "{{" in value or "{%" in value


def grammar(pattern: str, what: str, hint: str) -> Callable[[str], str]:
    """A validator for `AfterValidator`: the value must match `pattern` (or be a template, checked once rendered)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if is_template(value) or compiled.fullmatch(value):
            return value
        raise ValueError(f"invalid {what} {shown(value)}: {hint}")

    return check


def shown(value: str, limit: int = 80) -> str:
    """A value as quoted text for a message, bounded."""
    return repr(value) if len(value) <= limit else repr(value[: limit - 1] + "…")


def checked(env: TaskEnv, value: str, pattern: str, what: str, hint: str) -> str:
    """Render a field and check it against its grammar; a bad value is an error naming host and step."""
    text = str(env.render(value)) if is_template(value) else value
    if not re.fullmatch(pattern, text):
        raise RunbookError(f"{env.host}: step `{env.step.step_id}`: {what} {shown(value)} rendered to {shown(text)}, "
                           f"which is not a valid {what}", hint=hint)
    return text


def read_sections(env: TaskEnv, script: str, args: Sequence[str], *, what: str,
                  stdin: str | None = None) -> dict[str, str]:
    """Run a read script (`sh -c SCRIPT sh ARGS...`) with the step's sudo and env; return its sections."""
    res = run_argv(env, ["sh", "-c", SECTION_FUNCTION + script, "sh", *args], stdin=stdin,
                   timeout=env.step.timeout or READ_TIMEOUT)
    if res.truncated:
        raise RunbookError(f"{env.host}: cannot read the state of {what}: the output passed the connection's limit",
                           hint="name fewer packages (or groups) in one step")
    if res.rc != 0 or "--rb:end--" not in res.stdout:
        raise RunbookError(f"{env.host}: cannot read the state of {what}: " + first_line(res, "the read script failed"),
                           hint="check that the step's `sudo` is allowed on the host")
    return parse_sections(res.stdout)


def parse_sections(text: str) -> dict[str, str]:
    """Split a read script's output into {section: text} (each without its surrounding newlines)."""
    found: dict[str, str] = {}
    marks = list(_SECTION.finditer(text))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        found[mark.group(1)] = text[mark.end():end].strip("\n")
    return found


def run_argv(env: TaskEnv, argv: Sequence[str], *, stdin: str | None = None, timeout: float | None = None,
             sudo: bool | str | None = None) -> CommandResult:
    """Run an argv (no shell) with the step's env and sudo; `stdin` feeds it data that must stay off argv."""
    step_env = {k: str(env.render(v)) for k, v in env.step.env.items()} or None
    return env.conn.run(list(argv), env=step_env, timeout=timeout if timeout is not None else env.step.timeout,
                        sudo=env.sudo() if sudo is None else sudo, stdin=stdin)


def first_line(res: CommandResult, default: str) -> str:
    """The most telling line of a failed command's output (stderr first), bounded."""
    for stream in (res.stderr, res.stdout):
        lines = [line.strip() for line in stream.splitlines() if line.strip()]
        if lines:
            text = lines[-1] if len(lines) > 1 and lines[0].lower().startswith("warning") else lines[0]
            return (text[:300] + "…") if len(text) > 300 else text
    if res.timed_out:
        return "timed out"
    return f"{default} (rc={res.rc})"


def fingerprint(state: Any) -> str:
    """A short stable hash of the state a prediction rests on (the drift check compares it at apply time)."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def state_diff(before: Iterable[str], after: Iterable[str], label: str, after_label: str = "wanted") -> str:
    """A unified diff of two descriptions of a resource, one fact per line."""
    a = [line + "\n" for line in before]
    b = [line + "\n" for line in after]
    if a == b:
        return ""
    return "".join(difflib.unified_diff(a, b, fromfile=f"{label} (on host)", tofile=f"{label} ({after_label})", n=max(len(a), len(b))))


def failed(env: TaskEnv, what: str, doing: str, res: CommandResult | None, *, command: str | None = None,
           data: dict[str, Any] | None = None, detail: str | None = None) -> Outcome:
    """An outcome for a failed change: the host, the resource, what failed and the command's own reason."""
    reason = detail or (first_line(res, "failed") if res is not None else "failed")
    return Outcome(failed=True, rc=res.rc if res is not None else None, stdout=res.stdout if res is not None else "",
                   stderr=res.stderr if res is not None else "", command=command,
                   message=f"{env.host}: {what}: {doing} failed: {reason}", data=data or {})


# --- what earlier steps of a dry run are predicted to leave --------------------------------------------
#
# A plan reads every host as it is now, so a `user` step after a `group` step that creates its group
# would find no group, and a `cron` step for a user an earlier step creates would find no user. In a
# plan, each predicted change of a group or user is recorded per run and host, and later steps of
# that dry run read it as if it were done. A real run never consults this (it reads what is there).

_PLANNED: OrderedDict[tuple[str, str], dict[tuple[str, str], Any]] = OrderedDict()
_PLANNED_RUNS = 64          # a long-lived process (runbook serve) plans many runs: keep the last few
_PLANNED_LOCK = threading.Lock()
ABSENT = object()


def _plan_key(env: TaskEnv) -> tuple[str, str] | None:
    run = env.vars.get("run")
    if not isinstance(run, dict) or str(run.get("mode")) != "plan":
        return None
    return str(run.get("id")), env.host


def record_planned(env: TaskEnv, kind: str, name: str, value: Any) -> None:
    """In a dry run, remember what a predicted change leaves (`ABSENT` for a deletion) for later steps on this host."""
    key = _plan_key(env)
    if key is None:
        return
    with _PLANNED_LOCK:
        _PLANNED.setdefault(key, {})[(kind, name)] = value
        _PLANNED.move_to_end(key)
        while len(_PLANNED) > _PLANNED_RUNS:
            _PLANNED.popitem(last=False)


def planned(env: TaskEnv, kind: str, name: str) -> Any:
    """What an earlier step of this dry run is predicted to leave (`ABSENT`, a value), or None when nothing is planned."""
    key = _plan_key(env)
    if key is None:
        return None
    with _PLANNED_LOCK:
        return _PLANNED.get(key, {}).get((kind, name))
