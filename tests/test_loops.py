"""Loops on local hosts: items as tasks, registers, when/guards/retries per item, concurrency, plan, apply, resume, validate."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.audit import read_records
from runbook.engine.loops import MAX_ITEMS, safe_label
from runbook.events import Observer, RunInfo
from runbook.loader import validate_playbook
from runbook.results import RunResult, Status, TaskResult
from runbook.state import load_state
from tests.helpers import InventoryWriter, PlaybookWriter
from tests.helpers import run_main as cli


def hdir(tmp_path: Path, host: str = "a") -> Path:
    return tmp_path / "hosts" / host


def items_of(result: RunResult, sid: str, host: str = "a") -> list[TaskResult]:
    return [r for r in result.results if r.parent == sid and r.host == host]


def status_of(result: RunResult, key: str, host: str = "a") -> Status:
    r = result.get(host, key)
    assert r is not None, f"no result {key} on {host}: {[x.step_id for x in result.results]}"
    return r.status


# --- items as tasks ---------------------------------------------------------------------------------

def test_a_list_loop_runs_each_item_in_order_as_its_own_task(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "add", "shell": "echo {{ item | quote }} >> {{ dir }}/log", "loop": ["one", "two", "three"]}])
    assert result.exit_code() == 0
    assert (hdir(tmp_path) / "log").read_text().split() == ["one", "two", "three"]
    assert [r.step_id for r in items_of(result, "add")] == ["add[one]", "add[two]", "add[three]"]
    step = result.get("a", "add")
    assert step is not None and step.items == 3 and step.status == Status.CHANGED
    # The recap counts the items (three changed tasks), not the step over them as a fourth.
    assert result.recap()["a"]["changed"] == 3


def test_register_holds_each_items_result_with_the_item(go: Callable[..., RunResult]) -> None:
    result = go([
        {"name": "say", "shell": "echo hi-{{ who }}", "loop": ["x", "y"], "loop_var": "who", "index_var": "i",
         "register": "said", "changed_when": "who == 'y'"},
        {"name": "check", "assert": ["said.results | length == 2", "said.results[0].stdout == 'hi-x\\n'",
                                     "said.results[1].who == 'y'", "said.results[1].item == 'y'",
                                     "said.results[1].i == 1", "said.changed", "not said.results[0].changed",
                                     "not said.failed"]},
    ])
    assert status_of(result, "check") == Status.OK, result.get("a", "check")


def test_a_mapping_loop_gives_key_and_value_items(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "kv", "shell": "echo {{ item.key }}={{ item.value }} >> {{ dir }}/kv",
                  "loop": {"port": 80, "host": "web"}, "label": "{{ item.key }}"}])
    assert result.exit_code() == 0
    assert (hdir(tmp_path) / "kv").read_text().split() == ["port=80", "host=web"]
    assert {r.step_id for r in items_of(result, "kv")} == {"kv[port]", "kv[host]"}


@pytest.mark.parametrize("expr", ["users | selectattr('admin') | map(attribute='name')", "{{ users | selectattr('admin') | map(attribute='name') }}"])
def test_an_expression_loop_is_written_as_when_is(tmp_path: Path, go: Callable[..., RunResult], expr: str) -> None:
    users = [{"name": "ann", "admin": True}, {"name": "bob", "admin": False}, {"name": "cy", "admin": True}]
    result = go([{"name": "admins", "shell": "echo {{ item }} >> {{ dir }}/admins", "loop": expr}], top={"vars": {"users": users}})
    assert result.exit_code() == 0
    assert (hdir(tmp_path) / "admins").read_text().split() == ["ann", "cy"]


def test_an_expression_that_is_not_a_list_fails_the_step_clearly(go: Callable[..., RunResult]) -> None:
    result = go([{"name": "bad", "shell": "true", "loop": "who"}], top={"vars": {"who": "just-a-string"}})
    r = result.get("a", "bad")
    assert r is not None and r.status == Status.FAILED
    assert "gave the string" in r.message and "expected a list or a mapping" in r.message


def test_default_labels_name_mappings_by_their_name_and_collisions_get_an_index(go: Callable[..., RunResult]) -> None:
    result = go([{"name": "u", "shell": "true", "loop": [{"name": "ann", "uid": 1}, {"name": "ann", "uid": 2}, "ann"]}])
    keys = [r.step_id for r in items_of(result, "u")]
    assert keys == ["u[ann]", "u[ann#1]", "u[ann#2]"]
    assert len(set(keys)) == 3


def test_when_is_evaluated_per_item_with_the_loop_var(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "even", "shell": "echo {{ n }} >> {{ dir }}/even", "loop": [1, 2, 3, 4], "loop_var": "n",
                  "when": "n % 2 == 0"}])
    assert (hdir(tmp_path) / "even").read_text().split() == ["2", "4"]
    assert [r.status for r in items_of(result, "even")] == [Status.SKIPPED, Status.CHANGED, Status.SKIPPED, Status.CHANGED]


def test_guards_retries_and_failed_when_apply_per_item(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    (hdir(tmp_path)).mkdir(parents=True, exist_ok=True)
    (hdir(tmp_path) / "b").write_text("there")
    result = go([
        {"name": "make", "shell": "touch {{ dir }}/{{ item }}", "creates": "{{ dir }}/{{ item }}", "loop": ["a", "b"]},
        # Each item succeeds on its own second attempt: the counter is per item.
        {"name": "flaky", "shell": "echo x >> {{ dir }}/try-{{ item }}; test $(wc -l < {{ dir }}/try-{{ item }}) -ge 2",
         "retries": 2, "loop": ["p", "q"]},
        {"name": "judge", "shell": "echo {{ item }}", "failed_when": "result.stdout.strip() == 'bad'",
         "loop": ["good", "bad"], "ignore_errors": True},
    ])
    assert [r.status for r in items_of(result, "make")] == [Status.CHANGED, Status.SKIPPED]
    assert [r.attempts for r in items_of(result, "flaky")] == [2, 2]
    assert [r.status for r in items_of(result, "judge")] == [Status.CHANGED, Status.FAILED]
    judged = result.get("a", "judge")
    assert judged is not None and judged.status == Status.FAILED and judged.ignored


def test_a_failed_item_fails_the_step_after_the_other_items_ran(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([
        {"name": "each", "shell": "test {{ item }} != 2 && echo {{ item }} >> {{ dir }}/ran", "loop": [1, 2, 3]},
        {"name": "after", "shell": "touch {{ dir }}/after"},
    ])
    assert (hdir(tmp_path) / "ran").read_text().split() == ["1", "3"]
    assert status_of(result, "each") == Status.FAILED
    assert "1 of 3 item(s) failed" in result.get("a", "each").message  # type: ignore[union-attr]
    assert status_of(result, "after") == Status.NOT_RUN
    assert not (hdir(tmp_path) / "after").exists()
    assert result.exit_code() == 2


def test_loop_concurrency_runs_items_of_a_host_at_once(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    # Each item waits until all three have started: only items that run at the same time can all pass.
    wait_all = ("touch {{ dir }}/started-{{ item }}; for i in $(seq 100); do "
                "[ $(ls {{ dir }} | grep -c '^started-') -ge 3 ] && exit 0; sleep 0.05; done; exit 1")
    together = go([{"name": "w", "shell": wait_all, "loop": [1, 2, 3], "loop_concurrency": 3}])
    assert together.exit_code() == 0, [r.message for r in together.results]
    for f in hdir(tmp_path).iterdir():
        f.unlink()
    one_by_one = go([{"name": "w", "shell": wait_all.replace("seq 100", "seq 2"), "loop": [1, 2, 3]}])
    assert status_of(one_by_one, "w[1]") == Status.FAILED   # in order: the first item waits alone


def test_once_with_a_loop_runs_the_items_once(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    log = tmp_path / "once.log"
    result = go([{"name": "notify", "shell": f"echo {{{{ item }}}} >> {log}", "loop": ["x", "y"], "once": True,
                  "register": "sent"},
                 {"name": "seen", "assert": ["sent.results | length == 2"]}], hosts=["a", "b"])
    assert log.read_text().split() == ["x", "y"]
    assert status_of(result, "seen", "b") == Status.OK


def test_an_empty_loop_is_one_skipped_task_with_an_empty_register(go: Callable[..., RunResult]) -> None:
    result = go([{"name": "none", "shell": "false", "loop": [], "register": "r"},
                 {"name": "check", "assert": ["r.results == []", "r.skipped", "not r.changed"]}])
    assert status_of(result, "none") == Status.SKIPPED
    assert status_of(result, "check") == Status.OK
    assert result.recap()["a"]["skipped"] == 1


def test_items_are_in_the_audit_trail_and_the_state_file(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "s", "shell": "true", "loop": ["p", "q"]}])
    finished = [r for r in read_records(tmp_path / "audit.jsonl") if r.get("event") == "task.finished"]
    assert [(r["step_id"], r.get("parent"), r.get("item_label")) for r in finished] == [
        ("s[p]", "s", "p"), ("s[q]", "s", "q"), ("s", None, None)]
    assert finished[-1]["items"] == 2
    state = load_state(tmp_path / "runs", result.run_id)
    assert {"s[p]@a", "s[q]@a", "s@a"} <= set(state["tasks"])
    # Older readers rebuild every entry.
    for d in state["tasks"].values():
        TaskResult.from_dict(d)


def test_results_saved_before_loops_still_load() -> None:
    old = {"host": "a", "step_id": "s", "action": "shell", "status": "ok", "data": {"prediction": "ok", "registered": 1}}
    r = TaskResult.from_dict(old)
    assert r.parent is None and r.items is None and r.item_results == [] and r.prediction is not None
    item = TaskResult("a", "s[x]", "shell", Status.CHANGED, parent="s", item_label="x", item_index=0, item={"k": 1})
    again = TaskResult.from_dict(json.loads(json.dumps(item.as_dict())))
    assert (again.parent, again.item_label, again.item_index, again.item) == ("s", "x", 0, {"k": 1})
    assert "item_results" not in item.as_dict()


# --- plan, apply, resume -----------------------------------------------------------------------------

def _plan_doc(capsys: pytest.CaptureFixture[str], pb: Path, inv: Path, out: Path, tmp_path: Path) -> tuple[int, dict, str]:
    code, text, err = cli(capsys, "plan", pb, "-i", inv, "--out", out, "--audit-log", tmp_path / "audit.jsonl")
    return code, json.loads(out.read_text()) if out.exists() else {}, text + err


def test_plan_predicts_each_item_and_apply_does_as_reviewed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    d = hdir(tmp_path)
    (d / "old").write_text("x")
    pb = write_playbook([{"name": "files", "shell": "echo made >> {{ dir }}/{{ item }}", "creates": "{{ dir }}/{{ item }}",
                          "loop": ["old", "new"]}])
    code, doc, err = _plan_doc(capsys, pb, inv, tmp_path / "plan.json", tmp_path)
    assert code == 0, err
    preds = {p["step_id"]: p for p in doc["predictions"]}
    assert preds["files[old]"]["prediction"] == "skip" and preds["files[new]"]["prediction"] == "change"
    assert preds["files"]["prediction"] == "change" and preds["files"]["items"] == 2
    assert preds["files[new]"]["parent"] == "files" and preds["files[new]"]["item_label"] == "new"
    assert not (d / "new").exists()   # the dry run changed nothing
    assert "      + files[new]" in err and "      - files[old]" in err
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-i", inv, "--audit-log", tmp_path / "audit.jsonl")
    assert code == 0, err
    assert (d / "new").read_text() == "made\n" and (d / "old").read_text() == "x"


def test_a_loop_over_a_read_only_register_is_expanded_in_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  write_playbook: PlaybookWriter,
                                                                  local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    d = hdir(tmp_path)
    for name in ("x.conf", "y.conf"):
        (d / name).write_text("")
    pb = write_playbook([
        {"name": "list", "shell": "ls {{ dir }} | grep conf", "read_only": True, "register": "confs"},
        {"name": "back up", "shell": "cp {{ dir }}/{{ item }} {{ dir }}/{{ item }}.bak",
         "creates": "{{ dir }}/{{ item }}.bak", "loop": "confs.stdout_lines"},
        {"name": "blind", "shell": "echo hi", "register": "blind"},
        {"name": "over blind", "shell": "true", "loop": "blind.stdout_lines"},
    ])
    code, doc, err = _plan_doc(capsys, pb, inv, tmp_path / "plan.json", tmp_path)
    preds = {p["step_id"]: p for p in doc["predictions"]}
    assert preds["back-up[x.conf]"]["prediction"] == "change" and preds["back-up[y.conf]"]["prediction"] == "change"
    over = preds["over-blind"]
    assert over["prediction"] == "unknown" and "not known in a dry run" in over["reason"] and "blind" in over["reason"]
    assert not [k for k in preds if k.startswith("over-blind[")]   # one unknown, not a guess at items
    # Apply: a new file appeared since the review, so the item list differs: drift, naming the new item.
    (d / "z.conf").write_text("")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-i", inv, "--audit-log", tmp_path / "audit.jsonl")
    assert code == 2
    assert "new items: z.conf" in err, err
    assert not (d / "x.conf.bak").exists()   # refused before any planned change


def test_resume_does_not_rerun_finished_items(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    d = hdir(tmp_path)
    pb = write_playbook([{"name": "each", "shell": "echo {{ item }} >> {{ dir }}/count; test {{ item }} != 2 || test -f {{ dir }}/ok",
                          "loop": [1, 2, 3], "register": "r"},
                         {"name": "after", "assert": ["r.results | length == 3", "r.results[0].item == 1"]}])
    audit, runs = tmp_path / "audit.jsonl", tmp_path / "runs"
    first = run(pb, str(inv), audit_log=str(audit), state_dir=str(runs))
    assert first.exit_code() == 2
    (d / "ok").write_text("")
    code, _, err = cli(capsys, "resume", first.run_id, "-i", inv, "--audit-log", audit, "--state-dir", runs)
    assert code == 0, err
    # Items 1 and 3 ran once (first run), item 2 twice (failed, then resumed).
    assert (d / "count").read_text().split() == ["1", "2", "3", "2"]


# --- validate --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("step", "needle", "key"), [
    ({"loop_var": "x"}, "`loop_var` is set but the step has no `loop`", "loop_var"),
    ({"index_var": "i"}, "`index_var` is set but the step has no `loop`", "index_var"),
    ({"label": "{{ x }}"}, "`label` is set but the step has no `loop`", "label"),
    ({"loop_concurrency": 2}, "`loop_concurrency` is set but the step has no `loop`", "loop_concurrency"),
    ({"loop": [1], "loop_var": "host"}, "shadows the reserved name `host`", "loop_var"),
    ({"loop": [1], "index_var": "item"}, "`index_var` and the loop variable are both `item`", "index_var"),
    ({"loop": [1], "loop_concurrency": 0}, "must be greater than or equal to 1", "loop_concurrency"),
    ({"loop": 5}, "expected a list, a mapping, or an expression", "loop"),
    ({"loop": True}, "got the boolean true", "loop"),
])
def test_loop_misuse_is_a_located_error(tmp_path: Path, step: dict[str, Any], needle: str, key: str) -> None:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [{"name": "s", "shell": "true", **step}]}, sort_keys=False))
    report = validate_playbook(path)
    errors = [p for p in report.errors if needle in p.message]
    assert errors, [p.render() for p in report.problems]
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip().startswith(key + ":"))
    assert errors[0].location is not None and errors[0].location.line == line


def test_validate_knows_the_loop_variables_and_checks_the_loop_expression(tmp_path: Path) -> None:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "vars": {"users": []}, "steps": [
        {"name": "s", "shell": "echo {{ u | quote }} {{ n }}", "loop": "users", "loop_var": "u", "index_var": "n"},
        {"name": "t", "shell": "true", "loop": "userz"}]}, sort_keys=False))
    report = validate_playbook(path)
    undefined = [p.message for p in report.problems if p.code == "undefined-variable"]
    assert len(undefined) == 1 and "userz" in undefined[0]


# --- attacks --------------------------------------------------------------------------------------

def test_an_oversize_item_list_is_refused_with_the_limit(go: Callable[..., RunResult]) -> None:
    result = go([{"name": "huge", "shell": "true", "loop": f"range({MAX_ITEMS + 1})"}])
    r = result.get("a", "huge")
    assert r is not None and r.status == Status.FAILED
    assert f"more than {MAX_ITEMS:,} items" in r.message
    assert not items_of(result, "huge")   # refused before any item ran


def test_hostile_labels_are_shown_safely_and_keep_keys_and_plans_intact(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                        write_playbook: PlaybookWriter,
                                                                        local_inventory: InventoryWriter) -> None:
    hostile = ["a\nb", "\x1b[2J\x1b]0;pwned\x07", "x]y[z", "\r\u202eevil", "a" * 500, "a\nb"]
    inv = local_inventory(["a"])
    pb = write_playbook([{"name": "h", "shell": "true", "loop": hostile, "changed_when": False}])
    result = run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"))
    keys = [r.step_id for r in items_of(result, "h")]
    assert len(set(keys)) == len(hostile)
    for k in keys:
        assert k.startswith("h[") and k.endswith("]") and k.count("]") == 1
        assert not any(ord(c) < 0x20 or c in "\x7f\u202e" for c in k)
        assert len(k) < 100
    assert safe_label("x]y") == "x\\x5dy"
    code, _, err = cli(capsys, "plan", pb, "-i", inv, "--out", tmp_path / "plan.json", "--audit-log", tmp_path / "audit.jsonl")
    assert code == 0, err
    assert "\x1b" not in err and "\u202e" not in err
    doc = json.loads((tmp_path / "plan.json").read_text())   # the plan file loads and is accepted back
    code, _, err = cli(capsys, "show", tmp_path / "plan.json")
    assert code == 0 and "\x1b[2J" not in err
    assert len([p for p in doc["predictions"] if p.get("parent") == "h"]) == len(hostile)


def test_a_secret_inside_an_item_is_redacted_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        write_playbook: PlaybookWriter, local_inventory: InventoryWriter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    declared, literal = "Decl4red-S3cret-loop", "L1teral-pa55word-loop"
    monkeypatch.setenv("LOOP_SECRET", declared)
    inv = local_inventory(["a"])
    pb = write_playbook([
        {"name": "users", "shell": "echo {{ item.name }} {{ item.password }}", "loop": [
            {"name": "app", "password": literal}, {"name": "db", "password": "{{ db_pw }}"}]},
        {"name": "tokens", "shell": "echo {{ item }}", "loop": ["{{ db_pw }}", "plain"]},
        {"name": "labelled", "shell": "true", "loop": [{"user": "x", "password": literal}], "label": "{{ item.password }}"},
    ], secrets={"db_pw": "env:LOOP_SECRET"})
    audit = tmp_path / "audit.jsonl"
    code, out, err = cli(capsys, "run", pb, "-i", inv, "--audit-log", audit, "-v", "--format", "json")
    assert code == 0, err
    code2, _, perr = cli(capsys, "plan", pb, "-i", inv, "--out", tmp_path / "plan.json", "--audit-log", audit)
    assert code2 == 0, perr
    state = "".join(p.read_text() for p in (tmp_path / "runs").glob("*"))
    assert state   # the run's state and journal are checked too
    everything = out + err + perr + audit.read_text() + (tmp_path / "plan.json").read_text() + state
    assert declared not in everything and literal not in everything
    assert "tokens[***]" in err and "labelled[***]" in err


def test_until_is_checked_per_item(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "grow", "shell": "echo x >> {{ dir }}/{{ item }}; wc -l < {{ dir }}/{{ item }}",
                  "until": "result.stdout | int >= item", "retries": 4, "loop": [1, 3]}])
    assert [r.attempts for r in items_of(result, "grow")] == [1, 3]
    assert result.exit_code() == 0


class _StopAfter(Observer):
    """Sets the run's stop event when a given task finishes (critical: before anything else starts)."""

    critical = True

    def __init__(self, key: str, stop: threading.Event):
        self.key, self.stop = key, stop

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        if result.step_id == self.key:
            self.stop.set()


def test_a_stopped_run_starts_no_new_item_and_resume_runs_only_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], write_playbook: PlaybookWriter,
        local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    pb = write_playbook([{"name": "each", "shell": "echo {{ item }} >> {{ dir }}/count", "loop": [1, 2, 3]}])
    audit, runs = tmp_path / "audit.jsonl", tmp_path / "runs"
    stop = threading.Event()
    first = run(pb, str(inv), audit_log=str(audit), state_dir=str(runs), stop=stop, observers=[_StopAfter("each[1]", stop)])
    assert (hdir(tmp_path) / "count").read_text().split() == ["1"]
    assert [r.status for r in items_of(first, "each")] == [Status.CHANGED, Status.NOT_RUN, Status.NOT_RUN]
    assert status_of(first, "each") == Status.NOT_RUN
    code, _, err = cli(capsys, "resume", first.run_id, "-i", inv, "--audit-log", audit, "--state-dir", runs)
    assert code == 0, err
    assert (hdir(tmp_path) / "count").read_text().split() == ["1", "2", "3"]


def test_apply_refuses_an_item_drift_before_any_concurrent_item_changes_the_host(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], write_playbook: PlaybookWriter,
        local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    d = hdir(tmp_path)
    (d / "p").write_text("")
    pb = write_playbook([{"name": "mk", "shell": "touch {{ dir }}/{{ item }}", "creates": "{{ dir }}/{{ item }}",
                          "loop": ["p", "q", "r", "s"], "loop_concurrency": 4}])
    code, doc, out = _plan_doc(capsys, pb, inv, tmp_path / "plan.json", tmp_path)
    assert [p["prediction"] for p in doc["predictions"] if p.get("parent")] == ["skip", "change", "change", "change"]
    (d / "p").unlink()   # what the reviewed `skip` rested on is gone
    code, out, err = cli(capsys, "apply", tmp_path / "plan.json", "-i", inv, "--audit-log", tmp_path / "audit.jsonl",
                         "--format", "json")
    assert code == 2
    statuses = {r["step_id"]: r["status"] for r in json.loads(out)["results"]}
    assert statuses["mk[p]"] == "drift" and statuses["mk"] == "drift"
    assert {statuses[f"mk[{x}]"] for x in "qrs"} == {"not_run"}
    assert sorted(p.name for p in d.iterdir()) == []   # nothing was changed: no item ran


def test_item_outside_a_loop_is_reported_with_a_hint_naming_loop(tmp_path: Path) -> None:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [{"name": "s", "shell": "echo {{ item | quote }}"}]}))
    (problem,) = [p for p in validate_playbook(path).problems if p.code == "undefined-variable"]
    assert "`item`" in problem.message and problem.hint is not None and "loop:" in problem.hint


def test_a_plan_knows_what_a_loops_register_can_tell(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    inv = local_inventory(["a"])
    d = hdir(tmp_path)
    (d / "x").write_text("")
    pb = write_playbook([
        {"name": "probe", "shell": "test -e {{ dir }}/{{ item }} && echo yes || echo no", "read_only": True,
         "loop": ["x", "y"], "register": "probe"},
        {"name": "missing", "shell": "touch {{ dir }}/missing", "creates": "{{ dir }}/missing",
         "when": "probe.results | selectattr('stdout', 'eq', 'no\\n') | list"},
        {"name": "all there", "shell": "touch {{ dir }}/never", "creates": "{{ dir }}/never",
         "when": "probe.results | selectattr('stdout', 'eq', 'no\\n') | list | length == 0"},
        {"name": "make", "shell": "touch {{ dir }}/{{ item }}", "creates": "{{ dir }}/{{ item }}", "loop": ["x", "z"],
         "register": "made"},
        {"name": "reload", "shell": "touch {{ dir }}/reloaded", "creates": "{{ dir }}/reloaded", "when": "made.changed"},
        {"name": "reads output", "shell": "true", "when": "made.results[1].stdout == ''"},
        {"name": "keep", "shell": "touch {{ dir }}/{{ item }}", "creates": "{{ dir }}/{{ item }}", "loop": ["x"],
         "register": "kept"},
        {"name": "no reload", "shell": "touch {{ dir }}/no-reload", "creates": "{{ dir }}/no-reload", "when": "kept.changed"},
    ])
    code, doc, out = _plan_doc(capsys, pb, inv, tmp_path / "plan.json", tmp_path)
    assert code == 0, out
    preds = {p["step_id"]: p for p in doc["predictions"]}
    assert preds["probe[y]"]["prediction"] == "ok" and preds["probe"]["read_only"]
    assert preds["missing"]["prediction"] == "change"          # decided from the read_only loop's real output
    assert preds["all-there"]["prediction"] == "skip"
    assert preds["make[x]"]["prediction"] == "skip" and preds["make[z]"]["prediction"] == "change"
    assert preds["reload"]["prediction"] == "change"            # `made.changed` is known: an item will change
    assert preds["reads-output"]["prediction"] == "unknown"     # an item's output is not
    assert "made" in preds["reads-output"]["reason"] and "dry run" in preds["reads-output"]["reason"]
    assert preds["no-reload"]["prediction"] == "skip"           # no item of `keep` changes
    assert sorted(p.name for p in d.iterdir()) == ["x"]


def test_an_oversize_literal_loop_is_refused_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [{"name": "s", "shell": "true",
                                                               "loop": list(range(MAX_ITEMS + 1))}]}))
    (problem,) = [p for p in validate_playbook(path).errors if p.code == "loop-misuse"]
    key_line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "loop:" in ln)
    assert f"{MAX_ITEMS + 1:,} items" in problem.message
    assert problem.location is not None and problem.location.line in (key_line, key_line + 1)   # the list, below its key


def test_step_vars_may_feed_the_loop_and_read_the_item(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go([{"name": "s", "vars": {"names": ["ann", "bob"], "path": "{{ dir }}/{{ item }}.txt"},
                  "shell": "echo {{ item }} > {{ path | quote }}", "loop": "names", "label": "{{ path | basename }}"}])
    assert result.exit_code() == 0, [r.message for r in result.results]
    assert (hdir(tmp_path) / "ann.txt").read_text() == "ann\n" and (hdir(tmp_path) / "bob.txt").read_text() == "bob\n"
    assert [r.step_id for r in items_of(result, "s")] == ["s[ann.txt]", "s[bob.txt]"]
