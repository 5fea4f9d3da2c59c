"""`command:` — an argv list run without a shell, so no value can change the command's words."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import Field

from runbook.actions.base import FieldKind, TaskEnv, TemplatedField
from runbook.actions.shell import Shell
from runbook.shell_lint import shell_script_positions


class Command(Shell):
    """An argv list, run without a shell; same reporting as `shell`."""

    name = "command"
    spec_type: ClassVar[Any] = Annotated[list[str], Field(min_length=1)]

    def fields(self) -> Iterator[TemplatedField]:
        scripts = set(shell_script_positions(self.spec))
        for i, arg in enumerate(self.spec):
            yield TemplatedField((i,), arg, FieldKind.SHELL if i in scripts else FieldKind.TEMPLATE)

    def command(self, env: TaskEnv) -> list[str]:
        return [str(env.render(arg)) for arg in self.spec]

