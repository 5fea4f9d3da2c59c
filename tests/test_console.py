"""The terminal view: plain lines off a terminal, recap, plan rendering, redaction, host-key warning."""

from __future__ import annotations

import io

from runbook.audit import Redactor
from runbook.console import ConsoleView, make_console, recap_text, render_plan
from runbook.events import RunInfo
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
    assert "    login with *** failed" in text and "hunter22" not in text
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
