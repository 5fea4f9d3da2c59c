"""Editing a text file on the host in place, line by line (line, block, sysctl's persist file).

The file is read with the state (one command when it is small), edited here in Python, and
written back whole through `_resource.plan_write`: atomically, validated, with a backup when asked
and only when the edit changed something. Lines keep their own endings; bytes that are not UTF-8
survive the round trip (surrogateescape).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from runbook.actions._resource import (EDIT_LIMIT, Change, ContentOptions, ResourceAction, Wanted, account, blocked_file,
                                       full_content, host_path, mode_text, plan_write, read_state, unreadable_reason)
from runbook.actions.base import FieldKind, TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError


def compile_regex(pattern: str, key: str, host: str | None = None) -> re.Pattern[str]:
    """A Python regular expression, or a clear error naming the key."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        where = f"{host}: " if host else ""
        raise RunbookError(f"{where}`{key}` {pattern!r} is not a valid regular expression: {exc}",
                           hint="Python `re` syntax; it is searched in each line (use ^ and $ to anchor)") from None


def _static_regex(value: str | None, key: str) -> str | None:
    """Check a regular expression at load time unless it is a template (checked when rendered)."""
    if value is not None and value not in ("EOF", "BOF") and "{{" not in value and "{%" not in value:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"`{key}` is not a valid regular expression: {exc}") from None
    return value


class EditSpec(ContentOptions):
    """Keys shared by the actions that edit part of a text file."""

    path: str = Field(description="The file on the host (absolute, or ~/...); symlinks are followed.")
    state: Literal["present", "absent"] = "present"
    insertafter: str | None = Field(None, description="Where a new entry goes: after the last line matching "
                                                      "this regex, or EOF (the default).")
    insertbefore: str | None = Field(None, description="Where a new entry goes: before the last line matching "
                                                       "this regex, or BOF.")
    create: bool = Field(False, description="Create the file (and its directories) when it is missing.")

    @field_validator("insertafter", "insertbefore")
    @classmethod
    def _regex(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _static_regex(value, info.field_name or "insertafter")

    @model_validator(mode="after")
    def _one_position(self) -> EditSpec:
        if self.insertafter is not None and self.insertbefore is not None:
            raise ValueError("give at most one of `insertafter` and `insertbefore`")
        return self


@dataclass
class Edit:
    """The result of an edit: the new text, why it differs (or why it does not)."""

    text: str
    reason: str


def split_lines(text: str) -> list[str]:
    """Lines with their endings; only \\n separates lines (a \\r stays part of its line's ending)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def bare(line: str) -> str:
    """A line without its ending."""
    return line.rstrip("\r\n")


def find_last(lines: list[str], test: re.Pattern[str] | str, first: bool = False) -> tuple[int, re.Match[str] | None] | None:
    """The index (and match) of the last line (or the first) a regex finds in, or that equals a string."""
    found: tuple[int, re.Match[str] | None] | None = None
    for i, line in enumerate(lines):
        if isinstance(test, str):
            hit = bare(line) == test
            m = None
        else:
            m = test.search(bare(line))
            hit = m is not None
        if hit:
            found = (i, m)
            if first:
                break
    return found


def insert_at(lines: list[str], env: TaskEnv, after: str | None, before: str | None, first: bool = False) -> int:
    """Where a new entry goes: after/before the last (or first) line matching, BOF, or EOF (also when none matches)."""
    if before == "BOF" or after == "BOF":
        return 0
    for key, text, offset in (("insertafter", after, 1), ("insertbefore", before, 0)):
        if text is not None and text != "EOF":
            found = find_last(lines, compile_regex(str(env.render(text)), key, env.host), first)
            if found is not None:
                return found[0] + offset
    return len(lines)


def insert(lines: list[str], index: int, new: list[str]) -> list[str]:
    """Insert whole lines at `index`, ending the line before them first when it has no newline."""
    out = list(lines)
    if index > 0 and not out[index - 1].endswith("\n"):
        out[index - 1] += "\n"
    out[index:index] = new
    return out


@dataclass
class Target:
    """The file an edit works on and how it is written (from the spec, or made up by the action)."""

    path: str
    state: str = "present"
    create: bool = False
    mode: str | None = None
    owner: str | None = None
    group: str | None = None
    backup: bool = False
    validate: str | None = None
    extra: str | None = None         # another file read in the same command (sysctl: the live value)


class TextEdit(ResourceAction):
    """An action that edits part of a text file: read it with the state, `edit` it, write it back if it changed."""

    def edit(self, env: TaskEnv, text: str) -> Edit:
        """The file's new text (equal to `text` when nothing needs to change) and why."""
        raise NotImplementedError

    def target(self, env: TaskEnv) -> Target:
        """The file to edit, rendered and checked, and how to write it."""
        spec = self.spec
        return Target(host_path(env, spec.path, "path"), spec.state, spec.create, mode_text(spec.mode),
                      account(env, spec.owner, "owner"), account(env, spec.group, "group"), spec.backup,
                      None if spec.validate_ is None else str(env.render(spec.validate_)))

    def edit_fields(self) -> Iterator[TemplatedField]:
        """The shared templated keys (the subclass adds its own)."""
        yield from string_fields(self.spec, ("path", "insertafter", "insertbefore", "owner", "group"))
        if self.spec.validate_ is not None:
            yield TemplatedField(("validate",), self.spec.validate_, FieldKind.SHELL)

    def compute(self, env: TaskEnv) -> Change:
        return self.compute_edit(env, self.target(env))

    def compute_edit(self, env: TaskEnv, t: Target) -> Change:
        """Read the file (one command when small), edit it, and plan the write of what changed."""
        state = read_state(env, t.path, content=True, follow=True, owner=t.owner, group=t.group, extra=t.extra)
        change = Change(state)
        change.fail = unreadable_reason(env, state) or blocked_file(env, state, True)
        if change.fail:
            return change
        if not state.exists:
            if t.state == "absent":
                change.ok_reason = f"{state.path} does not exist: nothing to remove"
                return change
            if not t.create:
                change.fail = f"{state.path} does not exist (create: true creates it)"
                return change
        old = full_content(env, state, EDIT_LIMIT).decode("utf-8", "surrogateescape") if state.exists else ""
        result = self.edit(env, old)
        change.ok_reason = result.reason
        plan_write(env, change, Wanted(result.text.encode("utf-8", "surrogateescape"), t.mode, t.owner, t.group,
                                       t.backup, t.validate, follow=True, parents=t.create), EDIT_LIMIT)
        if change.ops and result.text != old and state.exists:
            change.reasons[0] = f"{state.path}: {result.reason}" + change.reasons[0].partition(": content differs")[2]
        elif change.ops and not state.exists:
            change.reasons[0] += f": {result.reason}"
        return change
