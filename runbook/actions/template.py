"""`template:` — render a local jinja2 file with the host's variables and upload the result."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2

from runbook.actions.base import TaskEnv, local_source, task_source
from runbook.actions.upload import Upload, UploadSpec
from runbook.errors import Location, Problem, RunbookError
from runbook.template import environment, render

if TYPE_CHECKING:

    from runbook.model import Playbook


class TemplateSpec(UploadSpec):
    """Render a local jinja2 file and upload it when the result differs."""


class Template(Upload):
    """Render a local jinja2 file (sandboxed, strict undefined) and upload it when the result differs."""

    name = "template"
    spec_type: ClassVar[Any] = TemplateSpec

    def check(self, playbook: Playbook, locate: Callable[[tuple[str | int, ...]], Location]) -> list[Problem]:
        src = self.spec.src
        if "{" in src or playbook._source is None:
            return []
        loc = locate(("src",))
        path = local_source(playbook, self.step, src)
        if not path.is_file():
            return [Problem(f"template file `{src}` not found (looked at {path})", loc,
                            "paths are relative to the playbook's directory", code="missing-file")]
        try:
            environment().parse(path.read_text(encoding="utf-8"))
        except jinja2.TemplateSyntaxError as exc:
            return [Problem(f"template syntax error in {path} line {exc.lineno}: {exc.message}", loc, code="template-syntax")]
        except (OSError, UnicodeDecodeError) as exc:
            return [Problem(f"cannot read template file `{src}`: {exc}", loc)]
        return []

    def content(self, env: TaskEnv) -> bytes:
        src = task_source(env, self.step, self.spec.src)
        try:
            text = src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RunbookError(f"cannot read template {src}: {exc}", hint="paths are relative to the playbook's directory") from None
        return render(text, env.vars).encode("utf-8") if "{" in text else text.encode("utf-8")
