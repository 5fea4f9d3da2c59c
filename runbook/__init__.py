"""runbook: agentless automation for operations teams."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Inventory", "load_playbook", "run", "__version__"]


def __getattr__(name: str) -> Any:
    """The library API, `from runbook import load_playbook, Inventory, run`, imported on first use.

    Lazy so that `import runbook.errors` (and the CLI's start) does not pay for pydantic and YAML.
    """
    if name == "load_playbook":
        from runbook.loader import load_playbook

        return load_playbook
    if name == "Inventory":
        from runbook.inventory import Inventory

        return Inventory
    if name == "run":
        from runbook.runner import run

        return run
    raise AttributeError(f"module 'runbook' has no attribute {name!r}")
