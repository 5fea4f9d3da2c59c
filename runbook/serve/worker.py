"""The worker: dispatches accepted alerts to rules, and runs remediations under the per-host lock and the global limit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from runbook.errors import RunbookError
from runbook.serve import bridge
from runbook.serve.models import Alert
from runbook.serve.queue import AWAITING, QUEUED, RUNNING, Job, NewJob, Queue
from runbook.serve.record import Recorder
from runbook.serve.rules import CompiledRule, RuleSet, TargetError, render_vars, target_names
from runbook.serve.safety import Decision, Safety


@dataclass
class Routing:
    """What the dispatcher decided for one alert: jobs to queue, and why other targets were ignored."""

    jobs: list[NewJob] = field(default_factory=list)
    ignored: list[tuple[str, str, str]] = field(default_factory=list)   # (rule, reason code, text)
    matched: list[str] = field(default_factory=list)


def route(alert: Alert, rules: RuleSet, inventory: bridge.Inventory) -> Routing:
    """Match an alert against every rule and resolve its targets to inventory hosts."""
    out = Routing()
    for rule in rules.matching(alert):
        chosen = rule.playbook_for(alert)
        if chosen is None:
            continue
        kind, playbook = chosen
        out.matched.append(rule.name)
        try:
            names = target_names(rule, alert)
            extra = render_vars(rule, alert)
        except TargetError as exc:
            out.ignored.append((rule.name, "invalid_host", str(exc)))
            continue
        except RunbookError as exc:
            out.ignored.append((rule.name, "template_error", bridge.error_text(exc)))
            continue
        if not names:
            out.ignored.append((rule.name, "no_host", f"the alert has no `{rule.spec.host_label}` label to take the host from"))
            continue
        hosts, missing = bridge.map_hosts(inventory, names)
        out.ignored.extend((rule.name, "unknown_host", m) for m in missing)
        out.jobs.extend(NewJob(rule.name, h, kind, str(playbook), rule.spec.mode if kind == "remediate" else "apply", extra)
                        for h in hosts)
    return out


class Worker:
    """A dispatcher thread plus a bounded pool of remediation threads."""

    def __init__(self, rules: RuleSet, queue: Queue, settings: bridge.RunSettings, recorder: Recorder,
                 concurrency: int | None = None, poll: float = 1.0):
        self.rules = rules
        self.queue = queue
        self.settings = settings
        self.rec = recorder
        self.concurrency = concurrency or rules.concurrency
        self.poll = poll
        self.safety = Safety(queue)
        self._wake = threading.Event()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="runbook-serve")
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition(self._lock)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Resume what a previous server left, then start dispatching."""
        for job in self.queue.recover():
            self.rec.event("remediation.recovered", job_id=job.id, rule=job.rule, host=job.host, run=job.run_id,
                           note="left running by a stopped server: queued again, resuming its run")
        for rule, host in self.queue.breakers.all_open():
            self.rec.metrics.breaker.labels(rule, host).set(1)
        self._thread = threading.Thread(target=self._loop, name="runbook-serve-dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the queue now (an alert came in, a job finished, an approval was given)."""
        self._wake.set()

    def stop(self, timeout: float = 300.0) -> bool:
        """Start nothing new, let running remediations finish or checkpoint, and wait; True when all ended."""
        self.settings.stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy and time.monotonic() < deadline:
                self._idle.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            done = not self._busy
        self._pool.shutdown(wait=done)
        return done

    def idle(self) -> bool:
        """True when nothing runs and nothing is due (tests and the benchmark wait for this)."""
        with self._lock:
            if self._busy:
                return False
        counts = self.queue.counts()
        due = self.queue.next_due()
        return counts.get("pending_alerts", 0) == 0 and (due is None or due > time.time())

    # --- the dispatcher -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.settings.stop.is_set():
            self._wake.clear()
            try:
                self.dispatch_pending()
                self.start_due()
            except Exception as exc:  # a bug must not stop the server from dispatching: record it, go on
                self.rec.event("serve.error", error=bridge.error_text(exc))
            due = self.queue.next_due()
            wait = self.poll if due is None else max(0.05, min(self.poll, due - time.time()))
            self._wake.wait(timeout=wait)

    def dispatch_pending(self) -> None:
        """Route every accepted alert to rules and queue its jobs."""
        for alert_id, alert, request_id in self.queue.pending_alerts():
            routing = route(alert, self.rules, self.settings.inventory)
            base = {"alert_id": alert_id, "fingerprint": alert.fingerprint, "alertname": alert.name,
                    "status": alert.status, "request_id": request_id}
            for rule_name, code, text in routing.ignored:
                self.rec.metrics.ignored.labels(code).inc()
                self.rec.event("alert.ignored", **base, rule=rule_name, reason=text)
            if not routing.matched:
                self.rec.metrics.ignored.labels("no_rule").inc()
                self.rec.event("alert.ignored", **base, reason="no rule matches")
            for name in routing.matched:
                self.rec.metrics.matched.labels(name).inc()
            outcome = f"{len(routing.jobs)} remediation(s)" if routing.jobs else "ignored"
            for (job_id, folded), j in zip(self.queue.dispatch(alert_id, routing.jobs, outcome), routing.jobs):
                if folded:
                    self.rec.metrics.coalesced.labels(j.rule).inc()
                self.rec.event("remediation.coalesced" if folded else "remediation.queued", **base, job_id=job_id,
                               rule=j.rule, host=j.host, kind=j.kind, playbook=j.playbook)

    def start_due(self) -> None:
        """Start queued jobs that are due, one per free host, within the global limit."""
        with self._lock:
            free = self.concurrency - len(self._busy)
            if free <= 0 or self.settings.stop.is_set():
                return
            jobs = self.queue.runnable(time.time(), set(self._busy), free)
            for job in jobs:
                self._busy.add(job.host)
        for job in jobs:
            self._pool.submit(self._run_job, job)

    # --- one job ----------------------------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        try:
            rule = self.rules.get(job.rule)
            if rule is None:
                self._finish(job, "error", None, reason=f"rule `{job.rule}` is no longer in the rules file")
                return
            window = bridge.window_state(job.playbook)
            decision = self.safety.decide(job, rule, window)
            if decision.breaker_closed:
                self.rec.metrics.breaker.labels(rule.name, job.host).set(0)
                self.rec.event("breaker.closed", rule=rule.name, host=job.host)
            if decision.action != "run":
                self._hold(job, rule, decision)
                return
            self._execute(job, rule)
        except Exception as exc:   # an engine error is the job's outcome, never the worker's end
            self._finish(job, "error", None, reason=bridge.error_text(exc))
        finally:
            with self._idle:
                self._busy.discard(job.host)
                self._idle.notify_all()
            self.wake()

    def _hold(self, job: Job, rule: CompiledRule, d: Decision) -> None:
        fields = {"job_id": job.id, "rule": rule.name, "host": job.host, "kind": job.kind, "reason": d.reason}
        if d.action == "defer":
            self.queue.update(job.id, not_before=d.not_before, reason=d.reason)
            self.rec.event("remediation.deferred", **fields)
            return
        self.queue.update(job.id, state="suppressed", reason=d.reason, finished_at=time.time())
        self.rec.metrics.suppressed.labels(rule.name, d.code).inc()
        self.rec.event("remediation.suppressed", **fields, alerts=job.alerts)
        if d.breaker_opened:
            self.rec.metrics.breaker.labels(rule.name, job.host).set(1)
            self.rec.event("breaker.opened", rule=rule.name, host=job.host, escalate=str(rule.escalate or ""))
            if rule.escalate is not None:
                vars_ = {**job.vars, "breaker_rule": rule.name, "breaker_host": job.host, "breaker_reason": d.reason}
                job_id, _ = self.queue.enqueue(job.alert_id, NewJob(rule.name, job.host, "escalate", str(rule.escalate),
                                                                    "apply", vars_))
                self.rec.event("escalation.queued", job_id=job_id, rule=rule.name, host=job.host,
                               playbook=str(rule.escalate))

    def _details(self, job: Job, alert: Alert | None, meta: dict[str, Any]) -> dict[str, Any]:
        return {"serve": {"job_id": job.id, "rule": job.rule, "kind": job.kind, "phase": job.phase,
                          "alert_fingerprint": alert.fingerprint if alert else None,
                          "alert_source": alert.source if alert else None, "alertname": alert.name if alert else None,
                          "request_id": meta.get("request_id"), "alerts": self.queue.job_alert_ids(job.id),
                          "server": self.rec.serve_id}}

    def _execute(self, job: Job, rule: CompiledRule) -> None:
        found = self.queue.alert(job.alert_id)
        alert, meta = found if found else (None, {})
        details = self._details(job, alert, meta)
        run_id = bridge.new_run_id()
        first = not job.counted
        self.queue.update(job.id, state=RUNNING, counted=1, started_at=job.started_at or time.time(),
                          **({"plan_run_id": run_id} if job.phase == "plan" else {"run_id": run_id}))
        if first:
            self.rec.metrics.started.labels(rule.name, job.kind).inc()
        self.rec.metrics.running.inc()
        self.rec.event("remediation.started", job_id=job.id, rule=rule.name, host=job.host, kind=job.kind, phase=job.phase,
                       run=run_id, playbook=job.playbook, fingerprint=details["serve"]["alert_fingerprint"],
                       resumes=job.resume_run_id)
        try:
            outcome = self._call_engine(job, run_id, details)
        finally:
            self.rec.metrics.running.dec()
        self._record(job, rule, outcome)

    def _call_engine(self, job: Job, run_id: str, details: dict[str, Any]) -> bridge.Outcome:
        s = self.settings
        if job.phase == "plan":
            return bridge.plan(job.playbook, job.host, job.vars, details, s, name=f"job-{job.id}", run_id=run_id)
        if job.phase == "apply":
            assert job.plan_path is not None
            return bridge.apply(job.plan_path, job.vars, details, s, approver=job.decided_by or "approver", run_id=run_id,
                                previous_run_id=job.resume_run_id)
        if job.resume_run_id:
            resumed = bridge.resume(job.resume_run_id, job.vars, details, s, run_id=run_id)
            if resumed is not None:
                return resumed
        return bridge.run(job.playbook, job.host, job.vars, details, s, run_id=run_id)

    def _record(self, job: Job, rule: CompiledRule, o: bridge.Outcome) -> None:
        if o.checkpointed:
            # Stopped early (server stopping, or the window closed): the run state is the checkpoint.
            window = bridge.window_state(job.playbook) if not self.settings.stop.is_set() else None
            later = window.next_open if window and not window.open and window.next_open else 0.0
            self.queue.update(job.id, state=QUEUED, resume_run_id=o.run_id, not_before=later, results=o.results,
                              reason="checkpointed: " + (o.stop_reason or "stopped early"))
            self.rec.event("remediation.checkpointed", job_id=job.id, rule=rule.name, host=job.host, run=o.run_id,
                           resume_at=later or None)
            return
        if job.phase == "plan" and o.exit_code == 0 and o.plan_path:
            self.queue.update(job.id, state=AWAITING, plan_path=o.plan_path, exit_code=o.exit_code, results=o.results,
                              reason="plan saved: approve or reject it")
            self.rec.event("approval.requested", job_id=job.id, approval_id=job.id, rule=rule.name, host=job.host,
                           plan=o.plan_path, run=o.run_id)
            return
        state = "succeeded" if o.exit_code == 0 else "failed"
        self._finish(job, state, o, reason=o.error or o.stop_reason)

    def _finish(self, job: Job, state: str, o: bridge.Outcome | None, reason: str | None = None) -> None:
        self.queue.update(job.id, state=state, finished_at=time.time(), reason=reason,
                          exit_code=o.exit_code if o else None, results=o.results if o else None)
        (self.rec.metrics.succeeded if state == "succeeded" else self.rec.metrics.failed).labels(job.rule, job.kind).inc()
        self.rec.event("remediation.finished", job_id=job.id, rule=job.rule, host=job.host, kind=job.kind, state=state,
                       run=o.run_id if o else None, exit_code=o.exit_code if o else None, reason=reason)

    def decide(self, job_id: int, approve: bool, by: str, reason: str | None) -> Job | None:
        """Approve or reject a pending plan (the HTTP endpoint's work; the CLI writes the queue directly)."""
        job = self.queue.decide(job_id, approve, by, reason)
        if job is not None:
            self.rec.event("approval.granted" if approve else "approval.rejected", job_id=job.id, rule=job.rule,
                           host=job.host, by=by, reason=reason, plan=job.plan_path)
            self.wake()
        return job

