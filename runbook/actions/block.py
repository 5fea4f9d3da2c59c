"""`block:` — keep a block of lines between two marker lines in a text file, as Ansible's blockinfile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field, model_validator

from runbook.actions._edit import Edit, EditSpec, TextEdit, bare, insert, insert_at, split_lines
from runbook.actions._resource import shown
from runbook.actions.base import TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError

DEFAULT_MARKER = "# {mark} MANAGED BY RUNBOOK"


class BlockSpec(EditSpec):
    """Keep a block of lines between two marker lines in a text file."""

    block: str = Field("", description="The lines (templated); an empty block with state: present removes it.")
    marker: str = Field(DEFAULT_MARKER, description="The marker line; {mark} becomes `marker_begin` or `marker_end`. "
                                                    "Give each block in a file its own marker.")
    marker_begin: str = "BEGIN"
    marker_end: str = "END"

    @model_validator(mode="after")
    def _markers(self) -> BlockSpec:
        if "\n" in self.marker or "\r" in self.marker:
            raise ValueError("`marker` is one line")
        if "{mark}" not in self.marker:
            raise ValueError("`marker` needs {mark}, or the begin and end lines would be the same")
        if self.marker_begin == self.marker_end:
            raise ValueError("`marker_begin` and `marker_end` must differ")
        return self


class Block(TextEdit):
    """Keep a block of lines between two marker lines in a text file, as Ansible's blockinfile."""

    name = "block"
    spec_type: ClassVar[Any] = BlockSpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from self.edit_fields()
        yield from string_fields(self.spec, ("block", "marker", "marker_begin", "marker_end"))

    def describe(self, env: TaskEnv) -> str | None:
        return f"block {self.spec.state} in {shown(env, self.spec.path)}"

    def _markers(self, env: TaskEnv) -> tuple[str, str]:
        spec = self.spec
        marker = str(env.render(spec.marker))
        begin = marker.replace("{mark}", str(env.render(spec.marker_begin)))
        end = marker.replace("{mark}", str(env.render(spec.marker_end)))
        if begin == end or any(c in begin + end for c in "\r\n"):
            raise RunbookError(f"{env.host}: the block's markers rendered to {begin!r} and {end!r}",
                               hint="they must be two different single lines")
        return begin, end

    def edit(self, env: TaskEnv, text: str) -> Edit:
        spec = self.spec
        begin, end = self._markers(env)
        lines = split_lines(text)
        starts = [i for i, line in enumerate(lines) if bare(line) == begin]
        ends = [i for i, line in enumerate(lines) if bare(line) == end]
        if len(starts) > 1 or len(ends) > 1 or len(starts) != len(ends) or (starts and starts[0] > ends[0]):
            raise RunbookError(f"{env.host}: the markers `{begin}` / `{end}` are not one pair "
                               f"(begin at lines {[i + 1 for i in starts]}, end at lines {[i + 1 for i in ends]})",
                               hint="repair the file by hand, or give this block its own `marker`")
        body = str(env.render(spec.block))
        content = [line + "\n" for line in body.removesuffix("\n").split("\n")] if body else []
        if any(bare(line) in (begin, end) for line in content):
            raise RunbookError(f"{env.host}: the block holds its own marker line `{begin}` or `{end}`",
                               hint="give the block another `marker`")
        if spec.state == "absent" or not content:
            if not starts:
                return Edit(text, "no block to remove")
            return Edit("".join(lines[:starts[0]] + lines[ends[0] + 1:]), f"remove the block (lines {starts[0] + 1}-{ends[0] + 1})")
        new = [begin + "\n", *content, end + "\n"]
        if starts:
            a, b = starts[0], ends[0]
            current = [bare(line) for line in lines[a:b + 1]]
            if current == [bare(line) for line in new]:
                return Edit(text, f"the block is as wanted (lines {a + 1}-{b + 1})")
            tail = lines[b + 1:]
            if not lines[b].endswith("\n") and not tail:
                new[-1] = new[-1].removesuffix("\n")    # the file ended without a newline: keep it so
            return Edit("".join(lines[:a] + new + tail), f"replace the block (lines {a + 1}-{b + 1})")
        index = insert_at(lines, env, spec.insertafter, spec.insertbefore)
        where = "append the block" if index == len(lines) else f"insert the block at line {index + 1}"
        return Edit("".join(insert(lines, index, new)), where + f" ({len(content)} line{'s' if len(content) != 1 else ''})")
