"""`sysctl:` — set a kernel parameter now (/proc/sys) and keep it in a sysctl.d file for the next boot."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from runbook.actions._edit import Edit, Target, TextEdit, bare, split_lines
from runbook.actions._resource import ApplyError, Change, host_path, read_state, run_op, sh, shown, who
from runbook.actions.base import TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError
from runbook.fields import Strict

DEFAULT_FILE = "/etc/sysctl.d/99-runbook.conf"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+/-]*$")
# Set the live value and print what the kernel kept (it may round or refuse silently).
_SET_LIVE = 'printf "%s\\n" "$2" > "$1" && cat -- "$1"'


def _value(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a sysctl value is a number or a string, not a boolean: write 1 or 0")
    return str(value) if isinstance(value, (int, float)) else value


def normal(value: str) -> str:
    """A value as the kernel compares it: whitespace-separated words (`32768\\t60999` = `32768 60999`)."""
    return " ".join(value.split())


def proc_path(name: str, host: str) -> str:
    """/proc/sys/... of a key: dots are path separators and a slash stands for a dot (`eth0/100` -> `eth0.100`)."""
    if not _NAME.fullmatch(name):
        raise RunbookError(f"{host}: {name!r} is not a sysctl name", hint="e.g. net.ipv4.ip_forward")
    rel = name.translate(str.maketrans("./", "/."))
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise RunbookError(f"{host}: {name!r} is not a sysctl name (empty or dot-only parts)",
                           hint="e.g. net.ipv4.ip_forward")
    return "/proc/sys/" + rel


class SysctlSpec(Strict):
    """Set a kernel parameter now and keep it in a sysctl.d file for the next boot."""

    name: str = Field(description="The key, e.g. net.ipv4.ip_forward.")
    value: Annotated[str | None, BeforeValidator(_value)] = Field(None, description="The value (state: present).")
    state: Literal["present", "absent"] = Field("present", description="absent: remove the key from the persist "
                                                                       "file (the running value is left alone).")
    persist: bool | str = Field(True, description=f"The file that keeps it (true: {DEFAULT_FILE}; false: none). "
                                                  "The kernel reads only /etc/sysctl.d and like directories at boot.")
    reload: bool = Field(True, description="Set the running kernel value now (false: only the persist file).")
    backup: bool = Field(False, description="Keep a timestamped copy of the persist file before changing it.")

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError("a sysctl value is one line")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SysctlSpec:
        if self.state == "present" and self.value is None:
            raise ValueError("state: present needs `value`")
        if self.persist is False and (self.state == "absent" or not self.reload):
            raise ValueError("with persist: false there is nothing to do unless reload: true and state: present")
        return self


class Sysctl(TextEdit):
    """Set a kernel parameter now (/proc/sys) and keep it in a sysctl.d file for the next boot."""

    name = "sysctl"
    spec_type: ClassVar[Any] = SysctlSpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("name", "value", "persist"))

    def describe(self, env: TaskEnv) -> str | None:
        spec = self.spec
        name = shown(env, spec.name)
        return f"sysctl {name} = {shown(env, spec.value)}" if spec.state == "present" else f"sysctl {name} absent"

    def _key(self, env: TaskEnv) -> tuple[str, str | None, str]:
        name = str(env.render(self.spec.name)).strip()
        value = None if self.spec.value is None else normal(str(env.render(self.spec.value)))
        if value is not None and ("\n" in value or not value):
            raise RunbookError(f"{env.host}: sysctl {name}: the value rendered to {value!r}", hint="one line, not empty")
        return name, value, proc_path(name, env.host)

    def target(self, env: TaskEnv) -> Target:
        persist = self.spec.persist
        path = DEFAULT_FILE if persist is True else host_path(env, str(persist), "persist")
        _, _, proc = self._key(env)
        return Target(path, self.spec.state, create=True, backup=self.spec.backup,
                      extra=proc if self._live_wanted() else None)

    def _live_wanted(self) -> bool:
        return self.spec.reload and self.spec.state == "present"

    def compute(self, env: TaskEnv) -> Change:
        name, value, proc = self._key(env)
        if self.spec.persist is not False:
            change = self.compute_edit(env, self.target(env))
        else:
            change = Change(read_state(env, proc, content=False, follow=True, extra=proc))
        change.data["sysctl"] = name
        if change.fail or not self._live_wanted() or value is None:
            return change
        self._live(env, change, name, value, proc)
        return change

    def _live(self, env: TaskEnv, change: Change, name: str, value: str, proc: str) -> None:
        """Compare the running value and, when it differs, set it first (before the file keeps it)."""
        state = change.state
        if state.extra is None:
            change.fail = f"the kernel has no sysctl {name} ({proc} is missing or not readable by {who(env)})"
            return
        live = normal(state.extra.decode("utf-8", "replace"))
        change.data["live"] = live
        if live == value:
            change.ok_reason = f"{name} is {value}" + (f"; {change.ok_reason}" if self.spec.persist is not False else "")
            return
        if not state.extra_writable:
            change.fail = (f"{name} is {live}, and {proc} is not writable by {who(env)}"
                           + ("" if state.uid == 0 else ": use sudo: true"))
            return
        change.before["live"], change.after["live"] = live, value

        def set_live() -> dict[str, Any]:
            kept = normal(run_op(env, sh(_SET_LIVE, proc, value), f"set sysctl {name} via", proc))
            if kept != value:
                raise ApplyError(f"{env.host}: sysctl {name}: the kernel kept {kept!r}, not {value!r}")
            return {}

        change.reasons.insert(0, f"{name}: {live} -> {value} (running kernel)")
        change.ops.insert(0, set_live)
        change.diff = f"--- {name} (running)\n+++ {name} (after)\n-{live}\n+{value}\n" + (change.diff or "")

    def edit(self, env: TaskEnv, text: str) -> Edit:
        name, value, _ = self._key(env)
        key = "".join("[./]" if c in "./" else re.escape(c) for c in name)
        entry = re.compile(rf"^\s*-?\s*{key}\s*=\s*(.*?)\s*$")
        lines = split_lines(text)
        hits = [i for i, line in enumerate(lines) if entry.match(bare(line))]
        if self.spec.state == "absent":
            if not hits:
                return Edit(text, f"{name} is not in the file")
            return Edit("".join(line for i, line in enumerate(lines) if i not in hits), f"remove {name}")
        want = f"{name} = {value}"
        if len(hits) == 1 and normal(entry.match(bare(lines[hits[0]])).group(1)) == value:  # type: ignore[union-attr]
            return Edit(text, f"the file sets {name} = {value}")
        if hits:
            # The first entry becomes the wanted one; later ones (which would win at boot) go.
            out = [want + "\n" if i == hits[0] else line for i, line in enumerate(lines) if i == hits[0] or i not in hits]
            return Edit("".join(out), f"set {name} = {value} (line {hits[0] + 1})")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        return Edit("".join(lines) + want + "\n", f"add {name} = {value}")
