"""The terminal view: plain lines off a terminal, recap, plan rendering, redaction, host-key warning."""

from __future__ import annotations

import io

import pytest

from runbook.audit import Redactor
from runbook.console import ConsoleView, make_console, recap_text, render_plan
from runbook.events import RunInfo, TaskRef
from runbook.results import RunResult, Status, TaskResult


def info(**kw: object) -> RunInfo:
    base = dict(run_id="r1", mode="run", playbook_path="/p.yml", playbook_name="demo", playbook_hash="0" * 64,
                inventory_source="inv", inventory_hash="1" * 64, hosts=["web1", "web2"], operator="alice",
                control_host="ctl", host_key_checking="strict")
    base.update(kw)
    return RunInfo(**base)  # type: ignore[arg-type]


def test_plain_lines_recap_and_redaction() -> None:
    out = io.StringIO()
    view = ConsoleView(make_console(out), Redactor(["hunter22"]))
    run = info()
    view.run_started(run)
    failed = TaskResult("web1", "deploy", "shell", Status.FAILED, rc=1, message="exit code 1",
                        stderr="login with hunter22 failed\n", duration=0.5)
    view.task_finished(run, failed)
    view.task_finished(run, TaskResult("web2", "deploy", "shell", Status.CHANGED, changed=True, duration=0.25))
    result = RunResult("r1", "run", ["web1", "web2"], [failed, TaskResult("web2", "deploy", "shell", Status.CHANGED)],
                       started_at=1.0, finished_at=2.5)
    view.run_finished(run, result)
    text = out.getvalue()
    assert "\x1b[" not in text                                   # no colour codes in a pipe
    assert "web1: deploy: failed 0.50s — exit code 1" in text
    assert "    stderr| login with *** failed" in text and "hunter22" not in text
    assert "web2: deploy: changed 0.25s" in text
    assert recap_text(result) in text and "wall time 1.50s, exit code 2" in text


def test_recap_text_columns_follow_the_statuses_present() -> None:
    result = RunResult("r", "run", ["a", "bb"], [TaskResult("a", "s", "shell", Status.OK),
                                                 TaskResult("bb", "s", "shell", Status.DEFERRED)])
    lines = recap_text(result).splitlines()
    assert lines[0] == "RECAP"
    assert lines[1].split() == ["host", "ok", "changed", "skipped", "failed", "unreachable", "deferred"]
    assert lines[2].split() == ["a", "1", "0", "0", "0", "0", "0"]
    assert lines[3].split() == ["bb", "0", "0", "0", "0", "0", "1"]


def test_host_key_checking_off_is_loud() -> None:
    out = io.StringIO()
    ConsoleView(make_console(out), Redactor()).run_started(info(host_key_checking="off"))
    assert "WARNING: host key checking is OFF" in out.getvalue()


def test_render_plan_marks_reasons_diffs_and_totals() -> None:
    plan = {
        "playbook": {"name": "demo", "path": "/p.yml"}, "created_at": "2026-11-25T08:00:00Z", "operator": "bob",
        "hosts": ["web1"], "unreachable": {},
        "predictions": [
            {"host": "web1", "step_id": "conf", "prediction": "change", "reason": "content differs",
             "diff": "--- a\n+++ b\n-old\n+new token=hunter22\n"},
            {"host": "web1", "step_id": "probe", "prediction": "ok", "reason": "read_only: ran for real"},
            {"host": "web1", "step_id": "gate", "prediction": "ok", "reason": "gate: asks", "gate": True},
            {"host": "web1", "step_id": "restart", "prediction": "unknown", "reason": "no guard"},
        ],
    }
    out = io.StringIO()
    render_plan(make_console(out), plan, Redactor(["hunter22"]))
    lines = out.getvalue().splitlines()
    assert "  + conf  change — content differs" in lines
    assert "    +new token=***" in lines and "hunter22" not in out.getvalue()
    assert "  = probe  no change — read_only: ran for real" in lines
    assert "  ! gate  gate — gate: asks" in lines
    assert "  ? restart  unknown — no guard" in lines
    assert "Plan: 1 change, 1 no change, 1 unknown, 1 gate" in lines
    assert "25% of steps unknown (3 of 4 predicted)" in lines


# --- output, retries and the live view ----------------------------------------------------------

def _playbook(text: str):  # type: ignore[no-untyped-def]
    from runbook.loader import parse_playbook

    return parse_playbook(text, "pb.yml")


def test_failed_tasks_always_show_both_streams_bounded() -> None:
    out = io.StringIO()
    view = ConsoleView(make_console(out), Redactor(["hunter22"]))
    run = info()
    view.run_started(run)
    stdout = "".join(f"line {i}\n" for i in range(1, 31))
    view.task_finished(run, TaskResult("web1", "deploy", "shell", Status.FAILED, rc=1, message="exit code 1",
                                       stdout=stdout, stderr="token hunter22 refused\n"))
    view.task_finished(run, TaskResult("web2", "deploy", "shell", Status.OK, stdout="quiet ok\n"))
    text = out.getvalue()
    assert "    stdout| … 10 earlier line(s) not shown (--format json has them all)" in text
    assert "    stdout| line 11" in text and "    stdout| line 30" in text and "line 10\n" not in text
    assert "    stderr| token *** refused" in text
    assert "quiet ok" not in text          # without -v, successful tasks keep their output to themselves


def test_verbose_shows_every_tasks_output_and_long_lines_are_cut() -> None:
    out = io.StringIO()
    view = ConsoleView(make_console(out), Redactor(), verbose=True)
    run = info()
    view.run_started(run)
    view.task_finished(run, TaskResult("web1", "measure", "shell", Status.OK, stdout="23 /\n" + "x" * 1000 + "\n"))
    view.task_finished(run, TaskResult("web1", "quiet", "shell", Status.OK, stdout="", stderr=""))
    lines = out.getvalue().splitlines()
    assert "    stdout| 23 /" in lines
    assert "    stdout| " + "x" * 400 + " …" in lines
    assert not any("quiet" in ln and "|" in ln for ln in lines)


def test_retries_are_announced_and_the_final_result_counts_attempts() -> None:
    pb = _playbook("runbook: t\nsteps:\n  - name: verify\n    shell: 'false'\n    retries: 2\n"
                   "  - name: poll\n    shell: 'true'\n    until: result.rc == 0\n")
    out = io.StringIO()
    view = ConsoleView(make_console(out), Redactor(), playbook=pb)
    run = info(hosts=["web1"])
    view.run_started(run)
    for attempt in (1, 2, 3):
        view.task_started(run, TaskRef("web1", "verify", "verify", "shell", attempt, "false"))
    view.task_started(run, TaskRef("web1", "poll", "poll", "shell", 2, "true"))
    view.task_finished(run, TaskResult("web1", "verify", "shell", Status.FAILED, rc=1, attempts=3, duration=0.5,
                                       message="exit code 1"))
    lines = out.getvalue().splitlines()
    assert "web1: verify: retrying (attempt 2 of 3)" in lines and "web1: verify: retrying (attempt 3 of 3)" in lines
    assert "web1: poll: retrying (attempt 2 of 4)" in lines            # `until` alone: 3 retries
    assert "web1: verify: failed after 3 attempts 0.50s — exit code 1" in lines


def _render(table: object) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(table)
    return buf.getvalue()


def test_live_view_shows_done_of_total_every_running_step_attempts_and_elapsed() -> None:
    pb = _playbook("runbook: t\nsteps:\n  - name: a\n    shell: 'true'\n"
                   "  - name: left\n    shell: 'true'\n    retries: 1\n"
                   "  - name: right\n    needs: [a]\n    shell: 'true'\n"
                   "  - name: notify\n    once: true\n    shell: 'true'\n"
                   "on_failure:\n  - name: page\n    shell: 'true'\n")
    view = ConsoleView(make_console(io.StringIO()), Redactor(), playbook=pb, live=False)
    run = info()
    view.run_started(run)
    progress = view._progress
    view.task_started(run, TaskRef("web1", "a", "a", "shell"))
    view.task_finished(run, TaskResult("web1", "a", "shell", Status.OK))
    view.task_started(run, TaskRef("web1", "left", "left", "shell", 2))
    view.task_started(run, TaskRef("web1", "right", "right", "shell"))
    text = _render(progress.table())
    row = next(ln for ln in text.splitlines() if ln.startswith("web1"))
    assert " 1/4 " in row                                   # the once step counts on the first host only
    assert "left (attempt 2 of 2) 0s" in row and "right 0s" in row
    assert next(ln for ln in text.splitlines() if ln.startswith("web2")).split()[1] == "0/3"
    view.task_finished(run, TaskResult("web1", "left", "shell", Status.FAILED))
    row = next(ln for ln in _render(progress.table()).splitlines() if ln.startswith("web1"))
    assert "right 0s" in row and "left" not in row          # a branch still running keeps its row busy
    view.task_started(run, TaskRef("web1", "page", "page", "shell", on_failure=True))
    row = next(ln for ln in _render(progress.table()).splitlines() if ln.startswith("web1"))
    assert " 2/5 " in row and "page 0s" in row              # on_failure steps join the total when they start


def test_live_view_elapsed_time_moves_without_events(monkeypatch: pytest.MonkeyPatch) -> None:
    import runbook.console as console_module

    now = [1000.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: now[0])
    view = ConsoleView(make_console(io.StringIO()), Redactor(), live=False)
    run = info(hosts=["web1"])
    view.run_started(run)
    view.task_started(run, TaskRef("web1", "slow", "slow", "shell"))
    now[0] += 42
    assert "slow 42s" in _render(view._progress.table())


def test_host_output_cannot_drive_the_terminal() -> None:
    """Attack: a host prints escape sequences (retitle, clear line, carriage return) into its output."""
    out = io.StringIO()
    view = ConsoleView(make_console(out), Redactor(), verbose=True)
    run = info()
    view.run_started(run)
    hostile = "ok\x1b]0;pwned\x07\n\x1b[2K\rweb2: deploy: ok\n\x9b31m\n"
    view.task_finished(run, TaskResult("web1", "deploy", "shell", Status.FAILED, stdout=hostile, rc=1))
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\x9b" not in text
    assert "    stdout| ok\\x1b]0;pwned\\x07" in text
    assert "    stdout| \\x1b[2K\\x0dweb2: deploy: ok" in text       # the forged line stays inside web1's output
