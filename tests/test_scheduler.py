"""The scheduler core, driven by a fake clock and a fake run callable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import pytest

from runbook.errors import RunbookError
from runbook.scheduler import STATE_FILE, PlaybookLock, Scheduler, lock_path
from runbook.window import FakeClock, SystemClock

UTC = UTC


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def playbook(directory: Path, filename: str, extra: str, name: str | None = None) -> Path:
    path = directory / filename
    path.write_text(f"runbook: {name or path.stem}\n" + textwrap.dedent(extra).lstrip()
                    + "steps:\n  - name: hello\n    shell: echo hello\n")
    return path


class Recorder:
    """A fake run_playbook: records calls, returns a fixed code, or raises, or blocks until released."""

    def __init__(self, code: int = 0, error: Exception | None = None, block: bool = False):
        self.calls: list[Path] = []
        self.code = code
        self.error = error
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, path: Path) -> int:
        self.calls.append(path)
        self.started.set()
        assert self.release.wait(10), "test run was never released"
        if self.error is not None:
            raise self.error
        return self.code


class Log:
    """A fake log callback."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((event, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "playbooks").mkdir()
    return tmp_path / "playbooks", tmp_path / "state"


def make(dirs: tuple[Path, Path], run: Recorder, clock: FakeClock, log: Log | None = None, **kw: Any) -> Scheduler:
    return Scheduler(dirs[0], run, clock, dirs[1], log, **kw)


def test_starts_a_due_cron_playbook_once_and_not_again_after_a_restart(dirs: tuple[Path, Path]) -> None:
    path = playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    clock = FakeClock(utc(2024, 1, 1, 10, 0, 30))
    run, log = Recorder(), Log()
    scheduler = make(dirs, run, clock, log)
    assert scheduler.tick() == ["hourly.yml"]
    scheduler.join()
    assert run.calls == [path]
    assert "schedule.run_started" in log.names() and "schedule.run_finished" in log.names()

    clock.advance(60)
    assert scheduler.tick() == []  # same due time: already handled
    restarted = make(dirs, run, clock)
    assert restarted.tick() == []  # the state on disk remembers it
    state = json.loads((dirs[1] / STATE_FILE).read_text())
    assert state["playbooks"]["hourly.yml"]["last_due"] == "2024-01-01T10:00:00+00:00"
    assert state["playbooks"]["hourly.yml"]["last_run"] == {
        "due": "2024-01-01T10:00:00+00:00", "outcome": "finished", "exit_code": 0}

    clock.set(utc(2024, 1, 1, 11, 0, 5))
    assert restarted.tick() == ["hourly.yml"]
    restarted.join()
    assert len(run.calls) == 2


def test_a_cron_time_older_than_the_grace_period_is_not_run(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    run = Recorder()
    assert make(dirs, run, FakeClock(utc(2024, 1, 1, 10, 11)), grace=600).tick() == []
    assert make(dirs, run, FakeClock(utc(2024, 1, 1, 10, 9)), grace=600).tick() == ["hourly.yml"]


def test_on_open_playbook_starts_when_its_window_opens_once_per_window(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "patch.yml", """
        window: {cron: "0 2 * * SAT", duration: 2h, timezone: Europe/Berlin}
        schedule: on-open
        """)
    clock = FakeClock(utc(2024, 1, 5, 12))  # Friday: closed
    run = Recorder()
    scheduler = make(dirs, run, clock)
    assert scheduler.tick() == []
    clock.set(utc(2024, 1, 6, 1, 0, 10))  # Saturday 02:00:10 in Berlin
    assert scheduler.tick() == ["patch.yml"]
    scheduler.join()
    clock.set(utc(2024, 1, 6, 2, 30))  # still the same window
    assert scheduler.tick() == [] and make(dirs, run, clock).tick() == []
    clock.set(utc(2024, 1, 13, 1, 30))  # the next Saturday's window
    assert scheduler.tick() == ["patch.yml"]
    scheduler.join()
    assert len(run.calls) == 2


def test_named_window_with_schedule_on_open_from_windows_yml(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "windows.yml").write_text('windows:\n  nightly: {cron: "0 1 * * *", duration: 1h, schedule: on-open}\n')
    playbook(dirs[0], "rotate.yaml", "window: nightly\n")
    playbook(dirs[0], "manual.yml", "")  # not scheduled at all
    run = Recorder()
    scheduler = make(dirs, run, FakeClock(utc(2024, 1, 1, 1, 20)))
    assert scheduler.tick() == ["rotate.yaml"]  # windows.yml itself is not a playbook
    scheduler.join()
    assert [p.name for p in run.calls] == ["rotate.yaml"]


def test_cron_schedule_is_skipped_while_its_window_is_closed(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "p.yml", """
        window: {cron: "0 2 * * SAT", duration: 2h}
        schedule: "0 * * * *"
        """)
    run, log = Recorder(), Log()
    scheduler = make(dirs, run, FakeClock(utc(2024, 1, 3, 10, 1)), log)
    assert scheduler.tick() == [] and run.calls == []
    assert log.names() == ["schedule.window_closed"]
    scheduler.clock.set(utc(2024, 1, 6, 3, 0, 30))  # type: ignore[attr-defined]
    assert scheduler.tick() == ["p.yml"]
    scheduler.join()


def test_skips_when_the_lock_is_held_by_another_process(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    lock = lock_path(dirs[1], "hourly.yml")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run, log = Recorder(), Log()
        scheduler = make(dirs, run, FakeClock(utc(2024, 1, 1, 10, 1)), log)
        assert scheduler.tick() == []
        assert run.calls == []
        event, fields = log.events[-1]
        assert event == "schedule.already_running" and fields["holder"] == "another process"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    # Skipped for this due time (no retry storm); the next one runs, the lock being free again.
    scheduler.clock.set(utc(2024, 1, 1, 11, 1))  # type: ignore[attr-defined]
    assert scheduler.tick() == ["hourly.yml"]
    scheduler.join()


def test_skips_an_overlapping_start_of_its_own_long_run(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    clock = FakeClock(utc(2024, 1, 1, 10, 0, 5))
    run, log = Recorder(block=True), Log()
    scheduler = make(dirs, run, clock, log)
    assert scheduler.tick() == ["hourly.yml"]
    assert run.started.wait(5)
    clock.set(utc(2024, 1, 1, 11, 0, 5))  # the next hour while the first run still goes on
    assert scheduler.tick() == []
    assert ("schedule.already_running", "this scheduler") in [(e, f.get("holder")) for e, f in log.events]
    run.release.set()
    scheduler.join()
    assert len(run.calls) == 1
    # The first run ending late must not make the skipped 11:00 start look unhandled.
    assert scheduler.tick() == []
    state = json.loads((dirs[1] / STATE_FILE).read_text())["playbooks"]["hourly.yml"]
    assert state["last_due"] == "2024-01-01T11:00:00+00:00" and state["outcome"] == "skipped-overlap"
    assert state["last_run"]["due"] == "2024-01-01T10:00:00+00:00"
    assert not lock_path(dirs[1], "hourly.yml").exists() or PlaybookLock(lock_path(dirs[1], "hourly.yml")).acquire()


def test_lock_handles_exclude_each_other() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        first, second = PlaybookLock(Path(d) / "x.lock"), PlaybookLock(Path(d) / "x.lock")
        assert first.acquire() and not second.acquire()
        first.release()
        assert second.acquire() and second.held
        second.release()


def test_survives_a_raising_and_a_failing_run(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "a-raises.yml", 'schedule: "0 * * * *"\n')
    playbook(dirs[0], "b-ok.yml", 'schedule: "0 * * * *"\n')

    def run(path: Path) -> int:
        calls.append(path.name)
        if path.name == "a-raises.yml":
            raise RuntimeError("boom")
        return 2 if len(calls) > 2 else 0

    calls: list[str] = []
    log = Log()
    clock = FakeClock(utc(2024, 1, 1, 10, 0, 5))
    scheduler = Scheduler(dirs[0], run, clock, dirs[1], log)
    assert scheduler.tick() == ["a-raises.yml", "b-ok.yml"]
    scheduler.join()
    failed = [f for e, f in log.events if e == "schedule.run_failed"]
    assert [f["error"] for f in failed] == ["RuntimeError: boom"]
    clock.set(utc(2024, 1, 1, 11, 0, 5))
    assert scheduler.tick() == ["a-raises.yml", "b-ok.yml"]
    scheduler.join()
    assert sorted(calls) == ["a-raises.yml", "a-raises.yml", "b-ok.yml", "b-ok.yml"]
    assert any(e == "schedule.run_failed" and f.get("exit_code") == 2 for e, f in log.events)
    # A failed run still counts as run: it is not retried for the same due time.
    assert scheduler.tick() == []


def test_a_broken_playbook_is_logged_once_and_the_others_still_run(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "broken.yml").write_text("runbook: broken\nsteps: [\n")
    playbook(dirs[0], "unknown-window.yml", "window: nope\nschedule: on-open\n")
    playbook(dirs[0], "on-open-without-window.yml", "schedule: on-open\n")
    playbook(dirs[0], "good.yml", 'schedule: "0 * * * *"\n')
    run, log = Recorder(), Log()
    scheduler = make(dirs, run, FakeClock(utc(2024, 1, 1, 10, 0, 5)), log)
    assert scheduler.tick() == ["good.yml"]
    scheduler.join()
    assert scheduler.tick() == []
    failures = sorted(Path(f["playbook"]).name for e, f in log.events if e == "schedule.load_failed")
    assert failures == ["broken.yml", "on-open-without-window.yml", "unknown-window.yml"]  # once each
    (dirs[0] / "broken.yml").write_text("runbook: broken\nsteps: [oops\n")  # changed: reported again
    scheduler.tick()
    assert sum(1 for e, _ in log.events if e == "schedule.load_failed") == 4


def test_a_corrupt_state_file_is_moved_aside_and_logged(dirs: tuple[Path, Path]) -> None:
    dirs[1].mkdir()
    (dirs[1] / STATE_FILE).write_text("{not json")
    log = Log()
    make(dirs, Recorder(), FakeClock(utc(2024, 1, 1)), log)
    assert log.names() == ["schedule.state_corrupt"]
    assert (dirs[1] / f"{STATE_FILE}.corrupt").read_text() == "{not json"


def test_run_forever_ticks_until_the_stop_event_is_set(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "quarter.yml", 'schedule: "*/15 * * * *"\n')
    stop = threading.Event()

    class StoppingClock(FakeClock):
        def sleep(self, seconds: float, stop_event: threading.Event | None = None) -> None:
            super().sleep(seconds, stop_event)
            if len(self.sleeps) == 8:  # the SIGTERM handler would set it; here the clock does
                stop.set()

    clock = StoppingClock(utc(2024, 1, 1, 10, 0, 1))
    run, log = Recorder(), Log()
    # Inline runs: with threads, fake time outruns the runs and the next start is (rightly) skipped as an overlap.
    scheduler = make(dirs, run, clock, log, interval=300, threaded=False)
    worker = threading.Thread(target=scheduler.run_forever, args=(stop,))
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert clock.sleeps == [300] * 8
    assert len(run.calls) == 3  # 10:00, 10:15, 10:30 within 40 minutes of fake time
    assert log.names()[0] == "scheduler.started" and log.names()[-1] == "scheduler.stopped"


def test_run_forever_waits_for_runs_in_progress_before_returning(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    stop = threading.Event()
    run, log = Recorder(block=True), Log()
    scheduler = make(dirs, run, FakeClock(utc(2024, 1, 1, 10, 0, 1)), log)
    worker = threading.Thread(target=scheduler.run_forever, args=(stop,))
    worker.start()
    assert run.started.wait(5)
    stop.set()
    worker.join(0.2)
    assert worker.is_alive()  # still waiting for the run
    run.release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert ("scheduler.stopping", {"waiting_for": ["hourly.yml"]}) in log.events


def test_system_clock_sleep_returns_at_once_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    done = threading.Event()
    t = threading.Thread(target=lambda: (SystemClock().sleep(3600, stop), done.set()))
    t.start()
    t.join(5)
    assert done.is_set()
    assert SystemClock().now().tzinfo == UTC


def test_upcoming_lists_the_next_due_times(dirs: tuple[Path, Path]) -> None:
    playbook(dirs[0], "hourly.yml", 'schedule: "0 * * * *"\n')
    playbook(dirs[0], "patch.yml", 'window: {cron: "0 2 * * SAT", duration: 2h}\nschedule: on-open\n')
    scheduler = make(dirs, Recorder(), FakeClock(utc(2024, 1, 3, 10, 30)))
    assert {sp.key: due for sp, due in scheduler.upcoming()} == {
        "hourly.yml": utc(2024, 1, 3, 11), "patch.yml": utc(2024, 1, 6, 2)}


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunbookError, match="not found"):
        Scheduler(tmp_path / "nope", Recorder(), FakeClock(utc(2024, 1, 1)), tmp_path / "state")
