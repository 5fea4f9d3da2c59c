"""The action contract: a class declares its playbook key, spec, templated fields and dry-run behaviour.

An action is one file under runbook/actions/ (or a plugin registered in the `runbook.actions`
entry-point group). The engine reads everything it needs from the class: which key it owns in a
step and what that key accepts (`spec`), which fields are templates and which reach a shell
(`fields`), how it predicts in a dry run (`plan`, read-only) and how it acts (`apply`), and a few
flags that tell the engine how to treat it. No module outside runbook/actions/ names an action.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from runbook.results import PredictionKind
from runbook.template import render, render_value

if TYPE_CHECKING:
    from pathlib import Path

    from runbook.connections import CommandResult, Connection
    from runbook.errors import Location, Problem
    from runbook.model import Playbook, Step


class FieldKind(str, Enum):
    """How a templated field is used: rendered text, text that reaches a shell, or a jinja2 expression."""

    TEMPLATE = "template"
    SHELL = "shell"
    EXPRESSION = "expression"


@dataclass(frozen=True)
class TemplatedField:
    """One templated string of a step: where it is (inside the step), its text, and how it is used."""

    path: tuple[str | int, ...]
    text: str
    kind: FieldKind


@dataclass
class TaskEnv:
    """Everything an action needs to act on one host: the step, the connection and the variables."""

    step: Step
    host: str
    conn: Connection
    vars: dict[str, Any]
    playbook: Playbook
    become_user: str | None = None
    assume_yes: bool = False
    interactive: bool = False
    ask: Callable[[str], bool] | None = None            # asks a yes/no question on the terminal
    on_approval: Callable[[bool, str], None] | None = None  # (granted, who) -> emits the event
    cancelled: Callable[[], bool] = lambda: False       # True once the run is being stopped

    def render(self, value: Any) -> Any:
        """Render a templated value with this task's variables."""
        return render_value(value, self.vars) if not isinstance(value, str) else render(value, self.vars)

    def sudo(self) -> bool | str:
        """The sudo target of the step: False, True (root or the host's become user) or a user name."""
        sudo = self.step.sudo
        if sudo is True and self.become_user:
            return self.become_user
        if isinstance(sudo, str) and "{" in sudo:
            sudo = str(self.render(sudo)).strip()   # e.g. `sudo: "{{ app_user }}"`; empty means no sudo
            return sudo or False
        return sudo

    def run(self, command: str | list[str], *, timeout: float | None = None, sudo: bool | str | None = None) -> CommandResult:
        """Run a command on the host with the step's environment, timeout and sudo."""
        env = {k: str(self.render(v)) for k, v in self.step.env.items()} or None
        return self.conn.run(command, env=env, timeout=timeout if timeout is not None else self.step.timeout,
                             sudo=self.sudo() if sudo is None else sudo)


@dataclass
class Outcome:
    """What `apply()` did."""

    changed: bool = False
    failed: bool = False
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    command: str | None = None
    message: str = ""
    diff: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """What `plan()` expects `apply()` would do, why, and the remote state that expectation rests on."""

    kind: PredictionKind
    reason: str
    diff: str | None = None
    state: str | None = None      # fingerprint of the remote state read (drift check at apply time)
    command: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = PredictionKind(self.kind)


class Action:
    """Base of every action: set the class attributes, implement `plan()` and `apply()`."""

    #: The step key this action owns (`shell:`, `upload:`, ...).
    name: ClassVar[str] = ""
    #: What the key accepts: a pydantic model, or any type pydantic validates (str, list[str], Annotated[...]).
    spec_type: ClassVar[Any] = None
    #: Checks (assert, wait_for) change nothing and are the point of a run: `apply` of a reviewed plan
    #: runs them again even where the plan predicted no change.
    rerun_on_apply: ClassVar[bool] = False
    #: A command-running action whose guards passed is predicted to change (it would run).
    guarded_runs_change: ClassVar[bool] = False
    #: It asks the operator on the terminal (the console must not redraw a live view over the prompt).
    asks_operator: ClassVar[bool] = False
    #: Its message is its output (print): the console shows it for an `ok` result too, not only when verbose.
    shows_message: ClassVar[bool] = False

    def __init__(self, step: Step):
        self.step = step
        self.spec = step.action_spec

    @classmethod
    def summary(cls) -> str:
        """One line for the JSON Schema and the docs: the first line of the class docstring."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

    def fields(self) -> Iterator[TemplatedField]:
        """The templated strings of this step's spec, with their paths below the action key."""
        return iter(())

    def probes_read_only(self) -> bool:
        """True when `plan()` may run commands because they are read-only by contract (e.g. a port probe)."""
        return False

    def local_sources(self) -> list[str]:
        """Control-machine files this step sends (untemplated paths): a plan records their checksums."""
        return []

    def source_templates(self) -> list[str]:
        """Control-machine file paths this step sends that hold a template (each task renders its own)."""
        return []

    def check(self, playbook: Playbook, locate: Callable[[tuple[str | int, ...]], Location]) -> list[Problem]:
        """Static problems `validate` can find beyond the schema (e.g. a missing template file)."""
        return []

    def describe(self, env: TaskEnv) -> str | None:
        """The rendered command (or a one-line description) for the console and the audit trail."""
        return None

    def plan(self, env: TaskEnv) -> Prediction:
        """Predict the outcome without changing anything (read-only calls only)."""
        return Prediction(PredictionKind.UNKNOWN, f"`{self.name}` cannot be predicted without running it")

    def apply(self, env: TaskEnv) -> Outcome:
        """Do the work."""
        raise NotImplementedError


def string_fields(spec: Any, names: tuple[str, ...], kind: FieldKind = FieldKind.TEMPLATE,
                  prefix: tuple[str | int, ...] = ()) -> Iterator[TemplatedField]:
    """TemplatedFields for the string attributes `names` of a spec model (None and non-strings are left out)."""
    for name in names:
        value = getattr(spec, name, None)
        if isinstance(value, str):
            yield TemplatedField((*prefix, name), value, kind)


def command_text(command: str | list[str]) -> str:
    """A command as one display string."""
    return command if isinstance(command, str) else shlex.join(command)


def local_source(playbook: Playbook, step: Step, path: str) -> Path:
    """A step's control-machine source file: its role's templates/ and files/ first, else beside the playbook."""
    from runbook.compose import resolve_source   # not at the top: compose imports the model, which imports actions

    return resolve_source(playbook, step, path)


def task_source(env: TaskEnv, step: Step, src: str) -> Path:
    """The source file of a task: `src` as written, or rendered and kept below the directory it names (confined_source)."""
    if "{" not in src:
        return local_source(env.playbook, step, src)
    from runbook.compose import confined_source

    return confined_source(env.playbook, step, src, str(env.render(src)))
