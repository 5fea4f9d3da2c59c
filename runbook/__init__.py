"""runbook: agentless automation for operations teams."""

__version__ = "0.1.0"

from runbook.loader import load_playbook  # noqa: E402  (library API: `from runbook import load_playbook`)
