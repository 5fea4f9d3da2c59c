"""`command:` — an argv list run without a shell, so no value can change the command's words."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import Field

from runbook.actions.base import FieldKind, TaskEnv, TemplatedField
from runbook.actions.shell import Shell


class Command(Shell):
    """An argv list, run without a shell; same reporting as `shell`."""

    name = "command"
    spec_type: ClassVar[Any] = Annotated[list[str], Field(min_length=1)]

    def fields(self) -> Iterator[TemplatedField]:
        script = shell_script_index(self.spec)
        for i, arg in enumerate(self.spec):
            yield TemplatedField((i,), arg, FieldKind.SHELL if i == script else FieldKind.TEMPLATE)

    def command(self, env: TaskEnv) -> list[str]:
        return [str(env.render(arg)) for arg in self.spec]


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})


def shell_script_index(argv: list[str]) -> int | None:
    """The position of the script in `[sh, -c, SCRIPT, ...]` (also after `env`/`sudo` and with flags like -ec)."""
    i = 0
    while i < len(argv) and argv[i].rsplit("/", 1)[-1] in ("env", "sudo", "nice", "nohup", "timeout"):
        i += 1
        while i < len(argv) and (argv[i].startswith("-") or "=" in argv[i] or argv[i].isdigit()):
            i += 1
    if i >= len(argv) or argv[i].rsplit("/", 1)[-1] not in _SHELLS:
        return None
    for j in range(i + 1, len(argv)):
        word = argv[j]
        if not word.startswith("-"):
            return None
        if not word.startswith("--") and "c" in word[1:]:
            return j + 1 if j + 1 < len(argv) else None
    return None
