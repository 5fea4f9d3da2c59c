"""The scheduler core: start each scheduled playbook of a directory when it is due, once, never twice at a time."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from runbook.errors import Location, RunbookError
from runbook.loader import load_playbook
from runbook.window import WINDOWS_FILES, Clock, CronSeries, WindowSchedule, resolve_window

UTC = UTC

LogFn = Callable[[str, dict[str, Any]], None]
RunFn = Callable[[Path], int]

STATE_FILE = "scheduler-state.json"
STATE_VERSION = 1


def _no_log(event: str, fields: dict[str, Any]) -> None:
    """Default log callback: drop the event."""


# --- locks ----------------------------------------------------------------------------------

class PlaybookLock:
    """An exclusive, non-blocking flock on a lock file: held while a playbook runs."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process (or handle) holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # The holder's pid, for whoever wonders why a playbook is "already running".
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Release the lock (closing the file releases the flock)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this handle holds the lock."""
        return self._fd is not None


def lock_path(state_dir: str | os.PathLike, key: str) -> Path:
    """Where the lock file of playbook `key` (its file name) lives."""
    return Path(state_dir) / "locks" / f"{key}.lock"


# --- persistent state -----------------------------------------------------------------------

class SchedulerState:
    """Per playbook, the last due time handled (run or skipped), kept in a JSON file written atomically."""

    def __init__(self, path: Path, log: LogFn = _no_log):
        self.path = path
        self._log = log
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = raw["playbooks"]
            if not isinstance(entries, dict):
                raise ValueError("`playbooks` is not a mapping")
            for entry in entries.values():
                datetime.fromisoformat(entry["last_due"])
            return entries
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the damaged file for inspection; starting empty may re-run the current window once.
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            self._log("schedule.state_corrupt", {"path": str(self.path), "moved_to": str(aside), "error": str(exc)})
            return {}

    def last_due(self, key: str) -> datetime | None:
        """The last due time handled for playbook `key`."""
        with self._lock:
            entry = self._data.get(key)
        return datetime.fromisoformat(entry["last_due"]) if entry else None

    def entry(self, key: str) -> dict[str, Any] | None:
        """Everything recorded for playbook `key`."""
        with self._lock:
            entry = self._data.get(key)
            return dict(entry) if entry else None

    def record(self, key: str, due: datetime, outcome: str) -> None:
        """Record that the due time `due` of `key` was handled (started or skipped), and save at once."""
        with self._lock:
            entry = self._data.setdefault(key, {})
            entry.update({"last_due": due.astimezone(UTC).isoformat(), "outcome": outcome})
            self._save()

    def record_run(self, key: str, due: datetime, outcome: str, exit_code: int | None = None) -> None:
        """Record how the run for `due` ended; never moves `last_due` (a later due time may be handled already)."""
        with self._lock:
            entry = self._data.setdefault(key, {"last_due": due.astimezone(UTC).isoformat(), "outcome": "started"})
            entry["last_run"] = {"due": due.astimezone(UTC).isoformat(), "outcome": outcome, "exit_code": exit_code}
            self._save()

    def _save(self) -> None:
        # Write a temporary file, fsync it, rename it over the old one: a crash leaves old or new, never half.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        payload = json.dumps({"version": STATE_VERSION, "playbooks": self._data}, indent=2, sort_keys=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(payload + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- scheduled playbooks --------------------------------------------------------------------

@dataclass
class ScheduledPlaybook:
    """A playbook the scheduler starts: on a cron `schedule:` or when its window opens (`on-open`)."""

    path: Path
    key: str
    name: str
    cron: CronSeries | None = None
    window: WindowSchedule | None = None

    @property
    def on_open(self) -> bool:
        """Started when its window opens (rather than on a cron schedule)."""
        return self.cron is None

    def due(self, now: datetime, grace: timedelta) -> datetime | None:
        """The due time to act on at `now`: the latest cron time within the grace period, or the current window's opening."""
        if self.cron is not None:
            latest = self.cron.latest(now)
            return latest if latest is not None and now - latest <= grace else None
        assert self.window is not None
        span = self.window.current(now)
        return span[0] if span else None

    def next_due(self, now: datetime) -> datetime | None:
        """The next due time after `now`."""
        if self.cron is not None:
            return next(self.cron.after(now), None)
        assert self.window is not None
        upcoming = self.window.next_openings(now, 1)
        return upcoming[0][0] if upcoming else None


def scheduled_playbook(path: Path) -> ScheduledPlaybook | None:
    """Load a playbook and say how it is scheduled (None: not scheduled); raises RunbookError when invalid."""
    playbook = load_playbook(path)
    window = resolve_window(playbook, path)
    on_open = playbook.schedule == "on-open" or (window is not None and window.window.schedule == "on-open")
    if playbook.schedule and playbook.schedule != "on-open":
        # A cron schedule runs in the window's timezone when there is a window, else in UTC.
        tz = window.tz if window is not None else ZoneInfo("UTC")
        return ScheduledPlaybook(path, path.name, playbook.runbook, CronSeries(playbook.schedule, tz), window)
    if on_open:
        if window is None:
            source = playbook._source
            raise RunbookError("`schedule: on-open` needs a `window:`",
                               location=source.locate(("schedule",)) if source is not None else Location(str(path)),
                               hint="add a window, or give `schedule:` a cron expression")
        return ScheduledPlaybook(path, path.name, playbook.runbook, None, window)
    return None


# --- the scheduler --------------------------------------------------------------------------

class Scheduler:
    """Scans a directory of playbooks and starts each one when it is due (see docs/windows.md)."""

    def __init__(self, directory: str | os.PathLike, run_playbook: RunFn, clock: Clock, state_dir: str | os.PathLike,
                 log: LogFn | None = None, *, grace: float = 600.0, interval: float = 30.0, threaded: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise RunbookError("playbook directory not found", location=Location(str(directory)),
                               hint="pass the directory that holds the playbooks with --dir")
        self.run_playbook = run_playbook
        self.clock = clock
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log: LogFn = log or _no_log
        self.grace = timedelta(seconds=grace)
        self.interval = interval
        self.threaded = threaded
        self.state = SchedulerState(self.state_dir / STATE_FILE, self.log)
        self._cache: dict[Path, tuple[tuple, ScheduledPlaybook | None]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._threads_lock = threading.Lock()

    # scanning

    def _fingerprint(self, path: Path) -> tuple:
        # A playbook's schedule depends on its own file and on the windows files it may name.
        files = [path] + [d / n for d in (self.directory, self.directory.parent) for n in WINDOWS_FILES]
        out: list[tuple[str, int | None, int | None, int | None]] = []
        for f in files:
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(f), None, None, None))
        return tuple(out)

    def scan(self) -> list[ScheduledPlaybook]:
        """The scheduled playbooks of the directory; files that fail to load are logged (once per change) and skipped."""
        paths = sorted(p for p in self.directory.iterdir()
                       if p.suffix in (".yml", ".yaml") and p.name not in WINDOWS_FILES and p.is_file())
        found: list[ScheduledPlaybook] = []
        for path in paths:
            fingerprint = self._fingerprint(path)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == fingerprint:
                entry = cached[1]
            else:
                entry = None
                try:
                    entry = scheduled_playbook(path)
                except RunbookError as exc:
                    self.log("schedule.load_failed", {"playbook": str(path), "error": str(exc)})
                except Exception as exc:  # one bad file must not stop the scheduler
                    self.log("schedule.load_failed", {"playbook": str(path), "error": f"{type(exc).__name__}: {exc}"})
                self._cache[path] = (fingerprint, entry)
            if entry is not None:
                found.append(entry)
        for gone in set(self._cache) - set(paths):
            del self._cache[gone]
        return found

    def upcoming(self) -> list[tuple[ScheduledPlaybook, datetime | None]]:
        """Each scheduled playbook with its next due time after now."""
        now = self.clock.now()
        return [(sp, sp.next_due(now)) for sp in self.scan()]

    # running

    def running(self) -> set[str]:
        """Keys (file names) of the playbooks this scheduler is running now."""
        with self._threads_lock:
            return {k for k, t in self._threads.items() if t.is_alive()}

    def tick(self) -> list[str]:
        """Start every playbook due now and not yet handled; return the keys started."""
        now = self.clock.now()
        started: list[str] = []
        for sp in self.scan():
            due = sp.due(now, self.grace)
            if due is None:
                continue
            last = self.state.last_due(sp.key)
            if last is not None and due <= last:
                continue  # this opening or cron time was already handled, maybe before a restart
            if self._start(sp, due, now):
                started.append(sp.key)
        return started

    def _start(self, sp: ScheduledPlaybook, due: datetime, now: datetime) -> bool:
        fields: dict[str, Any] = {"playbook": str(sp.path), "runbook": sp.name, "due": due.isoformat()}
        if sp.cron is not None and sp.window is not None and not sp.window.is_open(now):
            self.state.record(sp.key, due, "skipped-window-closed")
            self.log("schedule.window_closed", fields)
            return False
        if sp.key in self.running():
            self.state.record(sp.key, due, "skipped-overlap")
            self.log("schedule.already_running", {**fields, "holder": "this scheduler"})
            return False
        lock = PlaybookLock(lock_path(self.state_dir, sp.key))
        if not lock.acquire():
            self.state.record(sp.key, due, "skipped-overlap")
            self.log("schedule.already_running", {**fields, "holder": "another process", "lock": str(lock.path)})
            return False
        # Recorded before the run: a run cut short by a crash is continued with `runbook resume`, not re-run.
        self.state.record(sp.key, due, "started")
        self.log("schedule.run_started", fields)
        if self.threaded:
            thread = threading.Thread(target=self._run, args=(sp, due, lock, fields), name=f"runbook:{sp.key}", daemon=True)
            with self._threads_lock:
                self._threads[sp.key] = thread
            thread.start()
        else:
            self._run(sp, due, lock, fields)
        return True

    def _run(self, sp: ScheduledPlaybook, due: datetime, lock: PlaybookLock, fields: dict[str, Any]) -> None:
        try:
            try:
                code = self.run_playbook(sp.path)
            except Exception as exc:  # a failing run is logged; the scheduler carries on
                self.state.record_run(sp.key, due, "failed")
                self.log("schedule.run_failed", {**fields, "error": f"{type(exc).__name__}: {exc}"})
                return
            outcome = "finished" if code == 0 else "failed"
            self.state.record_run(sp.key, due, outcome, code)
            self.log("schedule.run_finished" if code == 0 else "schedule.run_failed", {**fields, "exit_code": code})
        finally:
            lock.release()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the runs in progress to finish."""
        with self._threads_lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
        with self._threads_lock:
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}

    def run_forever(self, stop_event: threading.Event) -> None:
        """Tick, then sleep on the clock, until `stop_event` is set; then wait for runs in progress."""
        self.log("scheduler.started", {"directory": str(self.directory), "state_dir": str(self.state_dir),
                                       "interval": self.interval})
        while not stop_event.is_set():
            try:
                self.tick()
            except Exception as exc:  # e.g. the directory vanished for a moment: log and try again
                self.log("scheduler.tick_failed", {"error": f"{type(exc).__name__}: {exc}"})
            if stop_event.is_set():
                break
            self.clock.sleep(self.interval, stop_event)
        running = sorted(self.running())
        self.log("scheduler.stopping", {"waiting_for": running})
        self.join()
        self.log("scheduler.stopped", {})
