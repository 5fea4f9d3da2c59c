"""Which of a run's secrets a step reads, so that a task carries only those to its worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, meta

from runbook.actions import action_for
from runbook.model import Playbook, Step
from runbook.template import environment

# What the connection needs, not a template: it travels with a host's connect, never with its tasks.
SUDO_SECRET = "sudo_password"


def _names(text: str) -> set[str]:
    env = environment()
    found: set[str] = set()
    for source in (text, "{{ " + text + " }}"):   # a template, or a bare expression (when:, until:)
        try:
            found |= meta.find_undeclared_variables(env.parse(source))
        except TemplateSyntaxError:
            continue
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    if hasattr(value, "model_dump"):
        return _strings(value.model_dump(mode="python"))
    return []


class SecretNeeds:
    """The secret names each step's templates read, directly or through playbook `vars:` (computed once per step)."""

    def __init__(self, playbook: Playbook, secrets: Mapping[str, str]):
        self.playbook = playbook
        self.secrets = secrets
        self._by_step: dict[str, frozenset[str]] = {}
        self._var_names = {k: _names_of(v) for k, v in playbook.vars.items()}

    def of(self, step: Step) -> dict[str, str]:
        """The secrets (name -> value) a task of `step` needs; every one when a template reads `secrets` itself."""
        names = self._by_step.get(step.step_id)
        if names is None:
            names = self._by_step[step.step_id] = self._compute(step)
        return {n: self.secrets[n] for n in names}

    def _compute(self, step: Step) -> frozenset[str]:
        if not self.secrets:
            return frozenset()
        if action_for(step).local_sources():
            return frozenset(self.secrets)   # a template file on the controller may read any of them
        seen: set[str] = set()
        todo = list(_names_of(step.model_dump(mode="python", exclude_none=True)))
        while todo:   # playbook vars may be templates reading other variables
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(self._var_names.get(name, ()))
        if "secrets" in seen:
            return frozenset(self.secrets)
        return frozenset(n for n in seen if n in self.secrets and n != SUDO_SECRET) | (
            {SUDO_SECRET} if SUDO_SECRET in seen and SUDO_SECRET in self.secrets else set())


def _names_of(value: Any) -> set[str]:
    return {n for s in _strings(value) if "{" in s or s.strip() for n in _names(s)}
