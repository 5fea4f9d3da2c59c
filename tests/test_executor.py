"""Scheduler and step semantics on local hosts (LocalConnection, no SSH): fast, real commands and files."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.errors import ConnectionFailed
from runbook.events import Observer, RunInfo
from runbook.engine import ExecOptions, Executor
from runbook.loader import load_playbook
from runbook.model import Limit
from runbook.results import RunResult, Status, TaskResult
from tests.helpers import EventRecorder, InventoryWriter, PlaybookWriter


def hdir(tmp_path: Path, host: str) -> Path:
    return tmp_path / "hosts" / host


def st(result: RunResult, host: str, sid: str) -> Status:
    r = result.get(host, sid)
    assert r is not None, f"no result for {host}/{sid}"
    return r.status


# --- order and graph -------------------------------------------------------------------------------


def test_needs_defaults_to_the_previous_step(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [{"name": n, "shell": f"echo {n} >> {{{{ dir }}}}/log"} for n in ("one", "two", "three", "four")]
    result = go(steps)
    assert result.exit_code() == 0
    assert (hdir(tmp_path, "a") / "log").read_text().split() == ["one", "two", "three", "four"]


def test_failure_blocks_descendants_on_that_host_only(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "root", "shell": "true"},
        {"name": "bad", "shell": "test {{ inventory_hostname }} != a"},
        {"name": "after-bad", "shell": "touch {{ dir }}/after-bad"},
        {"name": "side", "needs": ["root"], "shell": "touch {{ dir }}/side"},
        {"name": "join", "needs": ["after-bad", "side"], "shell": "touch {{ dir }}/join"},
    ]
    result = go(steps, hosts=["a", "b"])
    assert result.exit_code() == 2
    assert st(result, "a", "bad") == Status.FAILED
    assert st(result, "a", "after-bad") == Status.NOT_RUN and st(result, "a", "join") == Status.NOT_RUN
    assert "upstream step `bad` failed" in result.get("a", "after-bad").message
    # An independent branch of the failed host still ran; the other host is untouched by a's failure.
    assert (hdir(tmp_path, "a") / "side").exists() and not (hdir(tmp_path, "a") / "join").exists()
    assert (hdir(tmp_path, "b") / "join").exists()
    assert result.recap()["a"] == {"changed": 2, "failed": 1, "not_run": 2}


def test_concurrency_one_runs_hosts_one_at_a_time(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [{"name": "w", "shell": "date +%s.%N > {{ dir }}/s; sleep 0.1; date +%s.%N > {{ dir }}/e"}]
    result = go(steps, hosts=["a", "b", "c"], top={"concurrency": 1})
    assert result.exit_code() == 0
    spans = sorted((float((hdir(tmp_path, h) / "s").read_text()), float((hdir(tmp_path, h) / "e").read_text()))
                   for h in "abc")
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end


def test_batches_of_a_percentage(tmp_path: Path, write_playbook: PlaybookWriter) -> None:
    pb = load_playbook(write_playbook([{"name": "x", "shell": "true"}], batch="50%"))
    hosts = [type("H", (), {"name": n, "vars": {}})() for n in "abcde"]
    ex = Executor(pb, hosts, _info(), _events(), ExecOptions())
    assert list(ex.scheduler.batches) == [["a", "b", "c"], ["d", "e"]]
    assert Limit(10, percent=True).of(3) == 1


# --- step semantics ---------------------------------------------------------------------------------


def test_changed_when_and_failed_when(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "quiet", "shell": "echo nothing", "changed_when": "'changed' in result.stdout"},
        {"name": "loud", "shell": "echo changed", "changed_when": "'changed' in result.stdout"},
        {"name": "grep", "shell": "exit 1", "failed_when": "result.rc > 1"},
        {"name": "bad-output", "shell": "echo ERROR", "failed_when": "'ERROR' in result.stdout"},
    ]
    result = go(steps)
    assert st(result, "a", "quiet") == Status.OK
    assert st(result, "a", "loud") == Status.CHANGED
    assert st(result, "a", "grep") == Status.CHANGED and result.get("a", "grep").rc == 1
    assert st(result, "a", "bad-output") == Status.FAILED


@pytest.mark.parametrize("guard, prepare, runs", [
    ("creates", True, False), ("creates", False, True),
    ("removes", True, True), ("removes", False, False),
])
def test_file_guards(tmp_path: Path, guard: str, prepare: bool, runs: bool, go: Callable[..., RunResult]) -> None:
    d = hdir(tmp_path, "a")
    d.mkdir(parents=True)
    if prepare:
        (d / "flag").touch()
    result = go([{"name": "g", "shell": "touch {{ dir }}/ran", guard: "{{ dir }}/flag"}])
    assert (d / "ran").exists() is runs
    assert st(result, "a", "g") == (Status.CHANGED if runs else Status.SKIPPED)
    if not runs:
        assert result.get("a", "g").message.startswith(guard + ":")


def test_command_guards(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "unless-true", "shell": "touch {{ dir }}/u1", "unless": "true"},
        {"name": "unless-false", "shell": "touch {{ dir }}/u2", "unless": "false"},
        {"name": "only-if-true", "shell": "touch {{ dir }}/o1", "only_if": "true"},
        {"name": "only-if-false", "shell": "touch {{ dir }}/o2", "only_if": "exit 3"},
    ]
    result = go(steps)
    d = hdir(tmp_path, "a")
    assert sorted(p.name for p in d.iterdir()) == ["o1", "u2"]
    assert "rc=3" in result.get("a", "only-if-false").message
    assert result.exit_code() == 0


def test_until_alone_retries_three_times(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [{"name": "u", "shell": "echo x >> {{ dir }}/tries", "until": "false", "delay": 0}]
    result = go(steps)
    r = result.get("a", "u")
    assert r.status == Status.FAILED and r.attempts == 4 and "still false after 4 attempt(s)" in r.message
    assert len((hdir(tmp_path, "a") / "tries").read_text().split()) == 4


def test_register_of_a_skipped_step_and_undefined_variables(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "maybe", "shell": "echo hi", "when": "false", "register": "m"},
        {"name": "use", "shell": "echo {{ m.skipped }} {{ m.rc is none }} > {{ dir }}/out"},
        {"name": "typo", "shell": "echo {{ nope }}"},
    ]
    result = go(steps)
    assert (hdir(tmp_path, "a") / "out").read_text() == "True True\n"
    typo = result.get("a", "typo")
    assert typo.status == Status.FAILED and "nope" in typo.message


def test_variable_precedence(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "reg", "shell": "echo from-register", "register": "r"},
        {"name": "w", "shell": "echo {{ p }} {{ i }} {{ r.stdout | trim }} {{ e }} > {{ dir }}/vars"},
    ]
    top = {"vars": {"p": "playbook", "i": "playbook", "e": "playbook"}}
    result = go(steps, host_vars={"a": {"i": "inventory", "e": "inventory"}}, top=top,
                extra_vars={"e": "extra"})
    assert result.exit_code() == 0
    assert (hdir(tmp_path, "a") / "vars").read_text() == "playbook inventory from-register extra\n"


def test_once_result_is_shared_by_every_host(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "o", "shell": "echo token-{{ inventory_hostname }}; touch {{ dir }}/once", "once": True, "register": "t"},
        {"name": "u", "shell": "echo {{ t.stdout | trim }} > {{ dir }}/token"},
    ]
    result = go(steps, hosts=["a", "b", "c"])
    assert result.exit_code() == 0
    assert [h for h in "abc" if (hdir(tmp_path, h) / "once").exists()] == ["a"]
    assert {(hdir(tmp_path, h) / "token").read_text() for h in "abc"} == {"token-a\n"}
    assert len([r for r in result.results if r.step_id == "o"]) == 1


def test_tags_always_and_skip(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "t1", "shell": "touch {{ dir }}/t1", "tags": ["deploy"]},
        {"name": "t2", "shell": "touch {{ dir }}/t2", "tags": "always"},
        {"name": "t3", "shell": "touch {{ dir }}/t3"},
    ]
    go(steps, tags=frozenset({"deploy"}))
    assert sorted(p.name for p in hdir(tmp_path, "a").iterdir()) == ["t1", "t2"]
    for p in hdir(tmp_path, "a").iterdir():
        p.unlink()
    go(steps, skip_tags=frozenset({"always"}))
    assert sorted(p.name for p in hdir(tmp_path, "a").iterdir()) == ["t1", "t3"]


def test_on_failure_runs_after_the_hosts_main_tasks_settled(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "bad", "shell": "date +%s.%N > {{ dir }}/bad; exit 1"},
        {"name": "slow-branch", "needs": [], "shell": "sleep 0.2; date +%s.%N > {{ dir }}/slow"},
    ]
    top = {"on_failure": [{"name": "r1", "shell": "date +%s.%N > {{ dir }}/r1"},
                          {"name": "r2", "shell": "date +%s.%N > {{ dir }}/r2"}]}
    result = go(steps, hosts=["a", "b"], host_vars={"b": {}}, top=top)
    d = hdir(tmp_path, "a")
    t = {n: float((d / n).read_text()) for n in ("bad", "slow", "r1", "r2")}
    assert t["slow"] <= t["r1"] <= t["r2"]
    assert st(result, "a", "r1") == Status.CHANGED and st(result, "a", "r2") == Status.CHANGED
    assert result.exit_code() == 2


# --- hosts that cannot be reached, windows, events ---------------------------------------------------


def _info() -> RunInfo:
    return RunInfo("r1", "run", "pb.yml", "t", "", "", "", [], "tester", "ctl", "strict")


def _events(*observers: Observer) -> Any:
    from runbook.events import EventStream

    return EventStream(list(observers))


class Host:
    def __init__(self, name: str, **vars: Any) -> None:
        self.name = name
        self.vars = vars


def test_unreachable_host_is_reported_and_others_continue(tmp_path: Path, write_playbook: PlaybookWriter, event_recorder: EventRecorder) -> None:
    from runbook.connections.local import LocalConnection

    pb = load_playbook(write_playbook([
        {"name": "one", "shell": "touch {{ dir }}/one"},
        {"name": "two", "shell": "touch {{ dir }}/two"},
    ], on_failure=[{"name": "rescue", "shell": "touch {{ dir }}/rescue"}]))
    hosts = [Host(n, dir=str(hdir(tmp_path, n))) for n in ("a", "down", "c")]
    for h in hosts:
        Path(h.vars["dir"]).mkdir(parents=True)

    def connect(h: Any) -> Any:
        if h.name == "down":
            raise ConnectionFailed("down", "connection refused at 127.0.0.1:1")
        return LocalConnection(h.name)

    rec = event_recorder
    result = Executor(pb, hosts, _info(), _events(rec), ExecOptions(connect=connect)).execute()
    assert result.exit_code() == 3
    assert result.unreachable == {"down": "connection refused at 127.0.0.1:1"}
    assert {r.status for r in result.for_host("down")} == {Status.UNREACHABLE}
    assert ("host_unreachable", ("down", "connection refused at 127.0.0.1:1")) in rec.events
    assert not (hdir(tmp_path, "down") / "rescue").exists()   # nothing runs on a host we cannot reach
    for h in ("a", "c"):
        assert (hdir(tmp_path, h) / "two").exists()
    assert rec.events[0][0] == "run_started" and rec.events[-1] == ("run_finished", 3)
    finished = [e for e in rec.events if e[0] == "task_finished"]
    assert len(finished) == 6   # every task reports exactly once, unreachable ones included


def test_window_closing_defers_the_rest(tmp_path: Path, write_playbook: PlaybookWriter) -> None:
    from runbook.connections.local import LocalConnection

    class Guard:
        """Allows the first two task starts, then says the window closed."""

        def __init__(self) -> None:
            self.calls = 0

        def allows_start(self, max_duration: float | None) -> bool:
            self.calls += 1
            return self.calls <= 2

    pb = load_playbook(write_playbook([{"name": f"s{i}", "shell": f"touch {{{{ dir }}}}/s{i}"} for i in range(4)]))
    d = hdir(tmp_path, "a")
    d.mkdir(parents=True)
    result = Executor(pb, [Host("a", dir=str(d))], _info(), _events(),
                      ExecOptions(window_guard=Guard(), connect=lambda h: LocalConnection(h.name))).execute()
    assert [st(result, "a", f"s{i}") for i in range(4)] == [Status.CHANGED, Status.CHANGED, Status.DEFERRED, Status.DEFERRED]
    assert sorted(p.name for p in d.iterdir()) == ["s0", "s1"]
    assert result.stop_reason == "maintenance window closed"


def test_max_failures_percent_lets_running_hosts_finish(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "check", "shell": "test {{ inventory_hostname }} != a"},
        {"name": "after", "shell": "touch {{ dir }}/after"},
    ]
    # 4 hosts, concurrency 2, 25% = 1 failed host tolerated; two failures stop admitting hosts c and d.
    result = go([{**steps[0], "shell": "case {{ inventory_hostname }} in a|b) exit 1;; esac"}, steps[1]],
                hosts=["a", "b", "c", "d"], top={"concurrency": 2, "max_failures": "25%"})
    assert result.stop_reason and "max_failures exceeded: 2 of 4 hosts failed (limit 25%)" in result.stop_reason
    for h in ("c", "d"):
        assert {r.status for r in result.for_host(h)} == {Status.NOT_RUN}
        assert not (hdir(tmp_path, h) / "after").exists()
    assert result.exit_code() == 2


def test_plan_mode_changes_nothing_but_runs_read_only_steps(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    steps = [
        {"name": "probe", "shell": "echo 7", "read_only": True, "register": "p"},
        {"name": "write", "shell": "touch {{ dir }}/written", "when": "p.stdout | int > 5"},
        {"name": "guarded", "shell": "touch {{ dir }}/g", "creates": "{{ dir }}"},
    ]
    result = go(steps, mode="plan")
    assert sorted(p.name for p in hdir(tmp_path, "a").iterdir()) == []
    assert result.get("a", "probe").prediction == "ok"
    assert result.get("a", "write").prediction == "unknown"
    assert result.get("a", "guarded").prediction == "skip"


def test_apply_runs_checks_again_but_not_steps_planned_unchanged(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    """In apply, a step planned `ok` is not run, but an assert planned `ok` is checked again (it may fail now)."""
    from runbook.engine import SavedPrediction

    steps = [
        {"name": "noop", "shell": "echo ran >> {{ dir | quote }}/noop", "changed_when": False},
        {"name": "check", "assert": {"that": "threshold | int < 10", "msg": "threshold too high"}},
    ]
    predictions = {("noop", "a"): SavedPrediction("ok", "changed_when: false"),
                   ("check", "a"): SavedPrediction("ok", "all assertions passed")}
    result = go(steps, mode="apply", predictions=predictions, extra_vars={"threshold": 50})
    assert not (hdir(tmp_path, "a") / "noop").exists()       # planned no change: not run
    assert st(result, "a", "noop") == Status.OK
    check = result.get("a", "check")
    assert check is not None and check.status == Status.FAILED and check.message == "threshold too high"


def test_wait_for_port_and_sudo_may_come_from_variables(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    """`wait_for.port` and `sudo` accept templates, rendered per host."""
    import os
    import shutil
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        steps = [{"name": "up", "wait_for": {"port": "{{ app_port }}", "timeout": "5s"}}]
        result = go(steps, host_vars={"a": {"app_port": port}})
    assert st(result, "a", "up") == Status.OK
    bad = go(steps, host_vars={"a": {"app_port": "http"}})
    assert st(bad, "a", "up") == Status.FAILED and "expected a port number" in bad.get("a", "up").message
    if os.geteuid() != 0 or shutil.which("sudo") is None:
        pytest.skip("sudo to another user needs root and sudo on the test machine")
    who = go([{"name": "who", "command": ["whoami"], "sudo": "{{ app_user }}", "register": "w"}],
             host_vars={"a": {"app_user": "nobody"}})
    assert who.get("a", "who").stdout.strip() == "nobody"


def test_once_step_moves_to_the_next_host_when_the_first_is_unreachable(tmp_path: Path, write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    """A once step (notify, ticket) is not lost because the first selected host is the sick one."""
    inv = local_inventory(["b", "c"])
    doc = yaml.safe_load(inv.read_text())
    doc["all"]["hosts"] = {"a": {"ansible_host": "127.0.0.1", "ansible_port": 1}, **doc["all"]["hosts"]}
    inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    pb = write_playbook([
        {"name": "prep", "shell": "echo prep > {{ dir | quote }}/prep"},
        {"name": "notify", "once": True, "shell": "echo {{ inventory_hostname | quote }} >> {{ dir | quote }}/notified",
         "register": "note"},
        {"name": "after", "shell": "echo {{ note.stdout | default('') | quote }} > {{ dir | quote }}/after"},
    ])
    result = run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"),
                 host_key_checking="off", connect_timeout=2)
    assert result.unreachable.keys() == {"a"} and result.exit_code() == 3
    assert (hdir(tmp_path, "b") / "notified").read_text() == "b\n"        # once, on the next host
    assert not (hdir(tmp_path, "c") / "notified").exists()
    assert st(result, "b", "notify") == Status.CHANGED and st(result, "c", "after") == Status.CHANGED
    assert {r.host for r in result.results if r.step_id == "notify"} == {"b"}


def test_a_stop_event_stops_the_run_like_a_first_interrupt(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    """An embedding program (runbook serve shutting down) stops a run: nothing new starts, it is resumable."""
    import threading

    stop = threading.Event()

    class StopAfterFirst(Observer):
        critical = True

        def task_finished(self, run: RunInfo, result: TaskResult) -> None:
            stop.set()

    result = go([{"name": "one", "shell": "true"}, {"name": "two", "shell": "true"}], hosts=["a"],
                observers=[StopAfterFirst()], stop=stop)
    assert result.exit_code() == 130 and "shutting down" in (result.stop_reason or "")
    assert (st(result, "a", "one"), st(result, "a", "two")) == (Status.CHANGED, Status.NOT_RUN)


def test_apply_rechecks_a_no_change_that_an_earlier_planned_change_makes_stale(
        tmp_path: Path, write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    """A step predicted `ok` from the host's state runs in apply when an earlier step on the host changes it."""
    import json

    from tests.helpers import cli

    inv = local_inventory(["a"])
    target = tmp_path / "hosts" / "a" / "scratch"
    pb = write_playbook([
        {"name": "make scratch", "shell": f"touch {target}", "creates": str(target)},
        {"name": "remove scratch", "file": {"path": str(target), "state": "absent"}},
        {"name": "status", "shell": f"echo s >> {target}.status", "changed_when": False},
    ])
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    plan = tmp_path / "plan.json"
    assert cli("plan", str(pb), "-i", str(inv), "--out", str(plan), env=env).returncode == 0
    preds = {p["step_id"]: p["prediction"] for p in json.loads(plan.read_text())["predictions"]}
    assert preds == {"make-scratch": "change", "remove-scratch": "ok", "status": "ok"}   # read before the touch
    applied = cli("apply", str(plan), "--output", "json", env=env)
    assert applied.returncode == 0, applied.stderr
    by = {r["step_id"]: r["status"] for r in json.loads(applied.stdout)["results"]}
    assert by["remove-scratch"] == "changed" and not target.exists()     # re-checked, not skipped as planned
    assert by["status"] == "ok" and not Path(f"{target}.status").exists()  # rests on nothing: stands as reviewed
