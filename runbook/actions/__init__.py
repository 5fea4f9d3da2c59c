"""The action registry: built-in actions by module, third-party ones through the `runbook.actions` entry points.

Adding an action is adding one module here (and a line below) or, outside runbook, one entry point:

    [project.entry-points."runbook.actions"]
    my_action = "my_package.module:MyAction"
"""

from __future__ import annotations

import keyword
from typing import TYPE_CHECKING

from runbook.actions.base import (Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField,
                                  command_text)
from runbook.errors import RunbookError
from runbook.plugins import Registry

if TYPE_CHECKING:
    from runbook.model import StepBase


def _check(name: str, cls: object) -> type[Action]:
    if not (isinstance(cls, type) and issubclass(cls, Action)):
        raise RunbookError(f"action plugin `{name}` is not a subclass of runbook.actions.Action",
                           hint="see docs/architecture.md: adding an action")
    if cls.name != name or cls.spec_type is None:
        raise RunbookError(f"action plugin `{name}` must set `name = {name!r}` and a `spec_type`",
                           hint="see docs/architecture.md: adding an action")
    return cls


ACTIONS: Registry[type[Action]] = Registry("runbook.actions", "action", {
    "shell": "runbook.actions.shell:Shell",
    "command": "runbook.actions.command:Command",
    "upload": "runbook.actions.upload:Upload",
    "template": "runbook.actions.template:Template",
    "fetch": "runbook.actions.fetch:Fetch",
    "wait_for": "runbook.actions.wait_for:WaitFor",
    "assert": "runbook.actions.assert_:Assert",
    "approve": "runbook.actions.approve:Approve",
}, _check)


def field_name(action: str) -> str:
    """The attribute that holds an action's spec on a Step (`assert` is a Python keyword: `assert_`)."""
    return action + "_" if keyword.iskeyword(action) else action


def action_class(name: str) -> type[Action]:
    """The class of a registered action."""
    return ACTIONS.get(name)


def action_for(step: StepBase) -> Action:
    """The action object for a step."""
    return ACTIONS.get(step.action)(step)


__all__ = ["ACTIONS", "Action", "FieldKind", "Outcome", "Prediction", "PredictionKind", "TaskEnv", "TemplatedField",
           "action_class", "action_for", "command_text", "field_name"]
