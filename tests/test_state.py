"""Run state files (`runs/RUN_ID.json`): the observer, listing, loading by prefix, and what resume re-runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runbook.audit import Redactor
from runbook.errors import RunbookError, ValidationError
from runbook.events import RunInfo
from runbook.loader import load_playbook
from runbook.results import RunResult, Status, TaskResult
from runbook.runner import RunRequest
from runbook.state import RunState, list_runs, load_state, registers_from, resumable, task_key

SECRET = "s3cr3t-state-value"


def info(run_id: str = "20260101T000000Z-aaaaaa", inventory_source: str = "inv.yml") -> RunInfo:
    """A RunInfo as the runner would build it."""
    return RunInfo(run_id=run_id, mode="run", playbook_path="/p/pb.yml", playbook_name="pb", playbook_hash="ph",
                   inventory_source=inventory_source, inventory_hash="ih", hosts=["a", "b"], operator="op",
                   control_host="ctl", host_key_checking="strict", extra_vars={"api_key": "***"},
                   started_at=1.0, details={"note": f"uses {SECRET}"})


def result(host: str, step: str, status: Status, stdout: str = "") -> TaskResult:
    """A task result."""
    return TaskResult(host, step, "shell", status, changed=status == Status.CHANGED, rc=0, stdout=stdout,
                      started_at=1.0, finished_at=2.0)


def test_observer_writes_state_as_tasks_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inv.yml").write_text("all: {}\n")
    state = RunState(tmp_path / "runs", Redactor([SECRET]), RunRequest(limit="a:b", tags=frozenset({"x"})))
    run = info()
    state.run_started(run)
    path = tmp_path / "runs" / f"{run.run_id}.json"
    doc = json.loads(path.read_text())
    assert doc["status"] == "running" and doc["tasks"] == {} and doc["limit"] == "a:b" and doc["tags"] == ["x"]
    # A relative inventory path is stored absolute, so resume finds it from any directory.
    assert doc["inventory_source"] == str(tmp_path / "inv.yml")
    assert doc["details"] == {"note": "uses ***"}
    first = result("a", "one", Status.CHANGED, stdout=f"token {SECRET}\n")
    state.task_finished(run, first)     # the first flush after run_started may be throttled; run_finished forces it
    journal = path.with_suffix(".journal")
    assert SECRET not in journal.read_text() and '"finished"' in journal.read_text()
    final = RunResult(run.run_id, "run", ["a", "b"], [first, result("b", "one", Status.DEFERRED)], 1.0, 3.0,
                      stop_reason="maintenance window closed")
    state.run_finished(run, final)
    doc = json.loads(path.read_text())
    assert doc["status"] == "deferred" and doc["finished_at"] == 3.0 and doc["exit_code"] == 5
    assert doc["tasks"][task_key("one", "a")]["stdout"] == "token ***\n"
    assert doc["tasks"]["one@b"]["status"] == "deferred"
    assert SECRET not in path.read_text()
    # The final snapshot holds every task: the journal goes (no output kept twice), and no temp file is left.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [path.name]
    assert load_state(tmp_path / "runs", run.run_id)["tasks"] == doc["tasks"]


def test_snapshots_during_a_run_take_a_bounded_share_of_its_time(tmp_path: Path) -> None:
    state = RunState(tmp_path / "runs", Redactor([SECRET]), RunRequest())
    run = info()
    state.run_started(run)
    path = tmp_path / "runs" / f"{run.run_id}.json"
    before = path.read_text()
    state._last_flush = time.monotonic() - 1.0   # due at the usual 0.5 s...
    state._flush_cost = 0.2                       # ...but the last snapshot took 0.2 s: 5% allows one per 4 s
    state.task_finished(run, result("a", "one", Status.OK))
    assert path.read_text() == before                                # no snapshot yet...
    assert '"host": "a"' in path.with_suffix(".journal").read_text()   # ...the journal has the task
    assert load_state(tmp_path / "runs", run.run_id)["tasks"]["one@a"]["status"] == "ok"   # loading replays it
    state._flush_cost = 0.0
    state.task_finished(run, result("b", "one", Status.OK))
    assert set(json.loads(path.read_text())["tasks"]) == {"one@a", "one@b"}


@pytest.mark.parametrize("statuses, interrupted, expected", [
    ([Status.OK, Status.CHANGED, Status.SKIPPED], False, "ok"),
    ([Status.OK, Status.FAILED], False, "failed"),
    ([Status.OK, Status.UNREACHABLE], False, "failed"),
    ([Status.OK, Status.NOT_RUN], True, "interrupted"),
    ([Status.DEFERRED, Status.FAILED], False, "deferred"),
])
def test_final_status(tmp_path: Path, statuses: list[Status], interrupted: bool, expected: str) -> None:
    state = RunState(tmp_path, Redactor(), RunRequest())
    run = info()
    state.run_started(run)
    results = [result("a", f"s{i}", s) for i, s in enumerate(statuses)]
    state.run_finished(run, RunResult(run.run_id, "run", ["a"], results, interrupted=interrupted))
    assert json.loads((tmp_path / f"{run.run_id}.json").read_text())["status"] == expected


def test_interrupt_is_saved_at_once(tmp_path: Path) -> None:
    state = RunState(tmp_path, Redactor(), RunRequest())
    run = info()
    state.run_started(run)
    state.run_interrupted(run, "interrupted")
    assert json.loads((tmp_path / f"{run.run_id}.json").read_text())["status"] == "interrupted"


def write_state(directory: Path, run_id: str, tasks: dict[str, dict], status: str = "failed") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{run_id}.json").write_text(json.dumps({
        "version": 1, "run_id": run_id, "mode": "run", "status": status, "playbook_name": "pb", "operator": "op",
        "playbook_path": "/pb.yml", "playbook_hash": "h", "inventory_source": "inv", "inventory_hash": "i",
        "started_at": 1.0, "hosts": ["a", "b"], "tasks": tasks}))


def test_load_state_by_id_and_prefix(tmp_path: Path) -> None:
    write_state(tmp_path, "20260101T000000Z-aaaaaa", {})
    write_state(tmp_path, "20260102T000000Z-bbbbbb", {})
    assert load_state(tmp_path, "20260101T000000Z-aaaaaa")["run_id"] == "20260101T000000Z-aaaaaa"
    assert load_state(tmp_path, "20260102")["run_id"] == "20260102T000000Z-bbbbbb"
    with pytest.raises(RunbookError, match="ambiguous prefix"):
        load_state(tmp_path, "2026010")
    with pytest.raises(RunbookError, match="no run `nope`") as exc:
        load_state(tmp_path, "nope")
    assert "20260102T000000Z-bbbbbb" in str(exc.value)       # the hint lists recent runs
    (tmp_path / "20260103T000000Z-cccccc.json").write_text("{not json")
    with pytest.raises(ValidationError, match="cannot read run state"):
        load_state(tmp_path, "20260103T000000Z-cccccc")
    with pytest.raises(RunbookError, match="runbook runs"):
        load_state(tmp_path / "missing", "x")


def test_list_runs_newest_first_with_counts(tmp_path: Path) -> None:
    write_state(tmp_path, "20260101T000000Z-aaaaaa", {"one@a": {"status": "ok"}, "one@b": {"status": "failed"}})
    write_state(tmp_path, "20260102T000000Z-bbbbbb", {"one@a": {"status": "ok"}, "one@b": {"status": "ok"}}, "ok")
    (tmp_path / "20260103T000000Z-cccccc.json").write_text("{torn")
    runs = list_runs(tmp_path)
    assert [r["run_id"] for r in runs] == ["20260102T000000Z-bbbbbb", "20260101T000000Z-aaaaaa"]
    assert runs[0]["counts"] == {"ok": 2} and runs[0]["status"] == "ok"
    assert runs[1]["counts"] == {"ok": 1, "failed": 1} and runs[1]["hosts"] == 2
    assert list_runs(tmp_path, limit=1)[0]["run_id"] == "20260102T000000Z-bbbbbb"  # the torn newest is skipped
    assert list_runs(tmp_path / "none") == []


def test_resumable_keeps_only_finished_tasks(tmp_path: Path) -> None:
    tasks = {task_key(r.step_id, r.host): r.as_dict() for r in [
        result("a", "one", Status.OK, "x\n"), result("a", "two", Status.CHANGED), result("a", "three", Status.SKIPPED),
        result("b", "one", Status.FAILED), result("b", "two", Status.NOT_RUN), result("b", "three", Status.UNREACHABLE),
        result("a", "four", Status.DEFERRED)]}
    done, _ = resumable({"run_id": "r1", "tasks": tasks})
    assert set(done) == {("one", "a"), ("two", "a"), ("three", "a")}
    assert done[("one", "a")].status == Status.OK and done[("one", "a")].stdout == "x\n"
    assert all(r.from_run == "r1" for r in done.values())


def test_registers_are_rebuilt_from_saved_results(tmp_path: Path) -> None:
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: r\nsteps:\n  - name: one\n    shell: echo hi\n    register: greeting\n"
                  "  - name: two\n    shell: echo {{ greeting.stdout }}\n")
    done = {("one", "a"): result("a", "one", Status.CHANGED, "hi\nthere\n"), ("gone", "a"): result("a", "gone", Status.OK)}
    regs = registers_from(load_playbook(pb), done)
    assert regs == {"a": {"greeting": {
        "stdout": "hi\nthere\n", "stderr": "", "rc": 0, "changed": True, "failed": False, "skipped": False,
        "status": "changed", "duration": 0.0, "stdout_lines": ["hi", "there"], "msg": "", "data": {}}}}


def test_state_file_replaced_atomically(tmp_path: Path) -> None:
    # Readers never see a half-written file: the file's inode changes on every save.
    state = RunState(tmp_path, Redactor(), RunRequest())
    run = info()
    state.run_started(run)
    path = tmp_path / f"{run.run_id}.json"
    before = os.stat(path).st_ino
    state.run_finished(run, RunResult(run.run_id, "run", ["a"], [result("a", "one", Status.OK)]))
    assert os.stat(path).st_ino != before
    assert json.loads(path.read_text())["status"] == "ok"


@pytest.mark.parametrize("run_id", ["../../../x", "/etc/passwd", "a/b", "*", "..", "", "x" * 200, "r1\n"])
def test_run_ids_that_are_paths_or_globs_are_refused(tmp_path: Path, run_id: str) -> None:
    outside = tmp_path / "x.json"
    outside.write_text('{"run_id": "x"}')
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValidationError, match="invalid run id"):
        load_state(tmp_path / "runs", run_id)


def test_a_malformed_state_file_is_invalid_input_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "r1.json").write_text('{"run_id": "r1", "tasks": []}')
    with pytest.raises(ValidationError, match="malformed run state"):
        load_state(tmp_path, "r1")


def _resume_state(directory: Path, run_id: str, resumed_from: str, tasks: dict[str, dict], journal: str = "") -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{run_id}.json").write_text(json.dumps({
        "run_id": run_id, "mode": "resume", "status": "deferred", "details": {"resumed_from": resumed_from},
        "tasks": tasks, "pid": None}))
    if journal:
        (directory / f"{run_id}.journal").write_text(journal)


def test_a_resume_counts_as_resuming_a_run_only_when_it_started_a_task(tmp_path: Path) -> None:
    from runbook.state import resumes_of

    x = "20260101T020000Z-aaaaaa"
    carried = {"one@h1": {"status": "changed", "from_run": x}, "two@h1": {"status": "deferred"}}
    _resume_state(tmp_path, "20260101T030000Z-bbbbbb", x, carried)                      # the window refused it
    _resume_state(tmp_path, "20260101T010000Z-cccccc", x, {"two@h1": {"status": "ok"}})   # older than x: not its
    _resume_state(tmp_path, "20260101T040000Z-dddddd", "20260101T020000Z-other", {"two@h1": {"status": "ok"}})
    assert resumes_of(tmp_path, x) == []
    _resume_state(tmp_path, "20260101T050000Z-eeeeee", x, carried,                   # died mid-task: in flight
                  journal=json.dumps({"started": "three@h1"}) + "\n")
    _resume_state(tmp_path, "20260101T060000Z-ffffff", x, {**carried, "two@h1": {"status": "failed"}})
    assert [r["run_id"] for r in resumes_of(tmp_path, x)] == ["20260101T050000Z-eeeeee", "20260101T060000Z-ffffff"]
    assert resumes_of(tmp_path / "none", x) == []


def _running_state(directory: Path, run_id: str, pid: int) -> None:
    import socket

    directory.mkdir(exist_ok=True)
    (directory / f"{run_id}.json").write_text(json.dumps({
        "version": 1, "run_id": run_id, "mode": "run", "status": "running", "pid": pid,
        "control_host": socket.gethostname(), "tasks": {}}))


def test_the_run_lock_tells_a_live_run_from_one_whose_state_stopped_at_running(tmp_path: Path) -> None:
    """A run in a long-lived process (serve) whose state could not be written to the end still says
    `running` with a live pid: its released lock says it ended. A held lock says it runs, whatever its pid."""
    import subprocess
    import sys

    from runbook.state import replay_journal, run_lock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for run_id, pid in (("r-live", gone.pid), ("r-ended", os.getpid())):
        _running_state(tmp_path, run_id, pid)
    with run_lock(tmp_path, "r-live"):
        doc = json.loads((tmp_path / "r-live.json").read_text())
        replay_journal(doc, tmp_path / "r-live.journal")
        assert doc["status"] == "running"          # held: running, though its recorded pid is gone
        with pytest.raises(ValidationError, match="running already"):
            with run_lock(tmp_path, "r-live"):
                pass
    with run_lock(tmp_path, "r-ended"):
        pass
    for run_id in ("r-live", "r-ended"):
        doc = json.loads((tmp_path / f"{run_id}.json").read_text())
        replay_journal(doc, tmp_path / f"{run_id}.journal")
        assert doc["status"] == "aborted", run_id   # released: it ended, though this pid lives


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path: Path) -> None:
    from runbook.state import replay_journal, run_lock

    _running_state(tmp_path, "r-fork", os.getpid())
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    with run_lock(tmp_path, "r-fork"):
        child = os.fork()
        if child == 0:   # a local:N worker, forked mid-run: it outlives the run here
            os.close(write_end)
            os.write(ready_write, b"r")   # its at-fork hooks have run by now
            os.read(read_end, 1)
            os._exit(0)
        assert os.read(ready_read, 1) == b"r"
    os.close(ready_read)
    os.close(ready_write)
    try:
        doc = json.loads((tmp_path / "r-fork.json").read_text())
        replay_journal(doc, tmp_path / "r-fork.journal")
        assert doc["status"] == "aborted"
    finally:
        os.close(read_end)
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(child, 0)


def test_a_journalled_rescue_marks_only_the_saved_failures_it_names(tmp_path: Path) -> None:
    """A run that died after a block's rescue: its journal says which failures the rescue handled, and resume
    keeps them done; a journal line naming other tasks (ok, unknown, not a list) changes nothing."""
    from runbook.state import replay_journal

    def finished(step: str, status: str) -> str:
        return json.dumps({"finished": {"step_id": step, "host": "a", "status": status, "action": "shell"}})

    lines = [finished("try", "failed"), finished("other", "failed"), finished("fine", "ok"),
             json.dumps({"rescued": ["try@a", "fine@a", "ghost@a", 7]}), json.dumps({"rescued": "other@a"}),
             '{"rescued": ["oth']   # torn by the crash
    (tmp_path / "r1.journal").write_text("\n".join(lines) + "\n")
    doc: dict = {"run_id": "r1", "status": "failed", "tasks": {}}
    replay_journal(doc, tmp_path / "r1.journal")
    assert doc["tasks"]["try@a"]["rescued"] is True
    assert "rescued" not in doc["tasks"]["other@a"] and "rescued" not in doc["tasks"]["fine@a"]
    assert "ghost@a" not in doc["tasks"]
    done, _ = resumable(doc)
    assert sorted(k.step_id for k in done) == ["fine", "try"]   # `other` failed unrescued: resume runs it again
    assert done[next(k for k in done if k.step_id == "try")].rescued
