"""The action contract: a read-only `plan()` that predicts, a mutating `apply()` that acts."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from collections.abc import Callable

from runbook.template import render, render_value

if TYPE_CHECKING:
    from runbook.connections import CommandResult, Connection
    from runbook.model import Playbook, Step

PredictionKind = Literal["change", "ok", "skip", "unknown", "fail"]


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


class Action:
    """Base of every action; subclasses set `name` and implement `plan()` and `apply()`."""

    name: ClassVar[str] = ""

    def __init__(self, step: Step):
        self.step = step
        self.spec = step.action_spec

    def describe(self, env: TaskEnv) -> str | None:
        """The rendered command (or a one-line description) for the console and the audit trail."""
        return None

    def plan(self, env: TaskEnv) -> Prediction:
        """Predict the outcome without changing anything (read-only calls only)."""
        return Prediction("unknown", f"`{self.name}` cannot be predicted without running it")

    def apply(self, env: TaskEnv) -> Outcome:
        """Do the work."""
        raise NotImplementedError


def command_text(command: str | list[str]) -> str:
    """A command as one display string."""
    return command if isinstance(command, str) else shlex.join(command)
