"""Helpers shared by tests that drive the real `runbook` command in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from runbook.events import Observer, RunInfo, TaskRef
from runbook.results import RunResult, TaskResult

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout, no inherited audit or operator settings."""
    out = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_AUDIT_LOG", "RUNBOOK_OPERATOR")}
    out["PYTHONPATH"] = str(REPO)
    out.update(extra)
    return out


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM each process still running (continued first, in case it is stopped), then SIGKILL what outlives `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m runbook ARGS` as a real subprocess and capture both streams."""
    return subprocess.run([sys.executable, "-m", "runbook", *args], capture_output=True, text=True,
                          env=cli_env(**(env or {})), cwd=cwd, timeout=timeout)


def run_in_workdir(work: Path, playbook: str, hosts: list[Any], *extra: str,
                   timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`runbook run` of `playbook` on the sshd `hosts` in a new directory `work` (its inventory, known_hosts,
    audit trail there), with JSON output."""
    from tests.sshd import write_inventory, write_known_hosts

    work.mkdir()
    (work / "pb.yml").write_text(playbook)
    write_inventory(work / "inventory.yml", hosts)
    write_known_hosts(work / "known_hosts", hosts)
    return cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
               str(work / "audit.jsonl"), "--format", "json", *extra, cwd=work, timeout=timeout)


def run_main(capsys: Any, *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run `runbook ARGS` in process (the real exit code of runbook.cli.main); return (code, stdout, stderr)."""
    from runbook.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit trail file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PlaybookWriter = Callable[..., Path]
InventoryWriter = Callable[..., Path]


class EventRecorder(Observer):
    """Collects every event, in order, for assertions (critical: called synchronously by the stream)."""

    critical = True

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def run_started(self, run: RunInfo) -> None:
        self.events.append(("run_started", run.run_id))

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        self.events.append(("task_started", (task.host, task.step_id, task.attempt)))

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        self.events.append(("task_finished", (result.host, result.step_id, result.status.value)))

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        self.events.append(("host_unreachable", (host, reason)))

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        self.events.append(("block_rescued", (host, block, tuple(step_ids))))

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        self.events.append(("notice", message))

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        self.events.append(("run_finished", result.exit_code()))
