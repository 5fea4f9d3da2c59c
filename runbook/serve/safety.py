"""Safety decisions taken when a remediation is about to start: breaker, cooldown, maintenance window.

Dedupe happens at intake (the queue's unique alert key) and coalescing at dispatch (one queued job
per rule, host and kind); the per-host lock and the global limit are the worker's. What is left is
decided here, in one place, from the queue's own records, so a restart keeps every count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from runbook.serve.bridge import WindowState
from runbook.serve.queue import Job, Queue
from runbook.serve.rules import CompiledRule


@dataclass
class Decision:
    """Run now, suppress (recorded, never run), or defer until a time."""

    action: Literal["run", "suppress", "defer"]
    reason: str = ""
    code: str = ""                     # cooldown | breaker | window: the metric's label
    not_before: float | None = None
    breaker_opened: bool = False       # it opened with this decision: escalate once
    breaker_closed: bool = False       # it had been open and its period has passed


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


class Safety:
    """Decides whether one job may start now."""

    def __init__(self, queue: Queue, clock: Callable[[], float] = time.time):
        self.queue = queue
        self.clock = clock

    def decide(self, job: Job, rule: CompiledRule, window: WindowState | None) -> Decision:
        """The decision for a job about to start (it holds its host's lock)."""
        if job.kind == "escalate" or job.counted:
            # An escalation runs once per breaker opening by construction; a job that already started
            # (resumed after a stop, or applying an approved plan) was counted when it started.
            return self._window(rule, window) or Decision("run")
        now = self.clock()
        closed = False
        if job.kind == "remediate":
            b = rule.breaker
            runs = self.queue.runs_since(rule.name, job.host, now - b.per)
            if runs >= b.max_runs:
                opened = self.queue.breakers.open(rule.name, job.host, now)
                return Decision("suppress", f"circuit breaker open: {runs} run(s) of `{rule.name}` on {job.host} in the "
                                f"last {_ago(b.per)} (limit {b.max_runs})", "breaker", breaker_opened=opened)
            closed = self.queue.breakers.close(rule.name, job.host)
        last = self.queue.last_run_end(rule.name, job.host, job.kind)
        if last is not None and now < last + rule.cooldown:
            return Decision("suppress", f"cooldown: the last run of `{rule.name}` on {job.host} ended {_ago(now - last)} ago "
                            f"(cooldown {_ago(rule.cooldown)})", "cooldown", breaker_closed=closed)
        found = self._window(rule, window)
        if found is not None:
            found.breaker_closed = closed
            return found
        return Decision("run", breaker_closed=closed)

    @staticmethod
    def _window(rule: CompiledRule, window: WindowState | None) -> Decision | None:
        if window is None or window.open:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window.next_open)) if window.next_open else "never"
        if rule.outside_window == "suppress" or window.next_open is None:
            return Decision("suppress", f"outside the maintenance window ({window.describe}; next opening {when})", "window")
        return Decision("defer", f"outside the maintenance window ({window.describe}): deferred to {when}", "window",
                        not_before=window.next_open)
