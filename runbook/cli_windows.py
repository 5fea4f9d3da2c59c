"""The `runbook windows` and `runbook schedule` commands' work, kept out of the thin CLI module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from runbook.errors import Location, Problem, WindowError, did_you_mean


def _schedule_for(target: str | None):
    """The window schedule of a playbook file or of a name in windows.yml (cwd, then playbooks/)."""
    from runbook.loader import load_playbook
    from runbook.window import WindowSchedule, load_windows_file, resolve_window

    if target and Path(target).is_file():
        pb = load_playbook(target)
        schedule = resolve_window(pb, target)
        if schedule is None:
            return f"playbook `{pb.runbook}` ({target}): no window: runs any time"
        return schedule
    files = [p for p in (Path("windows.yml"), Path("playbooks/windows.yml")) if p.is_file()]
    if not files:
        raise WindowError([Problem("no windows.yml here or in playbooks/", None,
                                   "name a playbook, or run from the directory that holds windows.yml")])
    known: list[str] = []
    for f in files:
        defined = load_windows_file(f)
        if target is None:
            return [WindowSchedule(w, n) for n, w in defined.items()]
        if target in defined:
            return WindowSchedule(defined[target], target)
        known.extend(defined)
    raise WindowError([Problem(f"unknown window `{target}`", Location(str(files[0])),
                               did_you_mean(target or "", known) or f"known windows: {', '.join(known)}")])


def show_windows(target: str | None, count: int) -> str:
    """Open-now status and the next openings of one window, or of every named window."""
    from runbook.window import format_duration, format_local_and_utc

    found = _schedule_for(target)
    if isinstance(found, str):
        return found   # a playbook without a window: nothing to list, and nothing wrong
    schedules = found if isinstance(found, list) else [found]
    now = datetime.now(UTC)
    lines: list[str] = []
    for s in schedules:
        current = s.current(now)
        state = (f"OPEN now, closes {format_local_and_utc(current[1], s.tz)}" if current else "closed now")
        lines.append(f"{s.describe()}: {state}")
        for opening, closing in s.next_openings(now, count):
            lines.append(f"  opens  {format_local_and_utc(opening, s.tz)}  closes {format_local_and_utc(closing, s.tz)}"
                         f"  for {format_duration((closing - opening).total_seconds())}")
        lines.append("")
    return "\n".join(lines).rstrip()


_OUTPUT_LOCK = threading.Lock()   # whole lines from concurrent runs, never a mix of two in one line


def run_prefixed(argv: list[str], prefix: str) -> int:
    """Run a command with each line of its stdout and stderr prefixed (runs started together stay readable)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relays = [threading.Thread(target=_relay, args=(stream, prefix, target), daemon=True)
              for stream, target in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in relays:
        t.start()
    for t in relays:
        t.join()
    return proc.wait()


def _relay(stream: Any, prefix: str, target: Any) -> None:
    """Copy lines from a child's pipe to our stream, each with the run's prefix."""
    from runbook.console import visible

    with stream:
        for raw in iter(stream.readline, b""):
            # Control characters escaped: a line must not rewrite the prefix (\r) or drive the terminal.
            line = visible(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            with _OUTPUT_LOCK:
                target.write(f"{prefix}{line}\n")
                target.flush()


def run_scheduler(directory: str, inventory: list[str] | None, state_dir: str | None, interval: float,
                  audit_log: str | None, once: bool, passthrough: list[str] | None = None) -> int:
    """Run the foreground scheduler until SIGTERM or SIGINT; each run is a `runbook run` subprocess."""
    from runbook.audit import AuditTrail, default_audit_path
    from runbook.scheduler import Scheduler
    from runbook.window import SystemClock

    base = Path(directory)
    state = Path(state_dir) if state_dir else base / ".runbook" / "schedule"
    trail = AuditTrail(Path(audit_log) if audit_log else default_audit_path(str(base / "x.yml")))
    # Unique per start: a restart with the same pid (PID 1 in a container) must not restart this id's
    # sequence numbers at 1, which `audit verify` reports as a broken sequence.
    scheduler_id = f"scheduler-{os.getpid()}-{os.urandom(3).hex()}"

    def log(event: str, fields: dict[str, Any]) -> None:
        trail.append(scheduler_id, event, fields)
        with _OUTPUT_LOCK:
            print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {event} "
                  + " ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def run_playbook(path: Path) -> int:
        argv = [sys.executable, "-m", "runbook", "run", str(path), "--yes"]
        for inv in inventory or []:
            argv += ["-i", inv]
        if audit_log:
            argv += ["--audit-log", audit_log]
        argv += passthrough or []
        return run_prefixed(argv, f"[{path.stem}] ")

    scheduler = Scheduler(base, run_playbook, SystemClock(), state, log, interval=interval)
    if once:
        scheduler.tick()
        scheduler.join()
        return 0
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log("scheduler.signal", {"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scheduler.run_forever(stop)
    return 0
