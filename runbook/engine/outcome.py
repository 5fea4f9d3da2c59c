"""What one attempt of a step concluded: its guards (read-only), and its outcome with `changed_when`/`failed_when`."""

from __future__ import annotations

from typing import Any

from runbook.actions import Outcome, TaskEnv
from runbook.model import Step
from runbook.results import Status, TaskResult
from runbook.template import truth


def check_guards(step: Step, env: TaskEnv) -> tuple[str | None, str, list[str]]:
    """Evaluate the guards (read-only by contract): (reason to skip or None, state fingerprint, passed reasons)."""
    state: list[str] = []
    passed: list[str] = []
    for name, value in step.guards.items():
        text = env.render(value)
        if name in ("creates", "removes"):
            st = env.conn.stat(text)
            state.append(f"{name}:{int(st.exists)}")
            if name == "creates" and st.exists:
                return f"creates: {text} exists", "|".join(state), passed
            if name == "removes" and not st.exists:
                return f"removes: {text} does not exist", "|".join(state), passed
            passed.append(f"{name}: {text} {'does not exist' if name == 'creates' else 'exists'}")
        else:
            r = env.run(text)   # the step's env, sudo and timeout, like the step itself
            state.append(f"{name}:{int(r.rc == 0)}")
            if name == "unless" and r.rc == 0:
                return f"unless: `{short(text)}` succeeded", "|".join(state), passed
            if name == "only_if" and r.rc != 0:
                return f"only_if: `{short(text)}` failed (rc={r.rc})", "|".join(state), passed
            passed.append(f"{name}: `{short(text)}` {'failed' if name == 'unless' else 'succeeded'}")
    return None, "|".join(state), passed


def apply_outcome(step: Step, res: TaskResult, out: Outcome, ctx: dict[str, Any]) -> None:
    """Copy an action's outcome into the result, with `changed_when`/`failed_when` and `read_only` applied."""
    res.rc, res.stdout, res.stderr = out.rc, out.stdout, out.stderr
    res.command = out.command or res.command
    res.message, res.diff = out.message, out.diff
    res.data.update(out.data)
    changed, failed = out.changed, out.failed
    if step.read_only:
        changed = False  # read-only by contract: it observes, never changes
    if step.changed_when is not None or step.failed_when is not None:
        reg = {"stdout": out.stdout, "stderr": out.stderr, "rc": out.rc, "changed": changed, "failed": failed,
               "stdout_lines": out.stdout.splitlines(), "data": out.data}
        local = {**ctx, "result": reg, **({step.register_as: reg} if step.register_as else {})}
        if step.changed_when is not None:
            changed = truth(step.changed_when, local)
        if step.failed_when is not None:
            failed = truth(step.failed_when, local)
            if not failed and out.failed:
                res.message = ""
    res.changed = changed and not failed
    res.status = Status.FAILED if failed else (Status.CHANGED if res.changed else Status.OK)


def short(text: str, limit: int = 60) -> str:
    """One line of at most `limit` characters, for reasons that quote a command."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
