"""A controller killed mid-run (SIGKILL): finished work is durable, in-flight work is unknown, resume re-runs neither blindly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from runbook.state import list_runs, load_state
from tests.helpers import cli, cli_env, records


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    hosts = {}
    for n in ("a", "b", "c"):
        (tmp_path / n).mkdir()
        hosts[n] = {"ansible_connection": "local", "dir": str(tmp_path / n)}
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    go = tmp_path / "go"
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "crash", "steps": [
        {"name": "count", "shell": "echo ran >> {{ dir | quote }}/count"},
        {"name": "wait", "shell": f"while [ ! -e {go} ]; do sleep 0.05; done; echo waited >> {{{{ dir | quote }}}}/wait"},
    ]}))
    return inv, pb, go


def _kill_matching(text: str) -> None:
    """SIGKILL every process whose command line contains `text`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _kill_after_first_step(tmp_path: Path, inv: Path, pb: Path) -> str:
    env = cli_env(RUNBOOK_AUDIT_LOG=str(tmp_path / "audit.jsonl"))
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", str(pb), "-i", str(inv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    runs = tmp_path / "runs"
    while time.monotonic() < deadline:
        counted = all((tmp_path / n / "count").exists() for n in "abc")
        journal = next(runs.glob("*.journal"), None) if runs.is_dir() else None
        started_wait = journal is not None and journal.read_text().count('"started": "wait@') == 3
        if counted and started_wait:
            break
        time.sleep(0.05)
    # The controller and the local commands it started die together, as when its machine crashes
    # (each command runs in a session of its own, so they are killed by what they run).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _kill_matching(f"while [ ! -e {tmp_path}")
    [run] = list_runs(runs)
    return str(run["run_id"])


def test_sigkill_then_resume_never_reruns_finished_work(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    run_id = _kill_after_first_step(tmp_path, inv, pb)
    state = load_state(tmp_path / "runs", run_id)
    assert state["status"] == "aborted"                       # not "running" forever
    assert {k for k, t in state["tasks"].items() if t["status"] == "changed"} == {"count@a", "count@b", "count@c"}
    assert state["in_flight"] == ["wait@a", "wait@b", "wait@c"]
    shown = cli("runs", "--audit-log", str(tmp_path / "audit.jsonl"))
    assert "aborted" in shown.stdout

    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    refused = cli("resume", run_id, env=env)
    assert refused.returncode == 4
    assert "outcome is unknown" in refused.stderr and "wait@a" in refused.stderr and "--rerun-in-flight" in refused.stderr

    go.touch()
    resumed = cli("resume", run_id, "--rerun-in-flight", "--output", "json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    for n in "abc":
        assert (tmp_path / n / "count").read_text() == "ran\n"     # finished before the kill: not run again
        assert (tmp_path / n / "wait").read_text() == "waited\n"
    statuses = {(r["step_id"], r["host"]): (r["status"], r["from_run"]) for r in json.loads(resumed.stdout)["results"]}
    assert statuses[("count", "a")] == ("changed", run_id)


def test_a_torn_last_journal_line_loses_nothing_before_it(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    run_id = _kill_after_first_step(tmp_path, inv, pb)
    journal = tmp_path / "runs" / f"{run_id}.journal"
    with open(journal, "a") as fh:
        fh.write('{"finished": {"step_id": "wait", "ho')          # a write cut short by the crash
    state = load_state(tmp_path / "runs", run_id)
    assert {"count@a", "count@b", "count@c"} <= set(state["tasks"])


def test_a_run_state_directory_that_cannot_be_made_is_an_environment_error(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    (tmp_path / "runs").write_text("not a directory")   # where the run state (and its lock) would go
    out = cli("run", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 6, out.stderr
    assert "cannot write the run state" in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not any((tmp_path / n / "count").exists() for n in "abc")       # nothing ran unrecorded


def test_an_audit_trail_that_cannot_be_written_is_an_environment_error(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    out = cli("run", str(pb), "-i", str(inv), "--audit-log", "/dev/full")   # every write: ENOSPC
    assert out.returncode == 6
    assert "cannot write the audit trail: No space left on device" in out.stderr
    assert "internal error" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not any((tmp_path / n / "count").exists() for n in "abc")       # nothing ran unaudited


def test_a_full_disk_under_the_run_state_stops_the_run_and_resume_continues_it(tmp_path: Path) -> None:
    from runbook.runner import RunRequest, execute, prepare

    inv, pb, go = _setup(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r-full.journal").symlink_to("/dev/full")     # the journal's writes fail as on a full disk
    go.touch()
    request = RunRequest(run_id="r-full", state_dir=runs, audit_log=tmp_path / "audit.jsonl")
    result = execute(prepare(pb, str(inv), request), request)
    assert result.exit_code() == 6 and result.environment_failed
    assert "cannot write the run state: No space left on device" in (result.stop_reason or "")
    # Write-ahead: a task is journalled before it starts, so nothing ran that the state cannot account for.
    assert not any((tmp_path / n / "count").exists() for n in "abc")
    trail = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert trail[-1]["event"] == "run.finished" and trail[-1]["exit_code"] == 6   # the trail stays complete

    (runs / "r-full.journal").unlink()                     # space is back
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    resumed = cli("resume", "r-full", "--state-dir", str(runs), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert all((tmp_path / n / "count").read_text() == "ran\n" for n in "abc")


def test_resume_refuses_a_run_id_that_is_a_path(tmp_path: Path) -> None:
    outside = tmp_path / "x.json"
    outside.write_text(json.dumps({"run_id": "x"}))
    (tmp_path / "audit" / "runs").mkdir(parents=True)
    out = cli("resume", "../../x", env={"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit" / "audit.jsonl")})
    assert out.returncode == 4 and "invalid run id" in out.stderr and "Traceback" not in out.stderr


def test_a_resumed_run_is_not_resumed_again_unless_forced(tmp_path: Path) -> None:
    """Resuming a run continues it; resuming the same run again would re-run what the first resume did."""
    inv, pb, go = _setup(tmp_path)
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    pb.write_text(yaml.safe_dump({"runbook": "twice", "steps": [
        {"name": "count", "shell": f"echo ran >> {{{{ dir | quote }}}}/count; test -e {go}"}]}))
    first = cli("run", str(pb), "-i", str(inv), env=env)
    assert first.returncode == 2, first.stderr   # failed everywhere: go is missing
    [run] = list_runs(tmp_path / "runs")
    go.touch()
    assert cli("resume", str(run["run_id"]), env=env).returncode == 0
    assert all((tmp_path / n / "count").read_text() == "ran\nran\n" for n in "abc")
    again = cli("resume", str(run["run_id"]), env=env)
    assert again.returncode == 4 and "Traceback" not in again.stderr
    assert f"run {run['run_id']} was already resumed by run" in again.stderr and "(status ok)" in again.stderr
    assert "nothing is left to run; --force resumes" in again.stderr
    assert all((tmp_path / n / "count").read_text() == "ran\nran\n" for n in "abc")   # nothing ran
    forced = cli("resume", str(run["run_id"]), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert all((tmp_path / n / "count").read_text() == "ran\nran\nran\n" for n in "abc")
    started = [r for r in records(tmp_path / "audit.jsonl") if r["event"] == "run.started"]
    assert any("was already resumed by run" in f for f in started[-1]["details"]["forced"])


def test_resume_latest_continues_the_newest_run_and_says_which(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    none = cli("resume", "latest", env=env)
    assert none.returncode == 4 and "no run `latest`" in none.stderr and "Traceback" not in none.stderr
    pb.write_text(yaml.safe_dump({"runbook": "newest", "steps": [
        {"name": "count", "shell": f"echo ran >> {{{{ dir | quote }}}}/count; test -e {go}"}]}))
    assert cli("run", str(pb), "-i", str(inv), "--limit", "a", env=env).returncode == 2
    assert cli("run", str(pb), "-i", str(inv), "--limit", "b", env=env).returncode == 2
    newest = list_runs(tmp_path / "runs")[0]["run_id"]
    (tmp_path / "runs" / "~copy of newest.json").write_text("{}")   # sorts last, but no run id: not a run
    go.touch()
    out = cli("resume", "latest", env=env)
    assert out.returncode == 0, out.stderr
    assert f"resuming {newest} (the newest run in " in out.stderr
    assert (tmp_path / "a" / "count").read_text() == "ran\n" and (tmp_path / "b" / "count").read_text() == "ran\nran\n"


def test_a_run_still_running_is_not_resumed_beside_itself(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    env = cli_env(RUNBOOK_AUDIT_LOG=str(tmp_path / "audit.jsonl"))
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", str(pb), "-i", str(inv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        journal = None
        while journal is None or journal.read_text().count('"started": "wait@') < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach its second step"
            time.sleep(0.05)
            journal = next((tmp_path / "runs").glob("*.journal"), None) if (tmp_path / "runs").is_dir() else None
        [run] = list_runs(tmp_path / "runs")
        refused = cli("resume", str(run["run_id"]), "--rerun-in-flight", env={"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")})
        assert refused.returncode == 4 and "Traceback" not in refused.stderr, refused.stderr
        assert f"run {run['run_id']} is still running (pid {proc.pid} on " in refused.stderr
        assert "stop it first" in refused.stderr and "--force" in refused.stderr
        go.touch()
        assert proc.wait(60) == 0
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
    for n in "abc":   # every task ran once: by the run, not also by a resume beside it
        assert (tmp_path / n / "count").read_text() == "ran\n" and (tmp_path / n / "wait").read_text() == "waited\n"


def test_runs_prune_removes_old_ended_runs_records_it_and_never_a_running_one(tmp_path: Path) -> None:
    inv, pb, go = _setup(tmp_path)
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "RUNBOOK_OPERATOR": "pruner"}
    pb.write_text(yaml.safe_dump({"runbook": "old", "steps": [{"name": "count", "shell": "true"}]}))
    assert cli("run", str(pb), "-i", str(inv), env=env).returncode == 0
    runs = tmp_path / "runs"
    [fresh] = [p.stem for p in runs.glob("*.json")]
    # Two runs of last month, as their state files would be (run ids carry their UTC start): one ended,
    # one still running (its lock held here), and a file that is no run of ours.
    doc = json.loads((runs / f"{fresh}.json").read_text())
    ended, live = "20261101T000000Z-aaaaaa", "20261101T000001Z-bbbbbb"
    for run_id, status in ((ended, "ok"), (live, "running")):
        (runs / f"{run_id}.json").write_text(json.dumps({**doc, "run_id": run_id, "status": status, "pid": os.getpid()}))
    (runs / f"{ended}.journal").write_text("")
    (runs / "notes.json").write_text("{}")
    from runbook.state import run_lock

    with run_lock(runs, live):
        dry = cli("runs", "--prune-older-than", "7d", "--dry-run", env=env)
        assert dry.returncode == 0 and "would remove 1 run(s)" in dry.stdout and ended in dry.stdout
        assert (runs / f"{ended}.json").exists()
        out = cli("runs", "--prune-older-than", "7d", env=env)
    assert out.returncode == 0, out.stderr
    assert "removed 1 run(s)" in out.stdout and ended in out.stdout and live not in out.stdout
    assert sorted(p.name for p in runs.iterdir() if not p.name.endswith(".lock")) == sorted(
        [f"{fresh}.json", f"{live}.json", "notes.json"])
    [pruned] = [r for r in records(tmp_path / "audit.jsonl") if r["event"] == "runs.pruned"]
    assert pruned["runs"] == [ended] and pruned["operator"] == "pruner" and pruned["count"] == 1
    bad = cli("runs", "--prune-older-than", "soon", env=env)
    assert bad.returncode == 4 and "--prune-older-than" in bad.stderr and "Traceback" not in bad.stderr
    assert cli("runs", "--dry-run", env=env).returncode == 4
