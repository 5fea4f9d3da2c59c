"""Block semantics on local hosts: rescue where a step failed, always whatever happened, failure accounting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runbook import run
from runbook.results import RunResult, Status, TaskResult
from tests.helpers import EventRecorder, InventoryWriter, PlaybookWriter


def res(result: RunResult, host: str, sid: str) -> TaskResult:
    found = result.get(host, sid)
    assert found is not None, f"no result for {host}/{sid}"
    return found


def log(tmp_path: Path, host: str) -> list[str]:
    path = tmp_path / "hosts" / host / "log"
    return path.read_text().split() if path.exists() else []


def sh(word: str, ok: str = "true") -> str:
    """A command that logs `word`, then succeeds when the shell test `ok` holds."""
    return f"echo {word} >> {{{{ dir }}}}/log && {ok}"


def guarded_block(fail_on: str = "a") -> list[dict[str, Any]]:
    return [
        {"name": "before", "shell": sh("before")},
        {"name": "deploy", "block": [
            {"name": "one", "shell": sh("one", f"test {{{{ inventory_hostname }}}} != {fail_on}")},
            {"name": "two", "shell": sh("two")},
        ], "rescue": [
            {"name": "undo", "shell": sh("undo")},
        ], "always": [
            {"name": "tidy", "shell": sh("tidy")},
        ]},
        {"name": "after", "shell": sh("after")},
    ]


def test_rescue_runs_only_where_a_block_step_failed_and_the_host_goes_on(tmp_path: Path, go) -> None:
    result = go(guarded_block(), hosts=["a", "b"])
    assert log(tmp_path, "a") == ["before", "one", "undo", "tidy", "after"]
    assert log(tmp_path, "b") == ["before", "one", "two", "tidy", "after"]
    one = res(result, "a", "one")
    assert one.status == Status.FAILED and one.rescued and not one.failed
    assert res(result, "a", "two").status == Status.NOT_RUN
    assert res(result, "b", "undo").status == Status.SKIPPED
    assert "no rescue needed" in res(result, "b", "undo").message
    assert result.exit_code() == 0
    assert result.rescued_hosts() == ["a"]
    assert result.recap()["a"]["rescued"] == 1 and "failed" not in result.recap()["a"]
    assert result.as_dict()["rescued_hosts"] == ["a"]


def test_failed_rescue_fails_the_host_after_always(tmp_path: Path, go) -> None:
    steps = guarded_block()
    steps[1]["rescue"] = [{"name": "undo", "shell": sh("undo", "false")}]
    result = go(steps)
    assert log(tmp_path, "a") == ["before", "one", "undo", "tidy"]
    assert not res(result, "a", "one").rescued
    after = res(result, "a", "after")
    assert after.status == Status.NOT_RUN and "block `deploy` failed" in after.message
    assert result.exit_code() == 2
    assert result.rescued_hosts() == []


def test_always_without_rescue_runs_and_the_host_stays_failed(tmp_path: Path, go) -> None:
    steps = guarded_block()
    del steps[1]["rescue"]
    result = go(steps)
    assert log(tmp_path, "a") == ["before", "one", "tidy"]
    assert res(result, "a", "tidy").status == Status.CHANGED
    assert res(result, "a", "after").status == Status.NOT_RUN
    assert result.exit_code() == 2


def test_a_failing_always_step_fails_the_block(tmp_path: Path, go) -> None:
    steps = guarded_block(fail_on="nobody")
    steps[1]["always"] = [{"name": "tidy", "shell": sh("tidy", "false")}]
    result = go(steps)
    assert log(tmp_path, "a") == ["before", "one", "two", "tidy"]
    assert res(result, "a", "after").status == Status.NOT_RUN
    assert result.exit_code() == 2


def test_a_host_that_failed_before_the_block_runs_none_of_it(tmp_path: Path, go) -> None:
    steps = guarded_block(fail_on="nobody")
    steps[0]["shell"] = sh("before", "false")
    result = go(steps)
    assert log(tmp_path, "a") == ["before"]
    for sid in ("one", "two", "undo", "tidy", "after"):
        assert res(result, "a", sid).status == Status.NOT_RUN, sid


def test_rescued_failures_do_not_count_for_max_failures_or_on_failure(tmp_path: Path, go) -> None:
    steps = guarded_block(fail_on="$(echo {{ inventory_hostname }})")   # fails everywhere: every host rescued
    top = {"max_failures": 0, "concurrency": 1, "on_failure": [{"name": "page", "shell": sh("page")}]}
    result = go(steps, hosts=["a", "b", "c"], top=top)
    for host in ("a", "b", "c"):
        assert log(tmp_path, host) == ["before", "one", "undo", "tidy", "after"], host
    assert result.stop_reason is None
    assert result.exit_code() == 0
    assert result.rescued_hosts() == ["a", "b", "c"]


def test_unrescued_failure_counts_once_the_block_ends(tmp_path: Path, go) -> None:
    steps = guarded_block(fail_on="$(echo {{ inventory_hostname }})")
    steps[1]["rescue"] = [{"name": "undo", "shell": sh("undo", "false")}]
    top = {"max_failures": 0, "concurrency": 1, "on_failure": [{"name": "page", "shell": sh("page")}]}
    result = go(steps, hosts=["a", "b"], top=top)
    assert log(tmp_path, "a") == ["before", "one", "undo", "tidy", "page"]
    assert log(tmp_path, "b") == []       # max_failures 0: no new host after a failed one
    assert result.stop_reason and "max_failures" in result.stop_reason


def test_nested_blocks_an_inner_rescue_keeps_the_outer_block_going(tmp_path: Path, go) -> None:
    steps = [{"name": "outer", "block": [
        {"name": "inner", "block": [{"name": "boom", "shell": sh("boom", "false")}],
         "rescue": [{"name": "inner-fix", "shell": sh("inner-fix")}]},
        {"name": "next", "shell": sh("next")},
    ], "rescue": [{"name": "outer-fix", "shell": sh("outer-fix")}]}]
    result = go(steps)
    assert log(tmp_path, "a") == ["boom", "inner-fix", "next"]
    assert res(result, "a", "outer-fix").status == Status.SKIPPED
    assert res(result, "a", "boom").rescued
    assert result.exit_code() == 0


def test_nested_blocks_a_failed_inner_rescue_is_rescued_by_the_outer(tmp_path: Path, go) -> None:
    steps = [{"name": "outer", "block": [
        {"name": "inner", "block": [{"name": "boom", "shell": sh("boom", "false")}],
         "rescue": [{"name": "inner-fix", "shell": sh("inner-fix", "false")}]},
        {"name": "next", "shell": sh("next")},
    ], "rescue": [{"name": "outer-fix", "shell": sh("outer-fix")}]}]
    result = go(steps)
    assert log(tmp_path, "a") == ["boom", "inner-fix", "outer-fix"]
    assert res(result, "a", "boom").rescued and res(result, "a", "inner-fix").rescued
    assert result.exit_code() == 0


def test_block_keys_apply_to_every_step_inside(tmp_path: Path, go) -> None:
    steps = [{"name": "grp", "when": "flag == 'on'", "vars": {"word": "hello"}, "tags": ["web"], "block": [
        {"name": "say", "shell": "echo {{ word }}-{{ extra }} >> {{ dir }}/log", "vars": {"extra": "x"}},
        {"name": "say-inner-when", "when": "word == 'nope'", "shell": sh("never")},
    ]}]
    result = go(steps, hosts=["a", "b"], host_vars={"a": {"flag": "on"}, "b": {"flag": "off"}})
    assert log(tmp_path, "a") == ["hello-x"]
    assert log(tmp_path, "b") == []
    assert res(result, "b", "say").status == Status.SKIPPED
    assert res(result, "a", "say-inner-when").status == Status.SKIPPED
    skipped = go(steps, hosts=["a"], host_vars={"a": {"flag": "on"}}, skip_tags=frozenset({"web"}))
    assert res(skipped, "a", "say").status == Status.SKIPPED


def test_step_vars_are_below_extra_vars_and_above_inventory(tmp_path: Path, go) -> None:
    steps = [{"name": "say", "vars": {"word": "step", "other": "{{ word }}-rendered"},
              "shell": "echo {{ word }} {{ other }} >> {{ dir }}/log"}]
    go(steps, host_vars={"a": {"word": "inventory"}})
    assert log(tmp_path, "a") == ["step", "step-rendered"]
    go(steps, host_vars={"a": {"word": "inventory"}}, extra_vars={"word": "cli"})
    assert log(tmp_path, "a")[2:] == ["cli", "cli-rendered"]


def test_rescue_sees_the_failed_register_and_events_say_rescued(tmp_path: Path, go, event_recorder: EventRecorder) -> None:
    steps = [{"name": "deploy", "block": [{"name": "try", "register": "attempt", "shell": "echo tried; exit 3"}],
              "rescue": [{"name": "report", "shell": "echo rc={{ attempt.rc }} >> {{ dir }}/log"}]}]
    result = go(steps, observers=[event_recorder])
    assert log(tmp_path, "a") == ["rc=3"]
    assert ("block_rescued", ("a", "deploy", ("try",))) in event_recorder.events
    # After the rescue's own result: the block is rescued once its steps all ended.
    order = [e for e in event_recorder.events if e[0] in ("task_finished", "block_rescued")]
    assert order.index(("block_rescued", ("a", "deploy", ("try",)))) > order.index(("task_finished", ("a", "report", "changed")))
    assert result.exit_code() == 0


def test_a_rescued_failure_is_saved_rescued_and_resume_does_not_run_it_again(
        tmp_path: Path, write_playbook: PlaybookWriter, local_inventory: InventoryWriter,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The rescue (a rollback, say) ran for the failure: running the step again would leave a second one unrescued."""
    import json

    from runbook.cli import main
    from runbook.report.data import audit_results

    steps = [*guarded_block(), {"name": "last", "shell": sh("last", "test -e {{ dir }}/go")}]
    pb, inv = write_playbook(steps), local_inventory(["a"])
    audit = tmp_path / "audit.jsonl"
    assert main(["run", str(pb), "-i", str(inv), "--audit-log", str(audit)]) == 2   # `last` fails
    assert "block `deploy` rescued: step `one` failed, its rescue steps succeeded" in capsys.readouterr().err
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["host"], r["block"], r["steps"]) for r in records if r["event"] == "block.rescued"] == [("a", "deploy", ["one"])]
    (state_file,) = (tmp_path / "runs").glob("*.json")
    saved = json.loads(state_file.read_text())
    assert saved["tasks"]["one@a"]["status"] == "failed" and saved["tasks"]["one@a"]["rescued"] is True
    assert "rescued" not in saved["tasks"]["last@a"]
    (tmp_path / "hosts" / "a" / "go").touch()
    assert main(["resume", saved["run_id"], "--audit-log", str(audit)]) == 0
    assert log(tmp_path, "a") == ["before", "one", "undo", "tidy", "after", "last", "last"]   # only `last` again
    assert "rescued: 1 host (a)" in capsys.readouterr().err
    resumed = [json.loads(line) for line in audit.read_text().splitlines()][len(records):]
    finished, _ = audit_results([r for r in resumed if r["event"] == "task.finished"])
    (one,) = [t for t in finished if t.step_id == "one"]
    assert one.outcome == "rescued"   # carried from the first run, still rescued in the resume's trail


# --- dry run ----------------------------------------------------------------------------------------

def _plan_steps(first: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "deploy", "block": [first, {"name": "two", "file": {"path": "{{ dir }}", "state": "directory"}}],
             "rescue": [{"name": "undo", "shell": sh("undo")}], "always": [{"name": "tidy", "shell": sh("tidy")}]},
            {"name": "after", "shell": sh("after")}]


def test_plan_predicts_no_rescue_when_no_block_step_would_fail(tmp_path: Path, go) -> None:
    result = go(_plan_steps({"name": "one", "file": {"path": "{{ dir }}/f", "state": "touch"}}), mode="plan")
    assert res(result, "a", "one").prediction == "change"
    undo = res(result, "a", "undo")
    assert (undo.prediction, undo.message) == ("skip", "block predicted to succeed")
    assert res(result, "a", "tidy").prediction is not None and res(result, "a", "tidy").prediction != "skip"
    assert log(tmp_path, "a") == [] and not (tmp_path / "hosts" / "a" / "f").exists()


def test_plan_predicts_the_rescue_when_a_block_step_would_fail(tmp_path: Path, go) -> None:
    failing = {"name": "one", "read_only": True, "shell": "test -e {{ dir }}/missing"}
    result = go(_plan_steps(failing), mode="plan")
    assert res(result, "a", "one").prediction == "fail"
    assert res(result, "a", "one").rescued
    assert res(result, "a", "undo").prediction not in (None, "skip")
    assert res(result, "a", "after").prediction not in (None, "skip")   # the rescue is predicted to handle it
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == []


def test_plan_cannot_tell_whether_the_rescue_runs_after_an_unknown_step(tmp_path: Path, go) -> None:
    unknown = {"name": "one", "shell": "some-command --that-may-fail"}
    result = go(_plan_steps(unknown), mode="plan")
    assert res(result, "a", "one").prediction == "unknown"
    undo = res(result, "a", "undo")
    assert undo.prediction == "unknown" and "may fail" in undo.message


def test_report_and_console_count_the_rescued_host(tmp_path: Path, write_playbook: PlaybookWriter,
                                                   local_inventory: InventoryWriter,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from runbook.cli import main

    pb = write_playbook(guarded_block())
    inv = local_inventory(["a", "b"])
    report = tmp_path / "report.html"
    code = main(["run", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "audit.jsonl"),
                 "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0
    assert "rescued: 1 host (a): a block failed and its rescue steps ran" in err
    assert re.search(r"RECAP\s*\nhost\s+ok\s+changed\s+skipped\s+failed\s+unreachable\s+rescued", err)
    html = report.read_text()
    assert re.search(r'data-status="rescued"><b>1</b>', html)
    assert re.search(r'data-status="failed"><b>0</b>', html)


def test_a_failing_role_inside_a_block_is_rescued_and_an_include_waits_for_its_needs(
        tmp_path: Path, write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> None:
    import yaml

    role = tmp_path / "roles" / "flaky" / "steps.yml"
    role.parent.mkdir(parents=True)
    role.write_text(yaml.safe_dump([{"name": "try", "shell": sh("role-try", "false")},
                                    {"name": "more", "shell": sh("role-more")}]))
    (tmp_path / "later.yml").write_text(yaml.safe_dump([{"name": "x", "shell": sh("later")}]))
    pb = write_playbook([
        {"name": "guard", "block": [{"role": "flaky"}], "rescue": [{"name": "fix", "shell": sh("fix")}]},
        {"name": "side", "needs": [], "shell": sh("side")},
        {"include": "later.yml", "needs": ["side", "guard"]},
    ])
    result = run(pb, str(local_inventory(["a"])), audit=False, state_dir=str(tmp_path / "runs"))
    words = log(tmp_path, "a")
    assert words.index("role-try") < words.index("fix") < words.index("later")
    assert words.index("side") < words.index("later") and "role-more" not in words
    assert res(result, "a", "flaky/try").rescued
    assert res(result, "a", "later/x").status == Status.CHANGED
    assert result.exit_code() == 0
