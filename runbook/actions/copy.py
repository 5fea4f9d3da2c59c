"""`copy:` — put a file on the host from inline content or a control-machine file, replacing it atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from runbook.actions._resource import (Change, ContentOptions, ResourceAction, Wanted, account, blocked_file, host_path,
                                       mode_text, plan_write, read_state, shown, unreadable_reason)
from runbook.actions.base import FieldKind, TaskEnv, TemplatedField, local_source, string_fields, task_source
from runbook.actions.upload import DIFF_LIMIT
from runbook.errors import Location, Problem, RunbookError

if TYPE_CHECKING:
    from runbook.model import Playbook


class CopySpec(ContentOptions):
    """Put a file on the host from `content` or a control-machine `src`, replacing it atomically."""

    dest: str = Field(description="Path on the host (absolute, or ~/...).")
    content: str | None = Field(None, description="The file's content (templated).")
    src: str | None = Field(None, description="Control-machine file, relative to the playbook's directory.")
    force: bool = Field(True, description="false: only create the file when it is missing, never replace it.")
    follow: bool = Field(False, description="When `dest` is a symlink, write the file it points to "
                                            "(default: replace the symlink with the file).")

    @model_validator(mode="after")
    def _one_source(self) -> CopySpec:
        if (self.content is None) == (self.src is None):
            raise ValueError("copy needs exactly one of `content` or `src`")
        return self


class Copy(ResourceAction):
    """Put a file on the host from inline content or a control-machine file, replacing it atomically."""

    name = "copy"
    spec_type: ClassVar[Any] = CopySpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("dest", "content", "src", "owner", "group"))
        if self.spec.validate_ is not None:
            yield TemplatedField(("validate",), self.spec.validate_, FieldKind.SHELL)

    def local_sources(self) -> list[str]:
        return [self.spec.src] if self.spec.src and "{" not in self.spec.src else []

    def source_templates(self) -> list[str]:
        return [self.spec.src] if self.spec.src and "{" in self.spec.src else []

    def check(self, playbook: Playbook, locate: Callable[[tuple[str | int, ...]], Location]) -> list[Problem]:
        src = self.spec.src
        if not src or "{" in src or playbook._source is None:
            return []
        path = local_source(playbook, self.step, src)
        if not path.is_file():
            return [Problem(f"copy source `{src}` is not a file (looked at {path})", locate(("src",)),
                            "paths are relative to the playbook's directory", code="missing-file")]
        return []

    def describe(self, env: TaskEnv) -> str | None:
        return f"copy {shown(env, self.spec.src) if self.spec.src else 'content'} -> {shown(env, self.spec.dest)}"

    def _content(self, env: TaskEnv) -> bytes:
        """The bytes the file should hold."""
        if self.spec.content is not None:
            return str(env.render(self.spec.content)).encode("utf-8", errors="surrogateescape")
        src = task_source(env, self.step, self.spec.src)
        try:
            return Path(src).read_bytes()
        except IsADirectoryError:
            raise RunbookError(f"copy source {src} is a directory", hint="copy sends one file") from None
        except OSError as exc:
            raise RunbookError(f"cannot read {src}: {exc.strerror}",
                               hint="paths are relative to the playbook's directory") from None

    def compute(self, env: TaskEnv) -> Change:
        spec = self.spec
        dest = host_path(env, spec.dest, "dest")
        owner, group, mode = account(env, spec.owner, "owner"), account(env, spec.group, "group"), mode_text(spec.mode)
        want = Wanted(self._content(env), mode, owner, group, spec.backup,
                      None if spec.validate_ is None else str(env.render(spec.validate_)), follow=spec.follow)
        state = read_state(env, dest, content=True, follow=spec.follow, owner=owner, group=group)
        change = Change(state, ok_reason=f"{state.path}: content{' and attributes' if mode or owner or group else ''} match")
        change.fail = unreadable_reason(env, state) or blocked_file(env, state, spec.follow)
        if change.fail:
            return change
        if state.kind == "file" and not spec.force:
            change.ok_reason = f"{state.path} exists and force: false leaves it as it is"
            return change
        plan_write(env, change, want, DIFF_LIMIT)
        return change
