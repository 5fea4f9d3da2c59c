"""What the server records: audit trail events, Prometheus metrics and a log line on stderr, from one call."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from runbook.audit import AuditTrail

# Rejected requests are audited at most this often per minute; past that they are only counted, so a
# flood of bad requests cannot fill the disk through the audit trail.
REJECTIONS_AUDITED_PER_MINUTE = 60


# `*_created` series double the exposition and say nothing an operator needs here.
disable_created_metrics()


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (several servers can live in one process)."""

    def __init__(self, queue_depth: Callable[[], float]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("runbook_serve_alerts_received", "Alerts accepted (first delivery).", ["source"], registry=r)
        self.deduplicated = Counter("runbook_serve_alerts_deduplicated", "Repeat deliveries of an alert already accepted.",
                                    ["source"], registry=r)
        self.matched = Counter("runbook_serve_alerts_matched", "Alerts matched by a rule.", ["rule"], registry=r)
        self.ignored = Counter("runbook_serve_alerts_ignored", "Alerts or targets recorded and ignored.", ["reason"], registry=r)
        self.rejected = Counter("runbook_serve_requests_rejected", "Requests refused (auth, size, format).", ["reason"], registry=r)
        self.started = Counter("runbook_serve_runs_started", "Playbook runs started.", ["rule", "kind"], registry=r)
        self.succeeded = Counter("runbook_serve_runs_succeeded", "Playbook runs that succeeded.", ["rule", "kind"], registry=r)
        self.failed = Counter("runbook_serve_runs_failed", "Playbook runs that failed or could not start.", ["rule", "kind"],
                              registry=r)
        self.suppressed = Counter("runbook_serve_remediations_suppressed", "Remediations suppressed by a safety rule.",
                                  ["rule", "reason"], registry=r)
        self.coalesced = Counter("runbook_serve_remediations_coalesced", "Alerts folded into an already queued remediation.",
                                 ["rule"], registry=r)
        self.running = Gauge("runbook_serve_runs_running", "Playbook runs in progress.", registry=r)
        self.breaker = Gauge("runbook_serve_breaker_open", "1 while the circuit breaker of a (rule, host) is open.",
                             ["rule", "host"], registry=r)
        self.depth = Gauge("runbook_serve_queue_depth", "Alerts not yet dispatched plus remediations waiting to run.",
                           registry=r)
        self.depth.set_function(queue_depth)
        self.accept = Histogram("runbook_serve_accept_seconds", "Time to store a delivery durably and reply.", registry=r,
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class Recorder:
    """Audit trail + metrics + stderr, so that every decision is recorded the same way."""

    def __init__(self, audit_log: Path, metrics: Metrics, *, quiet: bool = False):
        self.trail = AuditTrail(audit_log)
        self.metrics = metrics
        self.quiet = quiet
        # One id per server start: the trail numbers records per id, and a restart must not reuse them.
        self.serve_id = f"serve-{os.getpid()}-{os.urandom(3).hex()}"
        self._lock = threading.Lock()
        self._window = (0.0, 0)

    def event(self, name: str, **fields: Any) -> None:
        """Append one server event to the audit trail and log it."""
        clean = {k: v for k, v in fields.items() if v is not None}
        self.trail.append(self.serve_id, name, clean)
        if not self.quiet:
            text = " ".join(f"{k}={v}" for k, v in clean.items())
            print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {name} {text}", file=sys.stderr, flush=True)

    def rejected(self, reason: str, **fields: Any) -> None:
        """Count a refused request; audit it too unless too many came this minute."""
        self.metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        with self._lock:
            start, count = self._window
            if now - start > 60:
                start, count = now, 0
            self._window = (start, count + 1)
        if count < REJECTIONS_AUDITED_PER_MINUTE:
            self.event("request.rejected", reason=reason, **fields)
        elif count == REJECTIONS_AUDITED_PER_MINUTE:
            self.event("request.rejected.throttled", note=f"more than {REJECTIONS_AUDITED_PER_MINUTE} rejected requests "
                       "this minute: the rest are only counted in runbook_serve_requests_rejected_total")
