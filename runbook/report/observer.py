"""The report observer: collects a run's events and writes the HTML report when the run finishes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from runbook.events import Observer, RunInfo, rescued_text
from runbook.report.model import Event

if TYPE_CHECKING:
    from runbook.audit import Redactor
    from runbook.graph import StepGraph
    from runbook.model import Playbook
    from runbook.results import RunResult


class ReportObserver(Observer):
    """Writes a self-contained HTML run report at `run_finished`.

    Best effort: a report that cannot be built or written is reported through `warn` and never
    stops or fails the run (the audit trail and run state are the records; the report is a view).
    """

    critical: ClassVar[bool] = False   # best effort: the stream calls it on its own thread and isolates its failures

    def __init__(self, path: str | Path, *, graph: StepGraph, playbook: Playbook | None, redactor: Redactor | None,
                 predictions: Mapping[Any, Any] | None = None, audit_path: Path | None = None,
                 state_dir: Path | None = None, announce: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        self.path = str(path)
        self.graph = graph
        self.playbook = playbook
        self.redactor = redactor
        self.predictions = predictions
        self.audit_path = audit_path
        self.state_dir = state_dir
        self.announce = announce
        self.warn = warn or (lambda text: print(text, file=sys.stderr))
        self.events: list[Event] = []
        self.written = False

    def _event(self, **fields: Any) -> None:
        try:
            self.events.append(Event(at=time.time(), **fields))
        except Exception as exc:   # best effort: a bad event must not reach the executor
            self.warn(f"report: event not recorded: {exc}")

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        """Note an unreachable host and why."""
        self._event(kind="unreachable", level="error", host=host, message=reason)

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        """Note who granted or denied a gate."""
        verb = "approved" if granted else "denied"
        self._event(kind="approval", level="info" if granted else "warning", host=host, step_id=step_id,
                    message=f"{verb} by {who}")

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        """Note a block whose rescue handled a failure."""
        self._event(kind="notice", level="warning", host=host, message=rescued_text(run.mode, host, block, step_ids))

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        """Note a notice the operator saw."""
        self._event(kind="notice", level=level, message=message)

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        """Note an interrupt."""
        self._event(kind="interrupted", level="warning", message=reason)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        """Write the report; never raise into the run."""
        try:
            self.write(run, result)
        except Exception as exc:   # best effort: the run's outcome and exit code stay what they are
            self.warn(f"report: could not write {self.path}: {exc}")

    def write(self, run: RunInfo, result: RunResult) -> None:
        """Build, render and write the report."""
        from runbook.report.data import run_report_live
        from runbook.report.render import render_run, write_html

        report = run_report_live(run, result, graph=self.graph, playbook=self.playbook, events=self.events,
                                 predictions=self.predictions, audit_path=self.audit_path, state_dir=self.state_dir)
        write_html(render_run(report, self.redactor), self.path, self.announce)
        self.written = True
