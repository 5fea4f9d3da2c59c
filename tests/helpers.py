"""Helpers shared by tests that drive the real `runbook` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout, no inherited audit or operator settings."""
    out = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_AUDIT_LOG", "RUNBOOK_OPERATOR")}
    out["PYTHONPATH"] = str(REPO)
    out.update(extra)
    return out


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m runbook ARGS` as a real subprocess and capture both streams."""
    return subprocess.run([sys.executable, "-m", "runbook", *args], capture_output=True, text=True,
                          env=cli_env(**(env or {})), cwd=cwd, timeout=timeout)


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit trail file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
