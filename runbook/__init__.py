"""runbook: agentless automation for operations teams."""

__version__ = "0.1.0"

# The library API: `from runbook import load_playbook, Inventory, run`.
from runbook.loader import load_playbook  # noqa: E402
from runbook.inventory import Inventory  # noqa: E402


def run(playbook, inventory=None, **kwargs):  # type: ignore[no-untyped-def]
    """Run a playbook over an inventory and return a RunResult (see runbook.runner.run)."""
    from runbook.runner import run as _run

    return _run(playbook, inventory, **kwargs)


__all__ = ["Inventory", "load_playbook", "run", "__version__"]
