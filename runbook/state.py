"""Run state: each run's per-task outcome under `.runbook/runs/RUN_ID.json`, so `runbook resume` can continue it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
import socket
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from runbook.audit import Redactor
from runbook.documents import STATE_VERSION, check_state
from runbook.errors import ValidationError
from runbook.events import Observer, RunInfo, TaskRef
from runbook.graph import TaskKey
from runbook.results import (DONE_STATUSES, RunResult, Status, TaskResult, item_register_value, loop_register_value,
                             register_value)

if TYPE_CHECKING:
    from runbook.runner import RunRequest

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LATEST = "latest"   # instead of a run id: the newest run
_FLUSH_EVERY = 0.5   # seconds at least between snapshots during a run (the journal has every task meanwhile)
_FLUSH_SHARE = 0.05  # and at most this share of the run's time spent writing them (a big run's snapshot is big)


def task_key(step_id: str, host: str) -> str:
    """The key of a task in a state file."""
    return f"{step_id}@{host}"


def journal_path(directory: Path, run_id: str) -> Path:
    """The write-ahead journal of a run, beside its snapshot."""
    return directory / f"{run_id}.journal"


def lock_path(directory: Path, run_id: str) -> Path:
    """The file a run holds locked while it executes (see run_lock), beside its snapshot."""
    return directory / f"{run_id}.lock"


def replay_journal(doc: dict[str, Any], path: Path) -> None:
    """Apply a run's journal to its snapshot: finished tasks win; started-but-unfinished ones are `in_flight`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []   # none written (or removed): the snapshot is all there is, and whether it still runs
    tasks = doc.setdefault("tasks", {})
    started: set[str] = set()
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line torn by a crash mid-write: everything before it is on disk
        if "started" in entry:
            started.add(str(entry["started"]))
        elif isinstance(entry.get("finished"), dict):
            task = entry["finished"]
            tasks[task_key(task["step_id"], task["host"])] = task
        elif isinstance(entry.get("rescued"), list):
            _mark_rescued(tasks, entry["rescued"])
    doc["in_flight"] = sorted(started - set(tasks))
    if doc.get("status") == "running" and not _alive(doc, lock_path(path.parent, path.stem)):
        doc["status"] = "aborted"   # the controller died (killed, crashed, disk full) without finishing


def _mark_rescued(tasks: dict[str, Any], keys: list[Any]) -> None:
    """Flag the saved failures a block's rescue handled (their results were saved before it ran)."""
    for key in keys:
        task = tasks.get(str(key))
        if isinstance(task, dict) and task.get("status") == Status.FAILED.value:
            task["rescued"] = True


_held_locks: set[int] = set()   # run-lock descriptors of this process


def _close_held_locks() -> None:
    """In a forked child (a `local:N` worker): the run's lock stays with the run's own process."""
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_held_locks)


@contextlib.contextmanager
def run_lock(directory: Path, run_id: str) -> Iterator[None]:
    """Held while a run executes (released however it ends, its process dying too): it tells a live run
    from one whose state still says `running` because it could not be written to the end."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(directory, run_id), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:   # nor can the run state be written there: the run says so itself (exit 6), before any task
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValidationError(f"run {run_id} is running already", hint="each run has its own id") from None
    _held_locks.add(fd)
    try:
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)   # the lock goes with the descriptor; the empty file stays, so a later check knows


def _alive(doc: dict[str, Any], lock: Path) -> bool:
    """Whether the process that wrote a `running` state is still running: its run lock is held (a run that
    took one), else its pid lives (only knowable on its own machine)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True    # held: the run goes on
        finally:
            os.close(fd)
        return False
    pid = doc.get("pid")
    if not isinstance(pid, int) or doc.get("control_host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunState(Observer):
    """An observer that keeps a run's state durable: a write-ahead journal plus a snapshot (secrets redacted).

    Every finished task is appended to `RUN_ID.journal` as it finishes (this observer is critical: it
    runs in the emitting thread), and the journal is fsync'd in `sync()`, which the executor calls
    before it releases the tasks that depend on what finished: one fsync covers every task that
    finished meanwhile. A started task is journalled too, so a task in flight when the controller
    died is known as such. The snapshot `RUN_ID.json` is rewritten atomically at most every 0.5 s
    (less often when writing it takes longer than 5% of that: a big run's snapshot is big) and at
    the end; `load_state` replays the journal over it.
    """

    critical = True   # losing its records would make the run unaccountable (or unresumable)
    what = "the run state"

    def __init__(self, directory: str | os.PathLike, redactor: Redactor, request: RunRequest):
        self.dir = Path(directory)
        self.redactor = redactor
        self.request = request
        self.doc: dict[str, Any] = {}
        self._last_flush = 0.0
        self._flush_cost = 0.0   # seconds the last snapshot took to write
        self._lock = threading.Lock()
        self._journal: IO[str] | None = None
        self._dirty = False

    def run_started(self, run: RunInfo) -> None:
        self.doc = {
            "version": STATE_VERSION, "run_id": run.run_id, "mode": run.mode, "status": "running",
            "playbook_path": run.playbook_path, "playbook_name": run.playbook_name,
            "playbook_hash": run.playbook_hash, "playbook_files": run.playbook_files,
            "inventory_source": absolute_sources(run.inventory_source),
            "inventory_hash": run.inventory_hash, "hosts": run.hosts, "operator": run.operator,
            "limit": self.request.limit, "extra_vars": run.extra_vars,
            "tags": sorted(self.request.tags), "skip_tags": sorted(self.request.skip_tags),
            "plan_hash": run.plan_hash, "details": self.redactor.redact(run.details),
            "started_at": run.started_at, "finished_at": None, "tasks": {},
            "pid": os.getpid(), "control_host": run.control_host,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        self._journal = open(journal_path(self.dir, run.run_id), "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        self._flush(force=True)

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        if task.attempt == 1 and not task.on_failure:   # on_failure steps are not resumed (they run again)
            self._append({"started": task_key(task.step_id, task.host)})

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        if result.on_failure:
            return
        d = self.redactor.redact(result.as_dict())
        self._append({"finished": d})
        self._dirty = True
        with self._lock:
            self.doc["tasks"][task_key(result.step_id, result.host)] = d
        self._flush()

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        keys = [task_key(sid, host) for sid in step_ids]
        self._append({"rescued": keys})
        self._dirty = True
        with self._lock:
            _mark_rescued(self.doc["tasks"], keys)
        self._flush()

    def sync(self) -> None:
        """Make every journalled result durable (called before dependents of finished tasks start)."""
        journal = self._journal
        if journal is None or not self._dirty:
            return
        with self._lock:
            self._dirty = False
            os.fsync(journal.fileno())

    def _append(self, entry: dict[str, Any]) -> None:
        """One journal line, handed to the OS (a crash of this process loses nothing; `sync` makes it durable)."""
        journal = self._journal
        if journal is None:
            return
        with self._lock:
            journal.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            journal.flush()

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        self.doc["status"] = "interrupted"
        self._flush(force=True)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        with self._lock:
            for r in result.results:
                key = task_key(r.step_id, r.host)
                if key not in self.doc["tasks"] and not r.on_failure:   # each was saved as it finished
                    self.doc["tasks"][key] = self.redactor.redact(r.as_dict())
            self.doc["finished_at"] = result.finished_at
            self.doc["exit_code"] = result.exit_code()
            self.doc["stop_reason"] = result.stop_reason
            self.doc["status"] = ("aborted" if result.observer_failed else "interrupted" if result.interrupted
                                  else "deferred" if any(r.status == Status.DEFERRED for r in result.results)
                                  else "ok" if result.ok else "failed")
        self._flush(force=True)
        if self._journal is not None:
            self.sync()
            self._journal.close()
            self._journal = None
            # The final snapshot, on disk now, holds every task: the journal would only keep each output twice.
            journal_path(self.dir, run.run_id).unlink(missing_ok=True)

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < max(_FLUSH_EVERY, self._flush_cost / _FLUSH_SHARE):
            return
        with self._lock:
            self._last_flush = now
            text = json.dumps(self.doc, indent=1, sort_keys=True, default=str)
        write_atomic(self.dir / f"{self.doc['run_id']}.json", text)
        self._flush_cost = time.monotonic() - now


def absolute_sources(source: str) -> str:
    """Inventory sources with existing paths made absolute, so plans and resumes work from any directory."""
    return ", ".join(os.path.abspath(s) if s and Path(s).exists() else s for s in source.split(", "))


def reusable_sources(source: str) -> list[str] | None:
    """The inventory sources recorded by a plan or run that can be loaded again (None: the default)."""
    return [s for s in source.split(", ") if Path(s).exists() or s.endswith(",")] or None


def write_atomic(path: Path, text: str) -> None:
    """Replace a file in one step so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(directory: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """Read a run's state file; a run id prefix is enough when it is unique, and `latest` is the newest run."""
    if run_id == LATEST:
        run_id = latest_run(directory) or run_id   # none: the error below says so, with the hint
    if not RUN_ID.fullmatch(run_id):
        # A run id names a file in the state directory: never a path (`../../x`) or a glob (`*`).
        raise ValidationError(f"invalid run id {run_id!r}: expected letters, digits, `-`, `_` and `.` like "
                              "20261201T021500Z-3fa9c1", hint="`runbook runs` lists recent runs")
    d = Path(directory)
    path = d / f"{run_id}.json"
    if not path.exists():
        matches = sorted(d.glob(f"{run_id}*.json")) if d.is_dir() else []
        if len(matches) != 1:
            known = ", ".join(p.stem for p in sorted(d.glob("*.json"))[-5:]) if d.is_dir() else ""
            raise ValidationError(f"no run `{run_id}` in {d}" + (" (ambiguous prefix)" if matches else ""),
                               hint=f"recent runs: {known}" if known else "`runbook runs` lists recent runs")
        path = matches[0]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"cannot read run state {path}: {exc}") from None
    check_state(doc, str(path))
    replay_journal(doc, journal_path(path.parent, path.stem))
    _lost_are_in_flight(doc)
    return doc


def latest_run(directory: str | os.PathLike) -> str | None:
    """The id of the newest run in a state directory (run ids start with their UTC start time), if any."""
    d = Path(directory)
    names = sorted(p.stem for p in d.glob("*.json") if RUN_ID.fullmatch(p.stem)) if d.is_dir() else []
    return names[-1] if names else None


def _lost_are_in_flight(doc: dict[str, Any]) -> None:
    """Tasks lost with a cluster worker may or may not have done their work: resume treats them as in flight."""
    lost = {k for k, t in (doc.get("tasks") or {}).items() if isinstance(t, dict) and t.get("status") == Status.LOST.value}
    if lost:
        doc["in_flight"] = sorted(set(doc.get("in_flight") or ()) | lost)


def list_runs(directory: str | os.PathLike, limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs, newest first, with their status and counts."""
    d = Path(directory)
    out: list[dict[str, Any]] = []
    for p in sorted(d.glob("*.json"), reverse=True) if d.is_dir() else []:
        if len(out) >= limit:   # counted after skipping unreadable files, so a torn one does not hide a run
            break
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        replay_journal(doc, journal_path(d, p.stem))
        counts: dict[str, int] = {}
        for t in doc.get("tasks", {}).values():
            if t.get("items"):
                continue   # a looped step: its items are counted
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        out.append({"run_id": doc.get("run_id"), "mode": doc.get("mode"), "status": doc.get("status"),
                    "playbook": doc.get("playbook_name"), "operator": doc.get("operator"),
                    "started_at": doc.get("started_at"), "hosts": len(doc.get("hosts", [])), "counts": counts})
    return out


def started_at(run_id: str) -> float | None:
    """When a run started, read from its id (`20261202T045840Z-...`, UTC), or None for a name that is not one."""
    from datetime import UTC, datetime

    try:
        return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def prunable_runs(directory: str | os.PathLike, before: float) -> list[str]:
    """The runs that started before `before` (seconds since the epoch) and are not running, oldest first.

    By start time, so a kept run keeps every later run (its resumes, the applies of its plan) that
    resume's and apply's checks read."""
    d = Path(directory)
    out: list[str] = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        when = started_at(p.stem)
        if not RUN_ID.fullmatch(p.stem) or when is None or when >= before:
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            doc = {}
        if isinstance(doc, dict) and doc.get("status") == "running":
            replay_journal(doc, journal_path(d, p.stem))   # a dead run becomes `aborted`; a live one stays running
            if doc.get("status") == "running":
                continue   # still running (its lock is held), or on another machine: never removed under it
        out.append(p.stem)
    return out


def remove_runs(directory: str | os.PathLike, run_ids: list[str]) -> None:
    """Remove these runs' state: snapshot, journal and lock."""
    d = Path(directory)
    for run_id in run_ids:
        for path in (journal_path(d, run_id), lock_path(d, run_id), d / f"{run_id}.json"):
            path.unlink(missing_ok=True)


def applies_of(directory: str | os.PathLike, plan_hash: str, after: str) -> list[dict[str, Any]]:
    """Earlier `apply` runs of one plan (by its hash) among the runs after `after` (the plan's own run id), oldest first."""
    return _later_runs(directory, after, lambda doc: doc.get("mode") == "apply" and doc.get("plan_hash") == plan_hash)


def resumes_of(directory: str | os.PathLike, run_id: str) -> list[dict[str, Any]]:
    """The runs that resumed `run_id` and started at least one of its tasks, oldest first.

    A resume that ran nothing (the window was closed, the operator declined) does not count: the run
    it names is still the one to resume."""
    def resumed_it(doc: dict[str, Any]) -> bool:
        details = doc.get("details")
        return (doc.get("mode") == "resume" and isinstance(details, dict) and details.get("resumed_from") == run_id
                and _ran_something(doc))

    return _later_runs(directory, run_id, resumed_it, replay=True)


def _ran_something(doc: dict[str, Any]) -> bool:
    """Whether a run started any task of its own (not one carried over from the run it resumed)."""
    tasks = doc.get("tasks")
    return bool(doc.get("in_flight")) or isinstance(tasks, dict) and any(
        isinstance(t, dict) and not t.get("from_run") and t.get("status") not in ("deferred", "not_run")
        for t in tasks.values())


def _later_runs(directory: str | os.PathLike, after: str, wanted: Callable[[dict[str, Any]], bool],
                replay: bool = False) -> list[dict[str, Any]]:
    """The runs started in `after`'s second or later (not `after` itself) whose state `wanted` accepts, oldest first;
    with `replay`, each state as its journal completes it (a run that died between snapshots)."""
    d = Path(directory)
    out: list[dict[str, Any]] = []
    # Run ids start with their UTC start time (to the second), so only the files of runs started in
    # that second or later are read; the random suffix orders nothing.
    since = after.split("-", 1)[0]
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        if p.stem.split("-", 1)[0] < since or p.stem == after:
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        if replay:
            replay_journal(doc, journal_path(d, p.stem))
        if wanted(doc):
            out.append({k: doc.get(k) for k in ("run_id", "status", "operator", "started_at", "finished_at")})
    return out


def format_runs(items: list[dict[str, Any]]) -> str:
    """`runbook runs` as an aligned table: start time (UTC), run id, mode, status, playbook, hosts, operator, tasks."""
    from datetime import UTC, datetime

    rows = [("STARTED (UTC)", "RUN", "MODE", "STATUS", "PLAYBOOK", "HOSTS", "OPERATOR", "TASKS")]
    for r in items:
        started = r.get("started_at")
        stamp = (datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S")
                 if isinstance(started, (int, float)) and not isinstance(started, bool) else "-")
        counts = ", ".join(f"{v} {k}" for k, v in sorted((r.get("counts") or {}).items())) or "-"
        rows.append((stamp, str(r.get("run_id") or "-"), str(r.get("mode") or "-"), str(r.get("status") or "-"),
                     str(r.get("playbook") or "-"), str(r.get("hosts", 0)), str(r.get("operator") or "-"), counts))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i == 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def resumable(doc: dict[str, Any]) -> tuple[dict[TaskKey, TaskResult], dict[str, dict[str, Any]]]:
    """Tasks of a saved run that are done (not to be re-run), and the registers they left.

    A failure its block's rescue handled is done too: the rescue (a rollback, say) ran for it, and running
    the step again would leave a second failure with no rescue after it.
    """
    done: dict[TaskKey, TaskResult] = {}
    for d in doc.get("tasks", {}).values():
        if Status(d["status"]) in DONE_STATUSES or (d["status"] == Status.FAILED.value and d.get("rescued") is True):
            result = TaskResult.from_dict(d)
            result.from_run = doc["run_id"]
            done[TaskKey(d["step_id"], d["host"])] = result
    return done, {}


def registers_from(playbook: Any, done: dict[TaskKey, TaskResult]) -> dict[str, dict[str, Any]]:
    """Registers that finished tasks left, rebuilt from their saved results (output as saved: redacted)."""
    out: dict[str, dict[str, Any]] = {}
    items_of: dict[tuple[str, str], list[TaskResult]] = {}   # a loop's finished items, by (step, host)
    for r in done.values():
        if r.parent is not None:
            items_of.setdefault((r.parent, r.host), []).append(r)
    for (sid, host), r in done.items():
        try:
            step = playbook.step(sid)
        except KeyError:
            continue
        if step.register_as and step.loop is not None and r.parent is None:
            items = sorted(items_of.get((sid, host), []), key=lambda i: i.item_index or 0)
            entries = [item_register_value(i, step.loop_name, step.index_var) for i in items]
            out.setdefault(host, {})[step.register_as] = loop_register_value(r, entries)
        elif step.register_as:
            out.setdefault(host, {})[step.register_as] = register_value(r, skipped=r.status == Status.SKIPPED)
    return out
