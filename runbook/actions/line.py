"""`line:` — make one line present in (or absent from) a text file, as Ansible's lineinfile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from runbook.actions._edit import (Edit, EditSpec, TextEdit, _static_regex, bare, compile_regex, find_last, insert,
                                   insert_at, split_lines)
from runbook.actions._resource import shown
from runbook.actions.base import TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError


class LineSpec(EditSpec):
    """Make one line present in (or absent from) a text file."""

    line: str | None = Field(None, description="The line (state: present; templated). With `backrefs`, "
                                               "it may use the regexp's groups (\\1, \\g<name>).")
    regexp: str | None = Field(None, description="Python regex searched in each line: present replaces the last "
                                                 "matching line, absent removes every matching line.")
    firstmatch: bool = Field(False, description="Use the first line `regexp`/`insertafter`/`insertbefore` match, "
                                                "not the last.")
    backrefs: bool = Field(False, description="Expand `regexp`'s groups into `line`; when nothing matches, "
                                              "leave the file as it is.")

    @field_validator("regexp")
    @classmethod
    def _regexp(cls, value: str | None) -> str | None:
        return _static_regex(value, "regexp")

    @model_validator(mode="after")
    def _needs(self) -> LineSpec:
        if self.state == "present" and self.line is None:
            raise ValueError("state: present needs `line`")
        if self.state == "absent" and self.line is None and self.regexp is None:
            raise ValueError("state: absent needs `regexp` or `line`")
        if self.backrefs and self.regexp is None:
            raise ValueError("`backrefs` needs `regexp`")
        if self.line is not None and "\n" in self.line.rstrip("\n"):
            raise ValueError("`line` is one line; manage several lines with `block`")
        return self


class Line(TextEdit):
    """Make one line present in (or absent from) a text file, as Ansible's lineinfile."""

    name = "line"
    spec_type: ClassVar[Any] = LineSpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from self.edit_fields()
        yield from string_fields(self.spec, ("line", "regexp"))

    def describe(self, env: TaskEnv) -> str | None:
        spec = self.spec
        what = shown(env, spec.line) if spec.line is not None else f"/{shown(env, spec.regexp)}/"
        return f"line {spec.state} in {shown(env, spec.path)}: {what}"

    def edit(self, env: TaskEnv, text: str) -> Edit:
        spec = self.spec
        lines = split_lines(text)
        regexp = compile_regex(str(env.render(spec.regexp)), "regexp", env.host) if spec.regexp is not None else None
        line = None if spec.line is None else str(env.render(spec.line)).rstrip("\n")
        if line is not None and ("\n" in line or "\r" in line):
            raise RunbookError(f"{env.host}: `line` rendered to several lines: {line!r}",
                               hint="line manages one line; use block for several")
        if spec.state == "absent":
            return self._absent(lines, text, regexp, line)
        assert line is not None
        found = find_last(lines, regexp if regexp is not None else line, spec.firstmatch)
        if found is None and regexp is not None:
            if spec.backrefs:
                return Edit(text, f"`{spec.regexp}` matches no line (backrefs: nothing to change)")
            exact = find_last(lines, line)
            if exact is not None:
                return Edit(text, f"the line is already there (line {exact[0] + 1}; `{spec.regexp}` matches none)")
        if found is not None:
            index, match = found
            new = match.expand(line) if spec.backrefs and match is not None else line
            if bare(lines[index]) == new:
                return Edit(text, f"the line is already there (line {index + 1})")
            ending = lines[index][len(bare(lines[index])):]
            lines[index] = new + (ending or "")
            return Edit("".join(lines), f"replace line {index + 1}")
        index = insert_at(lines, env, spec.insertafter, spec.insertbefore, spec.firstmatch)
        where = "append the line" if index == len(lines) else f"insert the line at line {index + 1}"
        return Edit("".join(insert(lines, index, [line + "\n"])), where)

    @staticmethod
    def _absent(lines: list[str], text: str, regexp: Any, line: str | None) -> Edit:
        keep = [ln for ln in lines if not (regexp.search(bare(ln)) if regexp is not None else bare(ln) == line)]
        removed = len(lines) - len(keep)
        if not removed:
            return Edit(text, "no line to remove")
        return Edit("".join(keep), f"remove {removed} line{'s' if removed > 1 else ''}")
