"""`runbook windows` and `runbook schedule --once` through the real CLI entry point (local runs, no SSH)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runbook.cli import main

WINDOWS_YML = """\
windows:
  saturday-night: {cron: "0 2 * * SAT", duration: 2h, timezone: Europe/Berlin}
  always: {cron: "* * * * *", duration: 1h, timezone: UTC}
"""


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding windows.yml, with no audit or operator settings inherited."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    monkeypatch.delenv("RUNBOOK_OPERATOR", raising=False)
    (tmp_path / "windows.yml").write_text(WINDOWS_YML)
    return tmp_path


def test_windows_by_name(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["windows", "saturday-night", "-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("`saturday-night` (cron '0 2 * * SAT', 2h, Europe/Berlin): ")
    assert len(lines) == 3
    for line in lines[1:]:
        assert line.strip().startswith("opens  Sat ") and "(Europe/Berlin) = " in line and line.endswith("for 2h")


def test_windows_lists_every_named_window(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["windows", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "`saturday-night`" in out
    assert "`always` (cron '* * * * *', 1h, UTC): OPEN now, closes " in out


def test_unknown_window_name_is_invalid_input(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["windows", "saturday-nite"]) == 4
    err = capsys.readouterr().err
    assert "unknown window `saturday-nite`" in err and "saturday-night" in err


def test_playbook_without_window_runs_any_time(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "pb.yml").write_text("runbook: plain\nsteps:\n  - name: a\n    shell: 'true'\n")
    assert main(["windows", "pb.yml"]) == 0
    out, err = capsys.readouterr()
    assert out == "playbook `plain` (pb.yml): no window: runs any time\n" and err == ""


def test_named_window_from_the_playbook_directory(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "pb.yml").write_text("runbook: named\nwindow: always\nsteps:\n  - name: a\n    shell: 'true'\n")
    assert main(["windows", "pb.yml", "-n", "1"]) == 0
    assert capsys.readouterr().out.startswith("`always` (cron '* * * * *', 1h, UTC): OPEN now")


@pytest.mark.parametrize("command", ["run", "resume"])
def test_ignore_window_without_reason_is_invalid_input(here: Path, capsys: pytest.CaptureFixture[str],
                                                       command: str) -> None:
    (here / "pb.yml").write_text("runbook: w\nwindow: saturday-night\nsteps:\n  - name: a\n    shell: touch ran\n")
    target = "pb.yml" if command == "run" else "some-run-id"
    assert main([command, target, "--ignore-window", "--audit-log", str(here / "a.jsonl")]) == 4
    assert "--ignore-window needs --reason" in capsys.readouterr().err
    assert not (here / "ran").exists() and not (here / "a.jsonl").exists()


def test_run_inside_an_open_named_window(here: Path) -> None:
    (here / "pb.yml").write_text("runbook: w\nwindow: always\nsteps:\n  - name: a\n    shell: touch ran\n")
    inv = here / "inv.yml"
    inv.write_text("all:\n  hosts:\n    me: {ansible_connection: local}\n")
    assert main(["run", "pb.yml", "-i", str(inv), "--audit-log", str(here / "a.jsonl")]) == 0
    assert (here / "ran").exists()


def test_schedule_once_runs_a_due_playbook_and_logs_it(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    playbooks = here / "playbooks"
    playbooks.mkdir()
    marker = here / "scheduled"
    (playbooks / "due.yml").write_text(
        f"runbook: due\nschedule: '* * * * *'\nsteps:\n  - name: a\n    shell: echo ran >> {marker}\n")
    (playbooks / "unscheduled.yml").write_text(
        f"runbook: never\nsteps:\n  - name: a\n    shell: echo ran >> {here / 'never'}\n")
    (playbooks / "broken.yml").write_text("runbook: [\n")
    inv = here / "inv.yml"
    inv.write_text("all:\n  hosts:\n    me: {ansible_connection: local}\n")
    trail = here / "audit.jsonl"
    args = ["schedule", "--dir", str(playbooks), "-i", str(inv), "--audit-log", str(trail), "--once"]
    assert main(args) == 0
    assert marker.read_text() == "ran\n" and not (here / "never").exists()
    events = [json.loads(line)["event"] for line in trail.read_text().splitlines()]
    assert "schedule.load_failed" in events
    assert events.count("schedule.run_started") == 1 and events.count("schedule.run_finished") == 1
    assert "run.finished" in events
    # Checking again for the same due time starts nothing (unless a new minute has begun meanwhile).
    before = marker.read_text().count("ran")
    assert main(args) == 0
    again = [json.loads(line) for line in trail.read_text().splitlines()]
    started = [r["due"] for r in again if r["event"] == "schedule.run_started"]
    assert len(started) == len(set(started)) and marker.read_text().count("ran") == len(started) >= before
    assert main(["audit", "verify", "--audit-log", str(trail)]) == 0


def test_schedule_once_prefixes_each_runs_output_with_its_playbook(here: Path, capfd: pytest.CaptureFixture[str]) -> None:
    playbooks = here / "playbooks"
    playbooks.mkdir()
    for name in ("alpha", "beta"):
        steps = "".join(f"  - name: {name} step {i}\n    shell: sleep 0.05; echo {name}-{i}; exit {1 if i == 2 else 0}\n"
                        for i in range(3))
        (playbooks / f"{name}.yml").write_text(f"runbook: {name}\nschedule: '* * * * *'\nsteps:\n{steps}")
    inv = here / "inv.yml"
    inv.write_text("all:\n  hosts:\n    me: {ansible_connection: local}\n")
    args = ["schedule", "--dir", str(playbooks), "-i", str(inv), "--audit-log", str(here / "audit.jsonl"), "--once"]
    assert main(args) == 0
    err = capfd.readouterr().err.splitlines()
    runs = [ln for ln in err if not ln[:4].isdigit()]          # the scheduler's own lines start with a time
    assert runs and all(ln.startswith(("[alpha] ", "[beta] ")) for ln in runs), runs
    for name in ("alpha", "beta"):
        mine = [ln for ln in runs if ln.startswith(f"[{name}] ")]
        assert any(f"Running {name} on 1 host(s)" in ln for ln in mine)
        assert f"[{name}]     stdout| {name}-2" in mine         # the failed step's output, with its run's prefix
        assert any(ln.startswith(f"[{name}] wall time") for ln in mine)


def test_a_runs_output_cannot_forge_another_runs_prefix(here: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Attack: a step prints a carriage return and another run's prefix, hoping to overwrite its own."""
    playbooks = here / "playbooks"
    playbooks.mkdir()
    (playbooks / "alpha.yml").write_text(
        "runbook: alpha\nschedule: '* * * * *'\nsteps:\n"
        "  - name: forge\n    shell: printf 'x\\r[beta] all good\\033[2K\\n'; exit 1\n")
    inv = here / "inv.yml"
    inv.write_text("all:\n  hosts:\n    me: {ansible_connection: local}\n")
    args = ["schedule", "--dir", str(playbooks), "-i", str(inv), "--audit-log", str(here / "audit.jsonl"), "--once"]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert "[alpha]     stdout| x\\x0d[beta] all good\\x1b[2K" in err.splitlines()
