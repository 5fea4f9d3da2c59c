"""`assert:` — jinja2 conditions over the host's variables and registers, with a message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator

from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.fields import StrList, Strict
from runbook.template import truth


class AssertSpec(Strict):
    """Jinja2 conditions that must all be true."""

    that: StrList
    msg: str | None = None
    success_msg: str | None = None


def _shorthand(v: Any) -> Any:
    """`assert: expr` or `assert: [expr, ...]` is short for `assert: {that: ...}`."""
    if isinstance(v, (str, list)):
        return {"that": v}
    return v


class Assert(Action):
    """Jinja2 conditions over the host's variables and registers; fails the task when one is false."""

    name = "assert"
    spec_type: ClassVar[Any] = Annotated[AssertSpec, BeforeValidator(_shorthand, json_schema_input_type=str | list[str] | AssertSpec)]
    rerun_on_apply = True

    def fields(self) -> Iterator[TemplatedField]:
        for i, cond in enumerate(self.spec.that):
            yield TemplatedField(("that", i), cond, FieldKind.EXPRESSION)
        yield from string_fields(self.spec, ("msg", "success_msg"))

    def describe(self, env: TaskEnv) -> str | None:
        return "assert " + " and ".join(f"({c})" for c in self.spec.that)

    def _check(self, env: TaskEnv) -> Outcome:
        failed = [cond for cond in self.spec.that if not truth(cond, env.vars)]
        checks = {cond: cond not in failed for cond in self.spec.that}
        if failed:
            msg = env.render(self.spec.msg) if self.spec.msg else f"assertion failed: {failed[0]}"
            return Outcome(failed=True, message=msg, command=self.describe(env), data={"checks": checks})
        msg = env.render(self.spec.success_msg) if self.spec.success_msg else "all assertions passed"
        return Outcome(message=msg, command=self.describe(env), data={"checks": checks})

    def plan(self, env: TaskEnv) -> Prediction:
        out = self._check(env)
        if out.failed:
            return Prediction(PredictionKind.FAIL, f"would fail: {out.message}", command=out.command, data=out.data)
        return Prediction(PredictionKind.OK, out.message, command=out.command, data=out.data)

    def apply(self, env: TaskEnv) -> Outcome:
        return self._check(env)
