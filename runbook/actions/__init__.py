"""The action registry: every Action class in a module of this package, then the `runbook.actions` entry points.

Adding a built-in action is adding one module here; outside runbook, it is one entry point:

    [project.entry-points."runbook.actions"]
    my_action = "my_package.module:MyAction"
"""

from __future__ import annotations

import importlib
import keyword
import pkgutil

from pydantic import BaseModel
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


# The order of the core actions in messages and in the schema; any other built-in follows, by name.
_FIRST = ("shell", "command", "upload", "template", "fetch", "wait_for", "assert", "approve")


def _builtin_actions() -> dict[str, object]:
    """Every Action subclass defined in a module of this package: adding a built-in action is adding a file."""
    found: dict[str, object] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Action) and obj.__module__ == module.__name__ and obj.name:
                found[obj.name] = obj
    rank = {name: i for i, name in enumerate(_FIRST)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


ACTIONS: Registry[type[Action]] = Registry("runbook.actions", "action", _builtin_actions, _check)


def field_name(action: str) -> str:
    """The attribute that holds an action's spec on a Step: its name, or `NAME_` when that is a Python
    keyword (`assert`) or a pydantic model attribute (`copy`); the playbook key is always the name."""
    return action + "_" if keyword.iskeyword(action) or hasattr(BaseModel, action) else action


def action_class(name: str) -> type[Action]:
    """The class of a registered action."""
    return ACTIONS.get(name)


def action_for(step: StepBase) -> Action:
    """The action object for a step."""
    return ACTIONS.get(step.action)(step)


__all__ = ["ACTIONS", "Action", "FieldKind", "Outcome", "Prediction", "PredictionKind", "TaskEnv", "TemplatedField",
           "action_class", "action_for", "command_text", "field_name"]
