"""Audit trail: records, redaction, hash chain, tamper detection, torn writes, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest
import structlog

from runbook.audit import (
    GENESIS,
    AuditError,
    AuditTrail,
    Redactor,
    default_audit_path,
    format_table,
    git_commit_of,
    is_secret_name,
    operator_name,
    read_records,
    record_hash,
    secret_var_names,
    verify,
)
from runbook.events import RunInfo, TaskRef
from runbook.results import RunResult, Status, TaskResult

SECRET = "s3cr3t-Pa55-xyzzy"


def run_info(run_id: str = "run-1", extra_vars: dict | None = None, hosts: list[str] | None = None) -> RunInfo:
    """A synthetic RunInfo, as the executor would build it."""
    return RunInfo(
        run_id=run_id, mode="run", playbook_path="/srv/pb/disk.yml", playbook_name="disk-pressure",
        playbook_hash="ab" * 32, inventory_source="/srv/inv.ini", inventory_hash="cd" * 32,
        hosts=hosts or ["web01", "web02"], operator="alice", control_host="ctl01",
        host_key_checking="strict", extra_vars=extra_vars or {}, plan_hash="ef" * 32,
        git_commit="1" * 40, started_at=1700000000.0, details={"ignore_window": False},
    )


def write_run(trail: AuditTrail, run_id: str = "run-1", tasks: int = 2, finish: bool = True) -> None:
    """Drive a trail through a run with `tasks` tasks on one host, a failure and an unreachable host."""
    run = run_info(run_id)
    trail.run_started(run)
    result = RunResult(run_id=run_id, mode="run", hosts=list(run.hosts), started_at=10.0, finished_at=12.5)
    for i in range(tasks):
        trail.task_started(run, TaskRef("web01", f"step-{i}", f"step {i}", "shell", 1, f"echo {i}"))
        status = Status.FAILED if i == tasks - 1 else Status.CHANGED
        r = TaskResult("web01", f"step-{i}", "shell", status, changed=status == Status.CHANGED,
                       rc=1 if status == Status.FAILED else 0, stdout=f"out {i}", command=f"echo {i}",
                       duration=0.25, attempts=1)
        trail.task_finished(run, r)
        result.results.append(r)
    trail.host_unreachable(run, "web02", "connection refused")
    result.unreachable["web02"] = "connection refused"
    if finish:
        trail.run_finished(run, result)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture
def trail_path(tmp_path: Path) -> Path:
    return tmp_path / "pb" / ".runbook" / "audit.jsonl"


@pytest.fixture
def clean_trail(trail_path: Path) -> Path:
    """A trail with two complete runs (18 records)."""
    trail = AuditTrail(trail_path)
    write_run(trail, "run-1", tasks=3)
    write_run(AuditTrail(trail_path), "run-2", tasks=3)
    return trail_path


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------

def test_records_carry_the_event_fields(trail_path: Path) -> None:
    write_run(AuditTrail(trail_path), tasks=2)
    recs = [json.loads(ln) for ln in lines_of(trail_path)]
    assert [r["event"] for r in recs] == ["run.started", "task.started", "task.finished", "task.started",
                                         "task.finished", "host.unreachable", "run.finished"]
    assert [r["seq"] for r in recs] == list(range(1, 8))
    assert all(r["run_id"] == "run-1" for r in recs)
    assert recs[0]["prev"] == GENESIS
    for before, after in zip(recs, recs[1:]):
        assert after["prev"] == before["hash"] == record_hash(before)
    started = recs[0]
    for key in ("mode", "playbook_path", "playbook_name", "playbook_hash", "inventory_source", "inventory_hash",
                "hosts", "operator", "control_host", "host_key_checking", "extra_vars", "plan_hash",
                "git_commit", "details"):
        assert key in started, key
    assert started["operator"] == "alice" and started["hosts"] == ["web01", "web02"]
    ts = datetime.fromisoformat(started["timestamp"])
    assert ts.utcoffset() == timedelta(0) and started["timestamp"].endswith("Z")
    ts_task = recs[1]
    assert (ts_task["host"], ts_task["step_id"], ts_task["step_name"], ts_task["action"], ts_task["attempt"],
            ts_task["command"]) == ("web01", "step-0", "step 0", "shell", 1, "echo 0")
    done = recs[2]
    assert done["status"] == "changed" and done["rc"] == 0 and done["changed"] is True
    assert done["stdout"] == "out 0" and done["stdout_len"] == 5
    assert done["stdout_sha256"] == hashlib.sha256(b"out 0").hexdigest()
    assert recs[4]["status"] == "failed"
    assert recs[5] | {"host": "web02", "reason": "connection refused"} == recs[5]
    fin = recs[6]
    assert fin["totals"] == {"changed": 1, "failed": 1}
    assert fin["exit_code"] == 3 and fin["wall_time"] == 2.5 and fin["records"] == 7


def test_approval_notice_interrupt_events(trail_path: Path) -> None:
    trail, run = AuditTrail(trail_path), run_info()
    trail.run_started(run)
    trail.approval(run, "web01", "restart", True, "bob")
    trail.approval(run, "web02", "restart", False, "carol")
    trail.notice(run, "warning", "window closes in 5m")
    trail.run_interrupted(run, "SIGINT")
    recs = read_records(trail_path)
    assert [(r["event"], r.get("who")) for r in recs[1:3]] == [("approval.granted", "bob"),
                                                              ("approval.denied", "carol")]
    assert recs[1]["step_id"] == "restart" and recs[2]["host"] == "web02"
    assert (recs[3]["level"], recs[3]["message"]) == ("warning", "window closes in 5m")
    assert recs[4]["reason"] == "SIGINT"
    report = verify(trail_path)
    assert report.ok and report.incomplete_runs == ["run-1"]


def test_output_is_truncated_with_full_length_and_hash(trail_path: Path) -> None:
    trail, run = AuditTrail(trail_path, output_limit=10), run_info()
    big = "x" * 100
    trail.task_finished(run, TaskResult("web01", "s", "shell", Status.OK, stdout=big, stderr="err"))
    rec = read_records(trail_path)[0]
    assert rec["stdout"] == "x" * 10 and rec["stdout_len"] == 100 and rec["stdout_truncated"] is True
    assert rec["stdout_sha256"] == hashlib.sha256(big.encode()).hexdigest()
    assert rec["stderr"] == "err" and rec["stderr_truncated"] is False


def test_file_and_directory_are_created_private(trail_path: Path) -> None:
    write_run(AuditTrail(trail_path), tasks=1)
    assert trail_path.stat().st_mode & 0o777 == 0o600


def test_unwritable_trail_raises_located_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditError) as info:
        AuditTrail(blocker / "audit.jsonl").run_started(run_info())
    assert info.value.location is not None and "audit.jsonl" in info.value.location.file
    assert info.value.hint


# ----------------------------------------------------------------------------------------------
# verify and tampering
# ----------------------------------------------------------------------------------------------

def test_verify_passes_on_a_clean_file(clean_trail: Path) -> None:
    report = verify(clean_trail)
    assert report.ok, report.render()
    assert report.records == 18 and report.problem is None and report.line is None
    assert report.incomplete_runs == [] and report.notes == []
    assert report.head == json.loads(lines_of(clean_trail)[-1])["hash"]


def test_verify_missing_and_empty(tmp_path: Path) -> None:
    assert verify(tmp_path / "nope.jsonl").kind == "missing"
    (tmp_path / "empty.jsonl").write_text("")
    assert verify(tmp_path / "empty.jsonl").ok


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def test_verify_detects_an_edited_field(clean_trail: Path) -> None:
    lines = lines_of(clean_trail)
    rec = json.loads(lines[4])
    rec["status"] = "ok"   # hide a failure
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 5)
    assert "modified" in report.problem


def test_verify_detects_an_edit_with_recomputed_hash(clean_trail: Path) -> None:
    lines = lines_of(clean_trail)
    rec = json.loads(lines[4])
    rec["status"] = "ok"
    rec["hash"] = record_hash(rec)
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.line) == (False, 6)   # the next record no longer chains to it
    assert "chain broken" in report.problem


def test_verify_detects_a_removed_middle_line(clean_trail: Path) -> None:
    lines = lines_of(clean_trail)
    del lines[3]
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 4)


def test_verify_detects_swapped_lines(clean_trail: Path) -> None:
    lines = lines_of(clean_trail)
    lines[5], lines[6] = lines[6], lines[5]
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 6)


@pytest.mark.parametrize("copy_from", [2, None])
def test_verify_detects_an_inserted_line(clean_trail: Path, copy_from: int | None) -> None:
    lines = lines_of(clean_trail)
    inserted = lines[copy_from] if copy_from is not None else '{"event":"task.finished"}\n'
    lines.insert(9, inserted)
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 10)


def test_verify_detects_a_line_cut_short_in_the_middle(clean_trail: Path) -> None:
    lines = lines_of(clean_trail)
    lines[6] = lines[6][:40] + "\n"
    _rewrite(clean_trail, lines)
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 7)


def test_verify_detects_file_cut_mid_line_as_torn(clean_trail: Path) -> None:
    data = clean_trail.read_bytes()
    cut = sum(len(ln.encode()) for ln in lines_of(clean_trail)[:6]) + 30
    clean_trail.write_bytes(data[:cut])
    report = verify(clean_trail)
    assert (report.ok, report.kind, report.line) == (False, "torn", 7)


def test_records_removed_from_the_end_show_as_incomplete_run(clean_trail: Path) -> None:
    _rewrite(clean_trail, lines_of(clean_trail)[:-1])
    report = verify(clean_trail)
    assert report.ok and report.incomplete_runs == ["run-2"]
    assert "incomplete" in report.render()


def test_verify_detects_a_sequence_gap_with_a_valid_chain(trail_path: Path) -> None:
    trail = AuditTrail(trail_path)
    run = run_info()
    trail.run_started(run)
    trail._seq._last["run-1"] += 1   # a writer bug: skips a number, chain still valid
    trail.notice(run, "info", "x")
    report = verify(trail_path)
    assert (report.ok, report.kind, report.line) == (False, "sequence", 2)


# ----------------------------------------------------------------------------------------------
# torn writes
# ----------------------------------------------------------------------------------------------

def test_torn_last_line_is_reported_then_sealed_by_the_next_writer(trail_path: Path) -> None:
    write_run(AuditTrail(trail_path), "run-1", tasks=1, finish=False)
    good = len(lines_of(trail_path))
    partial = '{"action":"shell","event":"task.finished","host":"web01","stdout":"hal'
    with trail_path.open("a", encoding="utf-8") as fh:
        fh.write(partial)            # a crash mid-write
    report = verify(trail_path)
    assert (report.ok, report.kind, report.line) == (False, "torn", good + 1)
    assert report.records == good

    write_run(AuditTrail(trail_path), "run-2", tasks=1)
    lines = lines_of(trail_path)
    assert lines[good] == partial + "\n"                 # earlier records untouched, torn line ended
    seal = json.loads(lines[good + 1])
    assert seal["event"] == "audit.recovered"
    assert seal["torn_sha256"] == hashlib.sha256(partial.encode()).hexdigest()
    report = verify(trail_path)
    assert report.ok, report.render()
    assert report.notes and f"line {good + 1}" in report.notes[0]
    assert report.incomplete_runs == ["run-1"]            # the crashed run never finished


def test_whole_record_without_newline_is_kept_and_continued(trail_path: Path) -> None:
    trail = AuditTrail(trail_path)
    write_run(trail, "run-1", tasks=1)
    data = trail_path.read_bytes()
    trail_path.write_bytes(data[:-1])   # crash after the record, before its newline
    write_run(AuditTrail(trail_path), "run-2", tasks=1)
    report = verify(trail_path)
    assert report.ok and report.notes == [] and report.records == 10


def test_a_sealed_looking_line_that_does_not_match_is_tampering(trail_path: Path) -> None:
    write_run(AuditTrail(trail_path), "run-1", tasks=1, finish=False)
    with trail_path.open("a", encoding="utf-8") as fh:
        fh.write('{"event":"trunc')
    AuditTrail(trail_path).run_started(run_info("run-2"))
    lines = lines_of(trail_path)
    assert json.loads(lines[5])["event"] == "audit.recovered"
    lines[4] = '{"event":"other"}\n'         # replace the torn line: no longer what the seal names
    _rewrite(trail_path, lines)
    report = verify(trail_path)
    assert (report.ok, report.kind, report.line) == (False, "tampered", 5)


# ----------------------------------------------------------------------------------------------
# concurrency
# ----------------------------------------------------------------------------------------------

def _concurrent_writer(path: str, run_id: str, tasks: int) -> None:
    write_run(AuditTrail(path), run_id, tasks=tasks)


def test_concurrent_processes_append_one_valid_chain(trail_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(trail_path), f"run-{i}", 15)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    report = verify(trail_path)
    assert report.ok, report.render()
    per_run = 1 + 2 * 15 + 1 + 1
    assert report.records == 4 * per_run
    recs = read_records(trail_path)
    for i in range(4):
        assert [r["seq"] for r in recs if r["run_id"] == f"run-{i}"] == list(range(1, per_run + 1))
    # Interleaving actually happened or not, the runs all finished.
    assert report.incomplete_runs == []


def test_threads_share_one_trail(trail_path: Path) -> None:
    import threading

    trail, run = AuditTrail(trail_path), run_info()
    trail.run_started(run)

    def work(n: int) -> None:
        for i in range(20):
            trail.task_started(run, TaskRef(f"h{n}", f"s{i}", "s", "shell"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(trail_path)
    assert report.ok and report.records == 81


# ----------------------------------------------------------------------------------------------
# redaction
# ----------------------------------------------------------------------------------------------

def test_secret_appears_nowhere_in_the_file(trail_path: Path) -> None:
    redactor = Redactor.from_vars({"db_password": SECRET, "user": "app"}, {})
    trail = AuditTrail(trail_path, redactor, output_limit=20)
    run = run_info(extra_vars={"db_password": SECRET, "note": f"uses {SECRET}"})
    trail.run_started(run)
    trail.task_started(run, TaskRef("web01", "login", "login", "shell", 1, f"mysql -p{SECRET} -e 'select 1'"))
    # The secret straddles the truncation boundary: redacting after truncating would leak a prefix.
    stdout = "a" * 15 + SECRET + " done"
    trail.task_finished(run, TaskResult("web01", "login", "shell", Status.FAILED, rc=1, stdout=stdout,
                                        stderr=f"denied for {SECRET}", command=f"mysql -p{SECRET}",
                                        message=f"failed with {SECRET}", diff=f"+pw={SECRET}",
                                        data={"registered": {"stdout": SECRET}}))
    trail.notice(run, "warning", f"retrying {SECRET}")
    trail.host_unreachable(run, "web02", f"auth {SECRET}")
    trail.run_interrupted(run, f"stop {SECRET}")
    result = RunResult("run-1", "run", ["web01"], stop_reason=f"x {SECRET}", unreachable={"web02": SECRET})
    trail.run_finished(run, result)
    raw = trail_path.read_bytes()
    assert SECRET.encode() not in raw
    assert SECRET[:8].encode() not in raw          # no prefix left by truncation either
    assert b"***" in raw
    rec = read_records(trail_path, event="task.finished")[0]
    redacted = stdout.replace(SECRET, "***")
    assert rec["stdout_len"] == len(redacted)
    assert rec["stdout_sha256"] == hashlib.sha256(redacted.encode()).hexdigest()   # no oracle on the secret
    assert verify(trail_path).ok


def test_redactor_longest_first_and_containers() -> None:
    r = Redactor(["abcd", "abcdefgh"], mask="#")
    assert r.redact_text("x abcdefgh y abcd") == "x # y #"
    from dataclasses import dataclass

    @dataclass
    class D:
        a: str
        b: tuple

    assert r.redact({"k": ["abcd", ("abcdefgh", 3)], "abcd": D("abcd!", ("q",))}) == \
        {"k": ["#", ("#", 3)], "#": {"a": "#!", "b": ("q",)}}
    r.add("")
    assert r.secrets == {"abcd", "abcdefgh"}
    r.add("12345")
    assert r.redact(12345) == "#" and r.redact(7) == 7 and r.redact(True) is True


def test_secret_names_and_from_vars() -> None:
    for name in ("db_password", "PASSWD", "api_token", "client_secret", "ssh_key", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_name(name), name
    for name in ("user", "keyboard", "monkey", "ansible_ssh_private_key_file", "keys"):
        assert not is_secret_name(name), name
    vars = {"user": "app", "db": {"password": "pw-nested-1", "port": 5432}, "api_key": 987654,
            "tls_secret": ["one-secret", "two-secret"], "use_token": True}
    assert secret_var_names(vars) == {"password", "api_key", "tls_secret", "use_token"}
    r = Redactor.from_vars(vars, {"pager": "pager-token-value"})
    assert r.secrets == {"pw-nested-1", "987654", "one-secret", "two-secret", "pager-token-value"}


# ----------------------------------------------------------------------------------------------
# structlog isolation
# ----------------------------------------------------------------------------------------------

def test_global_structlog_configuration_is_untouched(trail_path: Path) -> None:
    seen: list[dict] = []

    def capture(_logger, _method, event_dict):
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    try:
        before = structlog.get_config()
        write_run(AuditTrail(trail_path), tasks=1)
        assert structlog.get_config() == before
        assert seen == []                               # our records never went through the app's chain
        structlog.get_logger().info("app.event", x=1)   # and the app's logger still works as configured
        assert seen == [{"event": "app.event", "x": 1}]
        assert "app.event" not in trail_path.read_text()
        assert verify(trail_path).ok
    finally:
        structlog.reset_defaults()


# ----------------------------------------------------------------------------------------------
# reading, showing, who and which version
# ----------------------------------------------------------------------------------------------

def test_read_records_filters_and_table(clean_trail: Path) -> None:
    assert {r["run_id"] for r in read_records(clean_trail, run="run-2")} == {"run-2"}
    web02 = read_records(clean_trail, host="web02")
    assert [r["event"] for r in web02] == ["run.started", "host.unreachable"] * 2
    assert len(read_records(clean_trail, event="task.*")) == 12
    future = datetime.now(UTC) + timedelta(days=1)
    assert read_records(clean_trail, since=future) == []
    assert len(read_records(clean_trail, since=datetime.now() - timedelta(days=1))) == 18
    table = format_table(read_records(clean_trail, host="web01", event="task.finished"))
    rows = table.splitlines()
    assert rows[0].split()[:3] == ["TIME", "(UTC)", "RUN"] and len(rows) == 7
    assert "failed" in rows[-1] and "step-2" in rows[-1]
    full = format_table(read_records(clean_trail))
    assert "alice" in full and "exit 3" in full


def test_default_audit_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    pb = tmp_path / "playbooks" / "disk.yml"
    assert default_audit_path(str(pb)) == tmp_path / "playbooks" / ".runbook" / "audit.jsonl"
    monkeypatch.chdir(tmp_path)
    assert default_audit_path(None) == tmp_path / ".runbook" / "audit.jsonl"
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "x.jsonl"))
    assert default_audit_path(str(pb)) == tmp_path / "x.jsonl"


def test_operator_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_OPERATOR", "oncall-bob")
    assert operator_name("alice") == "alice"
    assert operator_name(None) == "oncall-bob"
    monkeypatch.delenv("RUNBOOK_OPERATOR")
    import getpass
    assert operator_name("") == getpass.getuser()


def test_git_commit_of(tmp_path: Path) -> None:
    assert git_commit_of(tmp_path / "pb.yml") is None
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, env=env)
    (tmp_path / "pb.yml").write_text("runbook: x\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "pb.yml"], check=True, env=env)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "x"], check=True, env=env)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit_of(tmp_path / "pb.yml") == head


def test_verify_ignores_bytes_appended_after_its_snapshot(clean_trail: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a writer appending while verify reads: fstat sees the file before the append.
    import runbook.audit as audit

    real_fstat, size = os.fstat, clean_trail.stat().st_size

    def fstat_then_append(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with clean_trail.open("a") as fh:
            fh.write('{"half a rec')
        return st

    monkeypatch.setattr(audit.os, "fstat", fstat_then_append)
    report = verify(clean_trail)
    assert report.ok and report.records == 18
    assert clean_trail.stat().st_size > size
