"""`shell:` — a command line run through `sh -c` on the host."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, command_text


class Shell(Action):
    """A command line run through `sh -c`; it reports `changed` unless `changed_when` says otherwise."""

    name = "shell"
    spec_type: ClassVar[Any] = str
    guarded_runs_change = True

    def fields(self) -> Iterator[TemplatedField]:
        yield TemplatedField((), self.spec, FieldKind.SHELL)

    def command(self, env: TaskEnv) -> str | list[str]:
        """The rendered command."""
        return str(env.render(self.spec))

    def describe(self, env: TaskEnv) -> str | None:
        return command_text(self.command(env))

    def plan(self, env: TaskEnv) -> Prediction:
        cmd = self.describe(env)
        fixed = _constant(self.step.changed_when)
        if fixed is False:
            return Prediction(PredictionKind.OK, "changed_when: false — the step never changes anything", command=cmd)
        if fixed is True:
            # e.g. a service restart: it always changes something when it runs
            return Prediction(PredictionKind.CHANGE, "changed_when: true — the step always changes something", command=cmd)
        return Prediction(PredictionKind.UNKNOWN, "a command cannot be predicted without running it; add a guard "
                          "(creates, removes, unless, only_if) or mark it read_only", command=cmd)

    def apply(self, env: TaskEnv) -> Outcome:
        cmd = self.command(env)
        res = env.run(cmd)
        msg = f"timed out after {env.step.timeout:g}s" if res.timed_out else ("" if res.rc == 0 else f"exit code {res.rc}")
        return Outcome(changed=True, failed=res.rc != 0, rc=res.rc, stdout=res.stdout, stderr=res.stderr,
                       command=command_text(cmd), message=msg, data={"timed_out": res.timed_out} if res.timed_out else {})


def _constant(value: str | bool | None) -> bool | None:
    """`changed_when: true|false` (or the same as text); None when it is an expression or absent."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None
