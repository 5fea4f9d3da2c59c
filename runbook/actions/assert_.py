"""`assert:` — jinja2 conditions over the host's variables and registers, with a message."""

from __future__ import annotations

from runbook.actions.base import Action, Outcome, Prediction, TaskEnv
from runbook.template import truth


class Assert(Action):
    """Fail the task when a condition is false; never changes anything."""

    name = "assert"

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
            return Prediction("fail", f"would fail: {out.message}", command=out.command, data=out.data)
        return Prediction("ok", out.message, command=out.command, data=out.data)

    def apply(self, env: TaskEnv) -> Outcome:
        return self._check(env)
