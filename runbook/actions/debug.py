"""`debug:` — print a message or a variable's value; touches no host, and shows the same in a dry run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator

from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.fields import Strict
from runbook.template import evaluate


class DebugSpec(Strict):
    """A message (templated) or an expression whose value is shown."""

    msg: str | None = Field(None, description="Text to show, e.g. 'usage is {{ usage.stdout }}%'.")
    var: str | None = Field(None, description="An expression whose value is shown as JSON, e.g. usage.stdout_lines.")

    @model_validator(mode="after")
    def _one(self) -> DebugSpec:
        if (self.msg is None) == (self.var is None):
            raise ValueError("debug needs exactly one of `msg` or `var`")
        return self


def _shorthand(v: Any) -> Any:
    """`debug: "text"` is short for `debug: {msg: "text"}`."""
    return {"msg": v} if isinstance(v, str) else v


class Debug(Action):
    """Show a message or a value in the console, the audit trail and `--output json` (as Ansible's debug)."""

    name = "debug"
    spec_type: ClassVar[Any] = Annotated[DebugSpec, BeforeValidator(_shorthand, json_schema_input_type=str | DebugSpec)]

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("msg",))
        yield from string_fields(self.spec, ("var",), FieldKind.EXPRESSION)

    def _text(self, env: TaskEnv) -> str:
        if self.spec.msg is not None:
            return str(env.render(self.spec.msg))
        value = evaluate(self.spec.var, env.vars)
        return f"{self.spec.var} = {json.dumps(value, default=str, sort_keys=True)}"

    def describe(self, env: TaskEnv) -> str | None:
        return "debug"

    def plan(self, env: TaskEnv) -> Prediction:
        text = self._text(env)
        return Prediction(PredictionKind.OK, text, command="debug", data={"debug": text})

    def apply(self, env: TaskEnv) -> Outcome:
        text = self._text(env)
        return Outcome(message=text, stdout=text + "\n", command="debug", data={"debug": text})
