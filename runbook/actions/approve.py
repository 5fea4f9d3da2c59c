"""`approve:` — a yes/no gate on the terminal before the run goes on."""

from __future__ import annotations

import getpass

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator

from runbook.actions.base import Action, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.fields import Strict


class ApproveSpec(Strict):
    """A yes/no gate asked on the terminal before the run goes on."""

    prompt: str = "Continue?"


def _shorthand(v: Any) -> Any:
    """`approve: "question?"` is short for `approve: {prompt: ...}`."""
    if isinstance(v, str):
        return {"prompt": v}
    return v


class Approve(Action):
    """A yes/no gate asked on the terminal; `--yes` approves in advance; a non-interactive run without it fails."""

    name = "approve"
    spec_type: ClassVar[Any] = Annotated[ApproveSpec, BeforeValidator(_shorthand, json_schema_input_type=str | ApproveSpec)]
    asks_operator = True

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("prompt",))

    def describe(self, env: TaskEnv) -> str | None:
        return f"approve: {env.render(self.spec.prompt)}"

    def plan(self, env: TaskEnv) -> Prediction:
        return Prediction(PredictionKind.OK, f"gate: the real run stops here and asks \"{env.render(self.spec.prompt)}\"",
                          command=self.describe(env))

    def apply(self, env: TaskEnv) -> Outcome:
        prompt = f"[{env.host}] {env.render(self.spec.prompt)}"
        who = getpass.getuser()
        if env.assume_yes:
            granted, who = True, f"{who} (--yes)"
        elif env.interactive and env.ask is not None:
            granted = env.ask(prompt)
        else:
            return Outcome(failed=True, command=self.describe(env),
                           message="approval required but the run is not interactive: rerun on a terminal or pass --yes")
        if env.on_approval:
            env.on_approval(granted, who)
        if not granted:
            return Outcome(failed=True, message=f"not approved by {who}", command=self.describe(env))
        return Outcome(message=f"approved by {who}", command=self.describe(env))
