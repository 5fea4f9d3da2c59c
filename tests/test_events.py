"""The event stream: critical observers stop a run cleanly, best-effort ones are isolated and never stall workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from runbook.events import EventStream, Observer, RunInfo
from runbook.results import RunResult, TaskResult
from runbook.runner import RunRequest, execute, prepare
from tests.helpers import records


class Raises(Observer):
    """Raises on one hook."""

    def __init__(self, hook: str, critical: bool):
        self.hook = hook
        self.critical = critical   # type: ignore[misc]
        self.calls = 0

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        self.calls += 1
        if self.hook == "task_finished":
            raise RuntimeError("boom")


class Slow(Observer):
    """Takes a long time over every task: a slow terminal, a webhook."""

    def __init__(self, gate: threading.Event):
        self.gate = gate
        self.finished: list[str] = []
        self.run_finished_seen = False

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        self.gate.wait(10)
        self.finished.append(result.step_id)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        self.run_finished_seen = True


def _playbook(tmp_path: Path, steps: int = 3) -> Path:
    body = "".join(f"  - name: s{i}\n    shell: echo {i} >> {tmp_path / 'out'}\n" for i in range(steps))
    path = tmp_path / "pb.yml"
    path.write_text(f"runbook: events\nsteps:\n{body}")
    return path


def _run(tmp_path: Path, observers: list[object]) -> RunResult:
    request = RunRequest(audit_log=tmp_path / "audit.jsonl", observers=observers)   # type: ignore[arg-type]
    return execute(prepare(_playbook(tmp_path), None, request), request)


def test_a_failing_best_effort_observer_is_reported_once_and_the_run_goes_on(tmp_path: Path, capsys) -> None:
    bad = Raises("task_finished", critical=False)
    result = _run(tmp_path, [bad])
    assert result.exit_code() == 0
    assert (tmp_path / "out").read_text().split() == ["0", "1", "2"]
    assert bad.calls == 3
    err = capsys.readouterr().err
    assert err.count("Raises failed in task_finished") == 1 and "the run goes on" in err


def test_a_failing_critical_observer_stops_the_run_cleanly_with_a_finished_record(tmp_path: Path, capsys) -> None:
    bad = Raises("task_finished", critical=True)
    result = _run(tmp_path, [bad])
    assert result.exit_code() == 1 and result.observer_failed and "boom" in result.observer_failed
    assert (tmp_path / "out").read_text().split() == ["0"]       # no task started after the failure
    assert {r.status.value for r in result.results if r.step_id != "s0"} == {"not_run"}
    trail = records(tmp_path / "audit.jsonl")
    assert trail[-1]["event"] == "run.finished" and trail[-1]["exit_code"] == 1
    assert "the run stops" in capsys.readouterr().err


def test_a_slow_observer_does_not_stall_the_workers(tmp_path: Path) -> None:
    gate = threading.Event()
    slow = Slow(gate)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_run(tmp_path, [slow]), done.set()))
    thread.start()
    # Every task runs while the observer is still stuck on the first one.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len((tmp_path / "out").read_text().split() if (tmp_path / "out").exists() else []) < 3:
        time.sleep(0.05)
    assert (tmp_path / "out").read_text().split() == ["0", "1", "2"]
    assert slow.finished == [] and not done.is_set()                 # the run waits for it only at the end
    gate.set()
    thread.join(20)
    assert done.is_set() and slow.finished == ["s0", "s1", "s2"] and slow.run_finished_seen


def test_stream_delivers_in_order_to_best_effort_observers() -> None:
    seen: list[str] = []

    class Note(Observer):
        def notice(self, run: RunInfo, level: str, message: str) -> None:
            seen.append(message)

    stream = EventStream([Note()])
    for i in range(50):
        stream.notice(None, "info", str(i))   # type: ignore[arg-type]
    assert stream.flush(5)
    assert seen == [str(i) for i in range(50)]


def test_a_hook_newer_than_an_observer_passes_it_over_and_reaches_the_others() -> None:
    """An observer written before `block_rescued` existed (no Observer base) keeps working, critical or not."""
    seen: list[tuple[str, str, list[str]]] = []

    class Old:   # a plugin's observer from before the hook: only the hooks it knew
        def __init__(self, critical: bool):
            self.critical = critical
            self.notes: list[str] = []

        def notice(self, run: RunInfo, level: str, message: str) -> None:
            self.notes.append(message)

    class New(Observer):
        def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
            seen.append((host, block, step_ids))

    old_critical, old_best = Old(True), Old(False)
    reports: list[str] = []
    stream = EventStream([old_critical, old_best, New()], report=reports.append)
    stream.block_rescued(None, "web1", "deploy", ["migrate"])   # type: ignore[arg-type]
    stream.notice(None, "info", "after")   # type: ignore[arg-type]
    assert stream.flush(5)
    assert seen == [("web1", "deploy", ["migrate"])]
    assert old_critical.notes == ["after"] and old_best.notes == ["after"]
    assert stream.failure is None and reports == []
