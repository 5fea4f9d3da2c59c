"""`command:` — an argv list run without a shell, so no value can change the command's words."""

from __future__ import annotations

from runbook.actions.base import TaskEnv
from runbook.actions.shell import Shell


class Command(Shell):
    """Run an argv list; same reporting as `shell`."""

    name = "command"

    def command(self, env: TaskEnv) -> list[str]:
        return [str(env.render(arg)) for arg in self.spec]
