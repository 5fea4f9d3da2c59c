"""The report commands on real local runs: `run/apply/resume --report`, `runbook report`, `show --html`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.cli import main

SECRET = "s3cr3t-report-token-4711"

PLAYBOOK = {
    "runbook": "report-local",
    "secrets": {"api_token": "env:REPORT_TEST_TOKEN"},
    "steps": [
        {"name": "greet", "shell": 'echo "token {{ api_token }}"'},
        {"name": "config", "template": {"src": "app.conf.j2", "dest": "{{ dir }}/app.conf"}},
        {"name": "flaky", "needs": ["greet"], "retries": 1,
         "shell": "test -e {{ dir | quote }}/flag || { touch {{ dir | quote }}/flag; echo first try >&2; exit 1; }"},
        {"name": "optional", "needs": ["greet"], "when": "false", "shell": "echo never"},
        {"name": "check", "needs": ["flaky"],
         "shell": 'if [ {{ host.name | quote }} = b ]; then echo "disk full {{ api_token }}" >&2; exit 3; fi; echo fine'},
        {"name": "finish", "needs": ["check", "config"], "shell": "echo done"},
    ],
    "on_failure": [{"name": "page", "on": "controller", "shell": "echo paging {{ host.name | quote }}"}],
}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A playbook, a template and two local hosts (a, b) in a tmp dir that is also the current directory."""
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "trail" / "audit.jsonl"))
    monkeypatch.setenv("REPORT_TEST_TOKEN", SECRET)
    monkeypatch.delenv("RUNBOOK_OPERATOR", raising=False)
    monkeypatch.chdir(tmp_path)
    hosts = {}
    for name in ("a", "b"):
        (tmp_path / "hosts" / name).mkdir(parents=True)
        hosts[name] = {"ansible_connection": "local", "dir": str(tmp_path / "hosts" / name)}
    (tmp_path / "inv.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    (tmp_path / "app.conf.j2").write_text("listen = 8080\nhost = {{ host.name }}\n")
    (tmp_path / "pb.yml").write_text(yaml.safe_dump(PLAYBOOK, sort_keys=False))
    return tmp_path


def run(*args: str) -> int:
    """The CLI's exit code for these arguments (in process)."""
    return main(list(args))


def payload(path: Path) -> dict[str, Any]:
    """The JSON a report page embeds."""
    text = path.read_text(encoding="utf-8")
    doc = {}
    for name in ("report-data", "report-details"):   # the table's columns, then the tasks' details
        m = re.search(rf'<script type="application/json" id="{name}">(.*?)</script>', text, re.S)
        assert m is not None
        doc.update(json.loads(m.group(1)))
    return doc


def outcomes(doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(host, step) -> outcome of every row of a page's table."""
    c = doc["cols"]
    return {(doc["hosts"][h], doc["steps"][s]["id"]): doc["statuses"][st] for h, s, st in zip(c["h"], c["s"], c["st"])}


EXPECTED = {("a", "greet"): "changed", ("a", "config"): "changed", ("a", "flaky"): "changed", ("a", "optional"): "skipped",
            ("a", "check"): "changed", ("a", "finish"): "changed", ("b", "greet"): "changed", ("b", "config"): "changed",
            ("b", "flaky"): "changed", ("b", "optional"): "skipped", ("b", "check"): "failed", ("b", "finish"): "not_run",
            ("b", "page"): "rescued"}


def test_run_report_and_the_report_command_agree(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("run", "pb.yml", "-i", "inv.yml", "--report", "out/run.html") == 2
    assert "report: out/run.html" in capsys.readouterr().err
    live = payload(work / "out" / "run.html")
    assert outcomes(live) == EXPECTED
    flaky = next(i for i, (h, s) in enumerate(zip(live["cols"]["h"], live["cols"]["s"]))
                 if live["hosts"][h] == "a" and live["steps"][s]["id"] == "flaky")
    assert live["cols"]["a"][flaky] == 2                      # the retry
    config = live["det"][live["cols"]["s"].index(1)]
    assert "+listen = 8080" in config["df"]                   # the diff
    assert run("report", "latest", "-o", "files.html") == 0
    files = payload(work / "files.html")
    assert outcomes(files) == EXPECTED
    page = (work / "files.html").read_text()
    assert "audit-ok" in page and "runbook resume " in page
    run_id = live["run_id"]
    assert run("report", run_id[:18]) == 0                    # a unique prefix; default file name
    assert (work / f"report-{run_id}.html").is_file()
    capsys.readouterr()
    assert run("report", run_id, "-o", "-") == 0
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")


def test_no_secret_in_any_report(work: Path) -> None:
    assert run("run", "pb.yml", "-i", "inv.yml", "--report", "run.html") == 2
    assert run("report", "latest", "-o", "files.html") == 0
    for name in ("run.html", "files.html"):
        text = (work / name).read_text()
        assert SECRET not in text, name
        assert "token ***" in text and "disk full ***" in text


def test_plan_page_apply_report_and_prediction_against_outcome(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("plan", "pb.yml", "-i", "inv.yml", "--out", "plan.json") == 0
    assert run("show", "plan.json", "--html", "plan.html") == 0
    plan_page = payload(work / "plan.html")
    assert plan_page["kind"] == "plan"
    preds = outcomes(plan_page)
    assert preds[("a", "config")] == "change" and preds[("a", "optional")] == "skip"
    assert "runbook apply plan.json" in (work / "plan.html").read_text()
    assert SECRET not in (work / "plan.html").read_text()
    assert run("apply", "plan.json", "-y", "--report", "apply.html") == 2
    applied = payload(work / "apply.html")
    assert applied["predicted"] is True
    i = next(k for k, s in enumerate(applied["cols"]["s"]) if applied["steps"][s]["id"] == "config")
    assert applied["det"][i]["p"] == "change" and not applied["cols"]["f"][i] & 8
    assert run("report", applied["run_id"], "--plan", "plan.json", "-o", "again.html") == 0
    assert payload(work / "again.html")["predicted"] is True
    # A plan that is not the one this run applied is refused.
    assert run("plan", "pb.yml", "-i", "inv.yml", "--limit", "a", "--out", "other.json") == 0
    capsys.readouterr()
    assert run("report", applied["run_id"], "--plan", "other.json", "-o", "x.html") == 4
    assert "is not the plan run" in capsys.readouterr().err
    assert not (work / "x.html").exists()
    # Without --plan, the report finds the plan the run recorded it applied, as long as it is unchanged.
    assert run("report", applied["run_id"], "-o", "found.html") == 0
    assert payload(work / "found.html")["predicted"] is True
    assert "the reviewed plan is not attached" not in (work / "found.html").read_text()
    # A state whose plan_file names something that is no plan (edited, or hostile): no plan, no error.
    (state_file,) = [p for p in (work / "trail" / "runs").glob("*.json") if applied["run_id"] in p.name]
    saved = json.loads(state_file.read_text())
    for target in (str(work / "inv.yml"), "/etc/shadow", str(work / "nope" / ".." / ".." / "x")):
        state_file.write_text(json.dumps({**saved, "details": {**saved["details"], "plan_file": target}}))
        assert run("report", applied["run_id"], "-o", "hostile.html") == 0
        assert payload(work / "hostile.html")["predicted"] is False
    state_file.write_text(json.dumps(saved))
    (work / "plan.json").write_text((work / "other.json").read_text())   # replaced by another plan
    assert run("report", applied["run_id"], "-o", "replaced.html") == 0
    assert payload(work / "replaced.html")["predicted"] is False
    assert "the reviewed plan is not attached" in (work / "replaced.html").read_text()


def test_resume_report_marks_what_an_earlier_run_did(work: Path) -> None:
    (work / "pb.yml").write_text(yaml.safe_dump({**PLAYBOOK, "on_failure": []}, sort_keys=False))
    assert run("run", "pb.yml", "-i", "inv.yml") == 2
    first = json.loads(sorted((work / "trail" / "runs").glob("*.json"))[-1].read_text())["run_id"]
    assert run("resume", first, "--report", "resume.html") == 2
    doc = payload(work / "resume.html")
    c = doc["cols"]
    earlier = {(doc["hosts"][h], doc["steps"][s]["id"]) for h, s, f in zip(c["h"], c["s"], c["f"]) if f & 4}
    assert ("b", "greet") in earlier and ("a", "check") in earlier and ("b", "check") not in earlier
    assert doc["mode"] == "resume"


@pytest.mark.parametrize("run_id", ["../../etc/passwd", "..", "a/b", "x;rm -rf ~"])
def test_run_ids_that_are_paths_are_refused(work: Path, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("report", run_id) == 4
    assert "is not a run id" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("report", "20991231T000000Z-none") == 4
    assert "no run `20991231T000000Z-none`" in capsys.readouterr().err
    runs = work / "trail" / "runs"
    runs.mkdir(parents=True)
    (runs / "20261123T180003Z-broken.json").write_text('{"run_id": "x",\n "tasks": {oops')
    assert run("report", "20261123T180003Z-broken") == 4
    err = capsys.readouterr().err
    assert "corrupt run state" in err and "20261123T180003Z-broken.json:2" in err
    assert run("run", "pb.yml", "-i", "inv.yml", "--dry-run", "--report", "x.html") == 4
    assert "--report needs a real run" in capsys.readouterr().err
    assert run("plan", "pb.yml", "-i", "inv.yml", "--out", "plan.json") == 0
    doc = json.loads((work / "plan.json").read_text())
    doc["predictions"][0]["reason"] = "<script>edited</script>"
    (work / "plan.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert run("show", "plan.json", "--html", "plan.html") == 4
    assert "modified after it was made" in capsys.readouterr().err
    assert not (work / "plan.html").exists()


def test_a_report_that_cannot_be_written_does_not_fail_the_run(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "ok.yml").write_text(yaml.safe_dump({"runbook": "ok", "steps": [{"name": "one", "shell": "true"}]}))
    assert run("run", "ok.yml", "-i", "inv.yml", "--report", "/dev/null/no/report.html") == 0
    assert "report: could not write /dev/null/no/report.html" in capsys.readouterr().err


def test_a_rescued_failure_is_rescued_in_every_report_also_from_the_audit_trail_alone(work: Path) -> None:
    """The block's rescue runs after the failure was recorded: the report learns it from the trail's
    `block.rescued` record (and the state's flag), not only from the live run."""
    (work / "rescue.yml").write_text(yaml.safe_dump({"runbook": "rescue-report", "steps": [
        {"name": "deploy", "block": [{"name": "try", "shell": "test {{ host.name | quote }} = b"}],
         "rescue": [{"name": "undo", "shell": "echo undo"}]}]}, sort_keys=False))
    assert run("run", "rescue.yml", "-i", "inv.yml", "--report", "live.html") == 0
    want = {("a", "try"): "rescued", ("a", "undo"): "changed", ("b", "try"): "changed", ("b", "undo"): "skipped"}
    assert outcomes(payload(work / "live.html")) == want
    assert run("report", "latest", "-o", "state.html") == 0
    assert outcomes(payload(work / "state.html")) == want
    (state_file,) = (work / "trail" / "runs").glob("*.json")
    run_id = json.loads(state_file.read_text())["run_id"]
    for path in (work / "trail" / "runs").iterdir():
        path.unlink()
    assert run("report", run_id, "-o", "audit.html") == 0
    audit_only = payload(work / "audit.html")
    assert outcomes(audit_only) == want
    assert "no run-state file" in (work / "audit.html").read_text()


def test_loop_items_are_rows_of_their_step_counted_as_the_recap_counts(work: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A loop's items are not steps of their own (no extra graph node or step filter): they follow their
    step's row, named `step[label]`, and the totals count them, not the step over them, as the recap does."""
    (work / "loop.yml").write_text(yaml.safe_dump({"runbook": "loop-report", "steps": [
        {"name": "each", "shell": "test {{ item | quote }} != bad", "loop": ["one", "bad", "two"], "ignore_errors": True},
        {"name": "after", "shell": "true"}]}, sort_keys=False))
    capsys.readouterr()
    assert run("run", "loop.yml", "-i", "inv.yml", "--limit", "a", "--report", "live.html", "--format", "json") == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert run("report", "latest", "-o", "state.html") == 0
    (state_file,) = (work / "trail" / "runs").glob("*.json")
    state_file.unlink()
    assert run("report", "latest", "-o", "audit.html") == 0
    assert "no run-state file" in (work / "audit.html").read_text()
    for name in ("live.html", "state.html", "audit.html"):
        page = (work / name).read_text()
        doc = payload(work / name)
        assert [s["id"] for s in doc["steps"]] == ["each", "after"], name
        shown = dict(re.findall(r'data-status="(\w+)"><b>(\d+)</b>', page))
        assert {k: int(v) for k, v in shown.items() if int(v)} == totals, name
        c = doc["cols"]
        rows = [doc["steps"][s]["id"] + (f"[{doc['items'][i]}]" if i >= 0 else "") for s, i in zip(c["s"], c["it"])]
        assert rows == ["each", "each[one]", "each[bad]", "each[two]", "after"], name
        assert re.findall(r'<g class="node[^"]*" data-step="([^"]*)"', page) == ["each", "after"], name
