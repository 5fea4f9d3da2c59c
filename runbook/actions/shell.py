"""`shell:` — a command line run through `sh -c` on the host."""

from __future__ import annotations

from runbook.actions.base import Action, Outcome, Prediction, TaskEnv, command_text


class Shell(Action):
    """Run a shell command line; it reports `changed` unless `changed_when` says otherwise."""

    name = "shell"

    def command(self, env: TaskEnv) -> str | list[str]:
        """The rendered command."""
        return env.render(self.spec)

    def describe(self, env: TaskEnv) -> str | None:
        return command_text(self.command(env))

    def plan(self, env: TaskEnv) -> Prediction:
        cmd = self.describe(env)
        if self.step.changed_when is False or (isinstance(self.step.changed_when, str)
                                               and self.step.changed_when.strip().lower() == "false"):
            return Prediction("ok", "changed_when: false — the step never changes anything", command=cmd)
        if self.step.changed_when is True or (isinstance(self.step.changed_when, str)
                                              and self.step.changed_when.strip().lower() == "true"):
            # e.g. a service restart: it always changes something when it runs
            return Prediction("change", "changed_when: true — the step always changes something", command=cmd)
        return Prediction("unknown", "a command cannot be predicted without running it; add a guard "
                          "(creates, removes, unless, only_if) or mark it read_only", command=cmd)

    def apply(self, env: TaskEnv) -> Outcome:
        cmd = self.command(env)
        res = env.run(cmd)
        msg = f"timed out after {env.step.timeout:g}s" if res.timed_out else ("" if res.rc == 0 else f"exit code {res.rc}")
        return Outcome(changed=True, failed=res.rc != 0, rc=res.rc, stdout=res.stdout, stderr=res.stderr,
                       command=command_text(cmd), message=msg, data={"timed_out": res.timed_out} if res.timed_out else {})
