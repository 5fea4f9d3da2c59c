"""The action registry: one module per action, one line each here."""

from __future__ import annotations

from runbook.actions.approve import Approve
from runbook.actions.assert_ import Assert
from runbook.actions.base import Action, Outcome, Prediction, TaskEnv
from runbook.actions.command import Command
from runbook.actions.fetch import Fetch
from runbook.actions.shell import Shell
from runbook.actions.template import Template
from runbook.actions.upload import Upload
from runbook.actions.wait_for import WaitFor

REGISTRY: dict[str, type[Action]] = {cls.name: cls for cls in (
    Shell, Command, Upload, Template, Fetch, WaitFor, Assert, Approve,
)}


def action_for(step) -> Action:
    """The action object for a step."""
    return REGISTRY[step.action](step)


__all__ = ["Action", "Outcome", "Prediction", "TaskEnv", "REGISTRY", "action_for"]
