"""`template:` — render a local jinja2 file with the host's variables and upload the result."""

from __future__ import annotations

from runbook.actions.base import TaskEnv
from runbook.actions.upload import Upload
from runbook.errors import RunbookError
from runbook.template import render, resolve_local


class Template(Upload):
    """Like `upload`, with the file rendered first (sandboxed, strict undefined)."""

    name = "template"

    def content(self, env: TaskEnv) -> bytes:
        src = resolve_local(env.playbook, env.render(self.spec.src))
        try:
            text = src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RunbookError(f"cannot read template {src}: {exc}", hint="paths are relative to the playbook's directory") from None
        return render(text, env.vars).encode("utf-8") if "{" in text else text.encode("utf-8")
