"""`approve:` — a yes/no gate on the terminal before the run goes on."""

from __future__ import annotations

import getpass

from runbook.actions.base import Action, Outcome, Prediction, TaskEnv


class Approve(Action):
    """Ask the operator; `--yes` approves in advance; a non-interactive run without it fails the step."""

    name = "approve"

    def describe(self, env: TaskEnv) -> str | None:
        return f"approve: {env.render(self.spec.prompt)}"

    def plan(self, env: TaskEnv) -> Prediction:
        return Prediction("ok", f"gate: the real run stops here and asks \"{env.render(self.spec.prompt)}\"",
                          command=self.describe(env), data={"gate": True})

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
