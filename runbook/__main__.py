"""`python -m runbook` runs the CLI."""

from runbook.cli import entry

entry()
