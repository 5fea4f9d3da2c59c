"""The durable queue: accepted alerts and remediation jobs in SQLite (WAL, fsync on commit), shared with `runbook approvals`."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook.errors import EXIT_INVALID, Location, RunbookError
from runbook.serve.models import Alert

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    dedupe_key TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL, status TEXT NOT NULL, fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL,
    request_id TEXT,
    received_at REAL NOT NULL, last_delivery REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'pending',
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS alerts_state ON alerts(state);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts(id),
    rule TEXT NOT NULL, host TEXT NOT NULL, kind TEXT NOT NULL, playbook TEXT NOT NULL,
    mode TEXT NOT NULL, phase TEXT NOT NULL, vars TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'queued', reason TEXT,
    created_at REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0, started_at REAL, finished_at REAL,
    counted INTEGER NOT NULL DEFAULT 0,
    run_id TEXT, plan_run_id TEXT, resume_run_id TEXT, exit_code INTEGER, results TEXT,
    alerts INTEGER NOT NULL DEFAULT 1,
    plan_path TEXT, decided_by TEXT, decision_reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(rule, host, kind);
CREATE TABLE IF NOT EXISTS job_alerts (job_id INTEGER NOT NULL, alert_id INTEGER NOT NULL, PRIMARY KEY (job_id, alert_id));
CREATE TABLE IF NOT EXISTS breakers (
    rule TEXT NOT NULL, host TEXT NOT NULL, opened_at REAL NOT NULL, escalated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rule, host)
);
"""

# States a job can be in; the first three are unfinished.
QUEUED, RUNNING, AWAITING = "queued", "running", "awaiting_approval"
FINAL = ("succeeded", "failed", "suppressed", "rejected", "error")


class QueueError(RunbookError):
    """The queue database cannot be opened or used (a setting to fix: exit 4)."""

    exit_code = EXIT_INVALID


@dataclass
class NewJob:
    """A remediation the dispatcher wants queued for one host."""

    rule: str
    host: str
    kind: str                 # remediate | resolved | escalate
    playbook: str
    mode: str                 # apply | plan
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One remediation of one rule on one host, as stored."""

    id: int
    alert_id: int
    rule: str
    host: str
    kind: str
    playbook: str
    mode: str
    phase: str                # run | plan | apply
    vars: dict[str, Any]
    state: str
    reason: str | None
    created_at: float
    not_before: float
    started_at: float | None
    finished_at: float | None
    counted: bool
    run_id: str | None
    plan_run_id: str | None
    resume_run_id: str | None
    exit_code: int | None
    results: Any
    alerts: int
    plan_path: str | None
    decided_by: str | None
    decision_reason: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        """A job from its table row."""
        data = dict(row)
        data["vars"] = json.loads(data["vars"] or "{}")
        data["results"] = json.loads(data["results"]) if data["results"] else None
        data["counted"] = bool(data["counted"])
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (vars are left out: they may carry values from the payload only)."""
        out = dict(self.__dict__)
        out.pop("vars")
        return out


@dataclass
class _Pending:
    """One delivery waiting for a grouped commit."""

    alerts: list[Alert]
    request_id: str
    result: Accepted | None = None
    error: Exception | None = None


@dataclass
class Accepted:
    """What one delivery added to the queue."""

    new: list[int]
    duplicates: int
    fresh: list[bool]          # per alert of the delivery, in order: first delivery or not


class Queue:
    """The SQLite store; one connection shared by threads under a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._batch_lock = threading.Lock()
        self._batch: list[_Pending] = []
        self.breakers = Breakers(self)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # an accepted alert survives power loss, not just a crash
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise QueueError(f"cannot open the queue database: {exc}", location=Location(str(self.path)),
                             hint="check the directory's permissions, or choose another file with --db") from None
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- intake ---------------------------------------------------------------------------------

    def accept(self, alerts: list[Alert], request_id: str) -> Accepted:
        """Store the alerts of one delivery durably before returning; repeats of stored alerts are only counted.

        A delivery that brings something new is committed with an fsync, grouped with the deliveries
        that arrived while the previous commit was syncing (one fsync for all of them). A delivery of
        alerts already stored promises nothing new, so its counters are written without an fsync.
        """
        keys = [a.dedupe_key for a in alerts]
        if not keys:
            return Accepted([], 0, [])
        with self._lock:
            marks = ",".join("?" * len(keys))
            known = {r[0] for r in self._db.execute(f"SELECT dedupe_key FROM alerts WHERE dedupe_key IN ({marks})", keys)}
            if all(k in known for k in keys):
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._tx() as db:
                        db.executemany("UPDATE alerts SET deliveries = deliveries + 1, last_delivery = ? WHERE dedupe_key = ?",
                                       [(time.time(), k) for k in keys])
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
                return Accepted([], len(keys), [False] * len(keys))
        return self._group_commit(_Pending(alerts, request_id))

    def _group_commit(self, mine: _Pending) -> Accepted:
        with self._batch_lock:
            self._batch.append(mine)
        with self._lock:   # whoever gets the lock first commits every delivery waiting by then
            if mine.result is None and mine.error is None:
                with self._batch_lock:
                    batch, self._batch = self._batch, []
                try:
                    with self._tx() as db:
                        results = [self._insert(db, p.alerts, p.request_id) for p in batch]
                    for p, r in zip(batch, results):
                        p.result = r
                except Exception as exc:
                    for p in batch:
                        p.error = exc
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    @staticmethod
    def _insert(db: sqlite3.Connection, alerts: list[Alert], request_id: str) -> Accepted:
        now = time.time()
        new, fresh, dup = [], [], 0
        for a in alerts:
            row = db.execute(
                "INSERT INTO alerts (dedupe_key, source, status, fingerprint, starts_at, name, body, request_id,"
                " received_at, last_delivery) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(dedupe_key) DO UPDATE SET"
                " deliveries = deliveries + 1, last_delivery = excluded.last_delivery RETURNING id, deliveries",
                (a.dedupe_key, a.source, a.status, a.fingerprint, a.starts_at, a.name, json.dumps(a.to_record()),
                 request_id, now, now)).fetchone()
            first = row["deliveries"] == 1
            fresh.append(first)
            if first:
                new.append(int(row["id"]))
            else:
                dup += 1
        return Accepted(new, dup, fresh)

    def pending_alerts(self, limit: int = 200) -> list[tuple[int, Alert, str | None]]:
        """Accepted alerts not yet dispatched to rules, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, body, request_id FROM alerts WHERE state = 'pending' ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
        return [(int(r["id"]), Alert.from_record(json.loads(r["body"])), r["request_id"]) for r in rows]

    def alert(self, alert_id: int) -> tuple[Alert, dict[str, Any]] | None:
        """One stored alert and its bookkeeping (deliveries, outcome)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            return None
        meta = {k: row[k] for k in ("id", "request_id", "received_at", "deliveries", "state", "outcome")}
        return Alert.from_record(json.loads(row["body"])), meta

    def dispatch(self, alert_id: int, jobs: list[NewJob], outcome: str) -> list[tuple[int, bool]]:
        """Queue the alert's jobs (each folded into a queued, unstarted job of the same rule, host and kind if one exists)."""
        with self._tx() as db:
            out = [self._fold_or_insert(db, alert_id, j) for j in jobs]
            db.execute("UPDATE alerts SET state = 'dispatched', outcome = ? WHERE id = ?", (outcome, alert_id))
        return out

    def enqueue(self, alert_id: int, job: NewJob) -> tuple[int, bool]:
        """Queue one more job for an alert already dispatched (an escalation)."""
        with self._tx() as db:
            return self._fold_or_insert(db, alert_id, job)

    @staticmethod
    def _fold_or_insert(db: sqlite3.Connection, alert_id: int, j: NewJob) -> tuple[int, bool]:
        row = db.execute("SELECT id FROM jobs WHERE rule = ? AND host = ? AND kind = ? AND state = ? AND counted = 0"
                         " ORDER BY id LIMIT 1", (j.rule, j.host, j.kind, QUEUED)).fetchone()
        if row is not None:
            job_id, folded = int(row["id"]), True
            db.execute("UPDATE jobs SET alerts = alerts + 1 WHERE id = ?", (job_id,))
        else:
            cur = db.execute("INSERT INTO jobs (alert_id, rule, host, kind, playbook, mode, phase, vars, created_at)"
                             " VALUES (?,?,?,?,?,?,?,?,?)",
                             (alert_id, j.rule, j.host, j.kind, j.playbook, j.mode, "plan" if j.mode == "plan" else "run",
                              json.dumps(j.vars), time.time()))
            job_id, folded = int(cur.lastrowid or 0), False
        db.execute("INSERT OR IGNORE INTO job_alerts (job_id, alert_id) VALUES (?, ?)", (job_id, alert_id))
        return job_id, folded

    # --- scheduling -------------------------------------------------------------------------------

    def runnable(self, now: float, busy: set[str], limit: int) -> list[Job]:
        """Queued jobs due now whose host is free, oldest first, at most one per host."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? AND not_before <= ? ORDER BY id", (QUEUED, now)).fetchall()
        out: list[Job] = []
        hosts = set(busy)
        for r in rows:
            if len(out) >= limit:
                break
            if r["host"] not in hosts:
                hosts.add(r["host"])
                out.append(Job.from_row(r))
        return out

    def next_due(self) -> float | None:
        """When the earliest deferred job becomes due."""
        with self._lock:
            row = self._db.execute("SELECT MIN(not_before) AS t FROM jobs WHERE state = ?", (QUEUED,)).fetchone()
        return float(row["t"]) if row["t"] is not None else None

    def update(self, job_id: int, **fields: Any) -> None:
        """Set columns of one job (results and vars are stored as JSON)."""
        for key in ("results", "vars"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key], default=str)
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def recover(self) -> list[Job]:
        """After a crash or kill: jobs left running go back to the queue, resuming the run they had started."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            for r in rows:
                db.execute("UPDATE jobs SET state = ?, resume_run_id = COALESCE(run_id, resume_run_id),"
                           " reason = 'resumed after the server stopped' WHERE id = ?", (QUEUED, r["id"]))
        return [Job.from_row(r) for r in rows]

    # --- safety bookkeeping ---------------------------------------------------------------------------

    def last_run_end(self, rule: str, host: str, kind: str) -> float | None:
        """When the latest counted run of (rule, host, kind) ended; now when one is still going."""
        with self._lock:
            row = self._db.execute("SELECT MAX(COALESCE(finished_at, ?)) AS t FROM jobs WHERE rule = ? AND host = ? AND"
                                   " kind = ? AND counted = 1", (time.time(), rule, host, kind)).fetchone()
        return float(row["t"]) if row["t"] is not None else None

    def runs_since(self, rule: str, host: str, since: float) -> int:
        """Remediation runs of (rule, host) started since a time (what the breaker counts)."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) AS n FROM jobs WHERE rule = ? AND host = ? AND kind = 'remediate'"
                                   " AND counted = 1 AND started_at >= ?", (rule, host, since)).fetchone()
        return int(row["n"])

    # --- approvals and reading --------------------------------------------------------------------------

    def decide(self, job_id: int, approve: bool, by: str, reason: str | None) -> Job | None:
        """Approve (queue the apply) or reject a job awaiting approval; None when there is no such pending job."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND state = ?", (job_id, AWAITING)).fetchone()
            if row is None:
                return None
            if approve:
                db.execute("UPDATE jobs SET state = ?, phase = 'apply', decided_by = ?, decision_reason = ?, not_before = 0"
                           " WHERE id = ?", (QUEUED, by, reason, job_id))
            else:
                db.execute("UPDATE jobs SET state = 'rejected', decided_by = ?, decision_reason = ?, finished_at = ?"
                           " WHERE id = ?", (by, reason, time.time(), job_id))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def job(self, key: int | str) -> Job | None:
        """A job by id, or by the run id of its run or plan."""
        with self._lock:
            if isinstance(key, int) or str(key).isdigit():
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (int(key),)).fetchone()
            else:
                row = self._db.execute("SELECT * FROM jobs WHERE run_id = ? OR plan_run_id = ?", (key, key)).fetchone()
        return Job.from_row(row) if row else None

    def jobs(self, limit: int = 100, state: str | None = None) -> list[Job]:
        """Recent jobs, newest first."""
        sql = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, ((state,) if state else ()) + (limit,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def job_alert_ids(self, job_id: int) -> list[int]:
        """Every alert folded into a job."""
        with self._lock:
            rows = self._db.execute("SELECT alert_id FROM job_alerts WHERE job_id = ? ORDER BY alert_id", (job_id,)).fetchall()
        return [int(r["alert_id"]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state plus `pending_alerts`: what the queue-depth gauge and /healthz report."""
        with self._lock:
            out = {r["state"]: int(r["n"]) for r in self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
            out["pending_alerts"] = int(self._db.execute("SELECT COUNT(*) FROM alerts WHERE state = 'pending'").fetchone()[0])
            out["alerts"] = int(self._db.execute("SELECT COUNT(*) FROM alerts").fetchone()[0])
        return out


class Breakers:
    """The open circuit breakers, one row per (rule, host), in the queue's database."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def is_open(self, rule: str, host: str) -> bool:
        """True while the breaker of (rule, host) is open."""
        with self.queue._lock:
            return self.queue._db.execute("SELECT 1 FROM breakers WHERE rule = ? AND host = ?", (rule, host)).fetchone() is not None

    def open(self, rule: str, host: str, now: float) -> bool:
        """Open the breaker; True when it was closed before (so the caller escalates once)."""
        with self.queue._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO breakers (rule, host, opened_at) VALUES (?,?,?)", (rule, host, now))
            return cur.rowcount == 1

    def close(self, rule: str, host: str) -> bool:
        """Close the breaker; True when it was open."""
        with self.queue._tx() as db:
            return db.execute("DELETE FROM breakers WHERE rule = ? AND host = ?", (rule, host)).rowcount == 1

    def all_open(self) -> list[tuple[str, str]]:
        """Every open (rule, host) breaker."""
        with self.queue._lock:
            return [(r["rule"], r["host"]) for r in self.queue._db.execute("SELECT rule, host FROM breakers").fetchall()]


class ServerLock:
    """An exclusive lock beside the database: one server per queue (a second one would run every job twice)."""

    def __init__(self, db_path: str | os.PathLike):
        self.path = Path(str(db_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise QueueError naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise QueueError(f"another `runbook serve` (pid {holder or '?'}) uses this queue",
                             location=Location(str(self.path)), hint="stop it, or give this one its own --db") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
