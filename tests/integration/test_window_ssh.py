"""Maintenance windows enforced on real runs: refusal, --ignore-window, a window closing mid-run, max_duration, schedule."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from runbook.console import ConsoleView, make_console
from runbook.events import Observer, RunInfo
from runbook.loader import load_playbook
from runbook.results import RunResult, Status, TaskResult
from runbook.runner import RunRequest, execute, prepare
from runbook.window import FakeClock, WindowGuard, resolve_window
from tests.helpers import cli, records
from tests.helpers import cli_env as env
from tests.sshd import SSHHost, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

UTC = UTC


def closed_window(tz: str) -> tuple[str, datetime]:
    """A daily 1h window opening 12 hours from now (so closed now), and its next opening (aware, in tz)."""
    now = datetime.now(ZoneInfo(tz))
    hour = (now.hour + 12) % 24
    opening = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if opening <= now:
        opening += timedelta(days=1)
    return f"0 {hour} * * *", opening


MARKER_PLAYBOOK = """\
runbook: windowed
window: {{cron: "{cron}", duration: 1h, timezone: {tz}}}
steps:
  - name: mark
    shell: echo ran >> window-marker
"""


@pytest.fixture
def site(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> dict[str, Path]:
    """Inventory, known_hosts and trail paths for the test hosts."""
    return {"inventory": write_inventory(tmp_path / "inventory.yml", clean_ssh_hosts),
            "known_hosts": write_known_hosts(tmp_path / "known_hosts", clean_ssh_hosts),
            "trail": tmp_path / "audit.jsonl"}


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin"])
def test_refuses_outside_the_window_with_exit_5(site: dict[str, Path], clean_ssh_hosts: list[SSHHost],
                                                tmp_path: Path, tz: str) -> None:
    cron, opening = closed_window(tz)
    playbook = tmp_path / "windowed.yml"
    playbook.write_text(MARKER_PLAYBOOK.format(cron=cron, tz=tz))
    proc = cli("run", str(playbook), "-i", str(site["inventory"]), "--known-hosts", str(site["known_hosts"]),
               "--audit-log", str(site["trail"]))
    assert proc.returncode == 5, proc.stderr
    utc = opening.astimezone(UTC)
    assert f"{utc:%Y-%m-%d %H:%M} UTC" in proc.stderr
    if tz != "UTC":
        assert f"{opening:%Y-%m-%d %H:%M} {opening.tzname()} (Europe/Berlin) = " in proc.stderr
    assert "is closed" in proc.stderr and "--ignore-window" in proc.stderr
    assert f"{playbook}:2:" in proc.stderr          # located at the playbook's window
    for h in clean_ssh_hosts:
        assert not (h.home / "window-marker").exists()
    assert not site["trail"].exists()              # a refused run starts nothing


def test_ignore_window_needs_a_reason_and_is_recorded(site: dict[str, Path], clean_ssh_hosts: list[SSHHost],
                                                      tmp_path: Path) -> None:
    cron, _ = closed_window("UTC")
    playbook = tmp_path / "windowed.yml"
    playbook.write_text(MARKER_PLAYBOOK.format(cron=cron, tz="UTC"))
    common = ["run", str(playbook), "-i", str(site["inventory"]), "--known-hosts", str(site["known_hosts"]),
              "--audit-log", str(site["trail"]), "--operator", "carol"]
    no_reason = cli(*common, "--ignore-window")
    assert no_reason.returncode == 4, no_reason.stderr
    assert "--reason" in no_reason.stderr
    blank = cli(*common, "--ignore-window", "--reason", "  ")
    assert blank.returncode == 4
    for h in clean_ssh_hosts:
        assert not (h.home / "window-marker").exists()
    ok = cli(*common, "--ignore-window", "--reason", "CVE-2026-0001 emergency patch")
    assert ok.returncode == 0, ok.stderr
    for h in clean_ssh_hosts:
        assert (h.home / "window-marker").read_text() == "ran\n"
    started = [r for r in records(site["trail"]) if r["event"] == "run.started"]
    assert len(started) == 1
    assert started[0]["details"] == {"ignore_window": True, "reason": "CVE-2026-0001 emergency patch"}
    assert started[0]["operator"] == "carol"
    state = json.loads(next((site["trail"].parent / "runs").glob("*.json")).read_text())
    assert state["details"]["ignore_window"] is True and state["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# The window closes during a run (injected clock)
# ---------------------------------------------------------------------------------------------

CLOSING_PLAYBOOK = """\
runbook: closing
window: {cron: "0 2 * * *", duration: 1h, timezone: UTC}
steps:
  - name: one
    shell: echo run >> count-one
  - name: two
    # A barrier: every host waits here until all have arrived, so all run step two when the window closes.
    shell: >-
      touch {{ barrier }}/{{ host.name }}; i=0;
      while [ "$(ls {{ barrier }} | wc -l)" -lt {{ groups['all'] | length }} ] && [ $i -lt 400 ];
      do sleep 0.05; i=$((i+1)); done; echo run >> count-two
  - name: three
    shell: echo run >> count-three
  - name: four
    shell: echo run >> count-four
    max_duration: 10m
"""

STEPS = ("one", "two", "three", "four")


class CloseWindowAfter(Observer):
    """Moves the fake clock past the window's close as soon as the given step finishes on any host."""

    critical = True   # called in the emitting thread, before the task's successors can start

    def __init__(self, clock: FakeClock, step_id: str, to: datetime):
        self.clock, self.step_id, self.to = clock, step_id, to
        self.closed_by: str | None = None

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        if result.step_id == self.step_id and self.closed_by is None:
            self.clock.set(self.to)
            self.closed_by = result.host


@pytest.fixture
def barrier() -> Iterator[Path]:
    """A directory every test user can write to (under /tmp: pytest's own tmp dirs are private)."""
    d = Path(tempfile.mkdtemp(prefix="rb-barrier-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def counts(host: SSHHost) -> dict[str, int]:
    """How many times each step ran on a host."""
    return {s: len((host.home / f"count-{s}").read_text().splitlines()) if (host.home / f"count-{s}").exists() else 0
            for s in STEPS}


def library_run(playbook: Path, site: dict[str, Path], clock: FakeClock, extra: dict[str, Any],
                observers: list[Observer]) -> tuple[RunResult, str]:
    """Run through the library with a window guard on the fake clock; return the result and console text."""
    schedule = resolve_window(load_playbook(playbook), playbook)
    assert schedule is not None
    request = RunRequest(known_hosts=str(site["known_hosts"]), audit_log=site["trail"], extra_vars=extra,
                         window_guard=WindowGuard(schedule, clock), observers=list(observers))
    prepared = prepare(playbook, site["inventory"], request)
    out = io.StringIO()
    request.observers.append(ConsoleView(make_console(out, color=False), prepared.redactor, live=False))
    return execute(prepared, request), out.getvalue()


def test_window_closing_mid_run_defers_the_rest_and_resume_completes_it(
        site: dict[str, Path], clean_ssh_hosts: list[SSHHost], tmp_path: Path, barrier: Path) -> None:
    hosts = clean_ssh_hosts
    playbook = tmp_path / "closing.yml"
    playbook.write_text(CLOSING_PLAYBOOK)
    clock = FakeClock(datetime(2026, 1, 10, 2, 10, tzinfo=UTC))
    closer = CloseWindowAfter(clock, "two", datetime(2026, 1, 10, 3, 30, tzinfo=UTC))
    result, console = library_run(playbook, site, clock, {"barrier": str(barrier)}, [closer])

    assert closer.closed_by is not None
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 0, "four": 0}
        # Step two was running everywhere when the window closed: it finished; nothing new started.
        assert result.get(h.name, "two").status == Status.CHANGED
        for step in ("three", "four"):
            r = result.get(h.name, step)
            assert r is not None and r.status == Status.DEFERRED
            assert "maintenance window closed" in r.message
    assert result.stop_reason == "maintenance window closed"
    assert result.totals()["deferred"] == 2 * len(hosts)
    assert result.exit_code() == 5  # unfinished because the window closed: the documented window exit code
    # The summary says so: a deferred column in the recap and the stop reason.
    assert "deferred" in console and "stopped: maintenance window closed" in console
    assert "runbook resume" in console
    state = json.loads((site["trail"].parent / "runs" / f"{result.run_id}.json").read_text())
    assert state["status"] == "deferred"
    assert {t["status"] for k, t in state["tasks"].items() if k.startswith(("three@", "four@"))} == {"deferred"}
    recs = records(site["trail"])
    assert any(r["event"] == "notice" and "window closed" in r["message"] for r in recs)
    assert recs[-1]["event"] == "run.finished" and recs[-1]["totals"]["deferred"] == 2 * len(hosts)

    # The real window (02:00-03:00 UTC) is closed too, as a rule: the plain resume is refused and the
    # override runs only the deferred tasks. Inside that hour the plain resume runs some or all of them
    # itself (`four` needs 10 minutes left), and the run to continue is then that resume, as its hint says.
    override = ["--ignore-window", "--reason", "test"]
    where = ["--audit-log", str(site["trail"]), "--known-hosts", str(site["known_hosts"])]
    continued = result.run_id
    last = cli("resume", continued, *where)
    if last.returncode != 0:
        assert last.returncode == 5, last.stderr
        last = cli("resume", continued, *override, *where)
        if last.returncode == 4:
            follow = re.search(r"`runbook resume (\S+)` continues from there", last.stderr)
            assert follow and datetime.now(UTC).hour in (2, 3), last.stderr
            continued = follow.group(1)
            last = cli("resume", continued, *override, *where)
        assert last.returncode == 0, last.stderr
        details = [r for r in records(site["trail"]) if r["event"] == "run.started"][-1]["details"]
        assert details["resumed_from"] == continued
        assert details["ignore_window"] is True and details["reason"] == "test"
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 1, "four": 1}
    # The run is resumed already: resuming it again is refused, and nothing runs twice.
    again = cli("resume", result.run_id, *override, "--audit-log", str(site["trail"]),
                "--known-hosts", str(site["known_hosts"]))
    assert again.returncode == 4 and "was already resumed by run" in again.stderr, again.stderr
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 1, "four": 1}
    assert cli("audit", "verify", "--audit-log", str(site["trail"])).returncode == 0


def test_library_resume_with_an_open_window(site: dict[str, Path], clean_ssh_hosts: list[SSHHost],
                                            tmp_path: Path, barrier: Path) -> None:
    from runbook.state import load_state, registers_from, resumable

    playbook = tmp_path / "closing.yml"
    playbook.write_text(CLOSING_PLAYBOOK)
    clock = FakeClock(datetime(2026, 1, 10, 2, 10, tzinfo=UTC))
    first, _ = library_run(playbook, site, clock, {"barrier": str(barrier)},
                           [CloseWindowAfter(clock, "two", datetime(2026, 1, 10, 3, 5, tzinfo=UTC))])
    assert first.totals()["deferred"] == 2 * len(clean_ssh_hosts)
    # The next night's window: a fresh guard on an open window continues the deferred tasks.
    doc = load_state(site["trail"].parent / "runs", first.run_id)
    done, _ = resumable(doc)
    assert set(done) == {(s, h.name) for s in ("one", "two") for h in clean_ssh_hosts}
    schedule = resolve_window(load_playbook(playbook), playbook)
    next_night = FakeClock(datetime(2026, 1, 11, 2, 0, tzinfo=UTC))
    request = RunRequest(mode="resume", known_hosts=str(site["known_hosts"]), audit_log=site["trail"],
                         extra_vars={"barrier": str(barrier)}, window_guard=WindowGuard(schedule, next_night),
                         previous=done, details={"resumed_from": first.run_id})
    prepared = prepare(playbook, site["inventory"], request)
    request.registers = registers_from(prepared.playbook, done)
    second = execute(prepared, request)
    assert second.ok and "deferred" not in second.totals()
    for h in clean_ssh_hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 1, "four": 1}


@pytest.mark.parametrize("start, runs_four", [((2, 10), True), ((2, 51), False)], ids=["fits", "too-late"])
def test_max_duration_keeps_a_step_from_starting_too_close_to_the_close(
        site: dict[str, Path], clean_ssh_hosts: list[SSHHost], tmp_path: Path, barrier: Path,
        start: tuple[int, int], runs_four: bool) -> None:
    # Step four declares max_duration 10m; the window closes at 03:00 and the fake clock stands still.
    playbook = tmp_path / "closing.yml"
    playbook.write_text(CLOSING_PLAYBOOK)
    clock = FakeClock(datetime(2026, 1, 10, *start, tzinfo=UTC))
    result, console = library_run(playbook, site, clock, {"barrier": str(barrier)}, [])
    for h in clean_ssh_hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 1, "four": 1 if runs_four else 0}
        assert result.get(h.name, "four").status == (Status.CHANGED if runs_four else Status.DEFERRED)
        if not runs_four:
            assert "max_duration" in result.get(h.name, "four").message
    # Only the step that could not fit is deferred; the window itself did not close, so the run was not stopped.
    assert result.stop_reason is None
    assert ("four: deferred — not started: max_duration" in console) is (not runs_four)
    state = json.loads((site["trail"].parent / "runs" / f"{result.run_id}.json").read_text())
    assert state["status"] == ("ok" if runs_four else "deferred")


def test_windows_command_shows_state_and_openings(tmp_path: Path) -> None:
    cron, opening = closed_window("Europe/Berlin")
    closed = tmp_path / "closed.yml"
    closed.write_text(MARKER_PLAYBOOK.format(cron=cron, tz="Europe/Berlin"))
    proc = cli("windows", str(closed), "-n", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"(cron '{cron}', 1h, Europe/Berlin): closed now"
    assert len(lines) == 4
    first = opening
    for i, line in enumerate(lines[1:]):
        when = first + timedelta(days=i)
        assert line.strip().startswith(f"opens  {when:%a %Y-%m-%d %H:%M} {when.tzname()} (Europe/Berlin) = "
                                       f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC"), line
        assert line.endswith("for 1h")
    always = tmp_path / "open.yml"
    always.write_text(MARKER_PLAYBOOK.format(cron="* * * * *", tz="UTC"))
    proc = cli("windows", str(always), "-n", "1")
    assert proc.returncode == 0 and ": OPEN now, closes " in proc.stdout.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# The scheduler as a real process
# ---------------------------------------------------------------------------------------------

SCHEDULED_PLAYBOOK = """\
runbook: every-minute
schedule: "* * * * *"
steps:
  - name: count
    shell: date -u +%Y-%m-%dT%H:%M:%S >> scheduled-runs
"""


def test_scheduler_starts_a_due_playbook_once_and_stops_on_sigterm(clean_ssh_hosts: list[SSHHost],
                                                                  tmp_path: Path) -> None:
    host = clean_ssh_hosts[0]
    playbooks = tmp_path / "playbooks"
    playbooks.mkdir()
    (playbooks / "every-minute.yml").write_text(SCHEDULED_PLAYBOOK)
    inventory = write_inventory(tmp_path / "inventory.yml", [host])
    # The scheduler passes no --known-hosts to its runs: they read ~/.ssh/known_hosts of a private HOME.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    write_known_hosts(home / ".ssh" / "known_hosts", [host])
    trail = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "schedule", "--dir", str(playbooks), "-i", str(inventory),
                             "--interval", "0.2", "--audit-log", str(trail)],
                            env=env(HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs_file = host.home / "scheduled-runs"
    try:
        deadline = time.monotonic() + 60
        while not (trail.exists() and any(r["event"] in ("schedule.run_finished", "schedule.run_failed")
                                           for r in records(trail))):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the scheduler did not run the playbook"
            time.sleep(0.1)
        # Many more ticks: a due playbook that already ran is not started again for the same due time.
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "scheduler.stopped" in err
    recs = records(trail)
    sched = [r for r in recs if r["event"].startswith("schedule")]
    started = [r for r in sched if r["event"] == "schedule.run_started"]
    finished = [r for r in sched if r["event"] == "schedule.run_finished"]
    assert started and len(finished) == len(started), sched
    # Once per due time (a minute boundary crossed during the test may add one more, with its own due time).
    assert len({r["due"] for r in started}) == len(started) <= 2
    assert len(runs_file.read_text().splitlines()) == len(started)
    assert [r["event"] for r in recs if r["event"].startswith("scheduler.")][-2:] == ["scheduler.stopping",
                                                                                      "scheduler.stopped"]
    assert any(r["event"] == "run.finished" and r["exit_code"] == 0 for r in recs)   # the run's own records
    assert cli("audit", "verify", "--audit-log", str(trail)).returncode == 0
