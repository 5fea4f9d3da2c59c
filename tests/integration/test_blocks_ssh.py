"""Blocks against real sshd hosts: rescue where a step failed, always everywhere, and plan -> apply accuracy."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from runbook.audit import read_records
from tests.helpers import run_main as cli
from tests.sshd import SSHHost, seed, write_inventory

pytestmark = pytest.mark.ssh


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wd = tmp_path / "work"
    wd.mkdir()
    monkeypatch.chdir(wd)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    yield wd


def inventory(path: Path, hosts: list[SSHHost]) -> Path:
    return write_inventory(path, hosts, host_vars={h.name: {"home": str(h.home)} for h in hosts})


REPAIR = {
    "runbook": "repair",
    "vars": {"app": "{{ home }}/app"},
    "steps": [
        {"name": "verify", "block": [
            {"name": "check", "read_only": True, "shell": "test -f {{ (app ~ '/healthy') | quote }}"},
            {"name": "config", "copy": {"dest": "{{ app }}/app.conf", "content": "v2\n"}},
        ], "rescue": [
            {"name": "restore", "copy": {"dest": "{{ app }}/healthy", "content": "restored\n"}},
        ], "always": [
            {"name": "stamp", "line": {"path": "{{ app }}/log", "line": "verified", "create": True}},
        ]},
        {"name": "done", "copy": {"dest": "{{ app }}/done", "content": "done\n"}},
    ],
}

# h0 healthy and configured; h1 broken (no `healthy`); h2 healthy with an old config.
EXPECTED = {
    "check": ("ok", "fail", "ok"),
    "config": ("ok", "not_run", "change"),
    "restore": ("skip", "change", "skip"),
    "stamp": ("ok", "change", "change"),
    "done": ("change", "change", "change"),
}
MATCHES = {"change": {"changed"}, "ok": {"ok"}, "skip": {"skipped"}, "fail": {"failed"}, "not_run": {"not_run"}}


def seed_repair(hosts: list[SSHHost]) -> None:
    h0, h1, h2 = hosts
    for h in hosts:
        for rel in ("app/healthy", "app/app.conf", "app/log", "app/done"):
            (h.home / rel).unlink(missing_ok=True)
    seed(h0, {"app/healthy": "yes\n", "app/app.conf": "v2\n", "app/log": "verified\n"})
    seed(h1, {"app/app.conf": "v1\n"})
    seed(h2, {"app/healthy": "yes\n", "app/app.conf": "v1\n"})


def outcomes(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["host"], r["step_id"]): r for r in results}


def test_plan_predicts_the_rescue_and_apply_does_exactly_that(
        tmp_path: Path, work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    h0, h1, h2 = hosts
    pb = tmp_path / "repair.yml"
    pb.write_text(yaml.safe_dump(REPAIR, sort_keys=False))
    inv = inventory(tmp_path / "inv.yml", hosts)
    seed_repair(hosts)
    args = ["-i", str(inv), "--known-hosts", str(known_hosts)]

    code, out, err = cli(capsys, "plan", pb, *args, "--out", "plan.json", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    preds = {(p["host"], p["step_id"]): p for p in doc["predictions"]}
    got = {sid: tuple(preds[(h.name, sid)]["prediction"] for h in hosts) for sid in EXPECTED}
    assert got == EXPECTED
    assert preds[("h0", "restore")]["reason"] == "block predicted to succeed"
    assert (h1.home / "app/healthy").exists() is False     # the plan changed nothing

    code, out, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y", "--format", "json")
    assert code == 0, err
    applied = json.loads(out)
    actual = outcomes(applied["results"])
    wrong = [f"{h} {sid}: predicted {p['prediction']}, got {actual[(h, sid)]['status']}"
             for (h, sid), p in preds.items() if actual[(h, sid)]["status"] not in MATCHES[p["prediction"]]]
    assert not wrong, "\n".join(wrong)
    assert actual[("h1", "check")]["rescued"] is True and "rescued" not in actual[("h0", "check")]
    assert applied["rescued_hosts"] == ["h1"] and applied["recap"]["h1"]["rescued"] == 1
    assert applied["exit_code"] == 0
    assert "rescued: 1 host (h1)" in err
    # Real effects: the rescue repaired h1, the always step stamped everyone, the run went on.
    assert (h1.home / "app/healthy").read_text() == "restored\n"
    assert (h1.home / "app/app.conf").read_text() == "v1\n"          # the failed block's later step did not run
    assert (h2.home / "app/app.conf").read_text() == "v2\n"
    assert not (h0.home / "app/healthy").read_text().startswith("restored")
    for h in hosts:
        assert (h.home / "app/log").read_text() == "verified\n"
        assert (h.home / "app/done").read_text() == "done\n"
    # The audit trail says the failure was rescued, and counts it so.
    records = read_records(Path(os.environ["RUNBOOK_AUDIT_LOG"]))
    apply_run = [r for r in records if r.get("event") == "run.started" and r.get("mode") == "apply"][0]["run_id"]
    mine = [r for r in records if r.get("run_id") == apply_run]
    assert [(r["host"], r["block"], r["steps"]) for r in mine if r["event"] == "block.rescued"] == [("h1", "verify", ["check"])]
    finished = [r for r in mine if r["event"] == "run.finished"][0]
    assert finished["totals"]["rescued"] == 1 and "failed" not in finished["totals"]
    failed_record = [r for r in mine if r["event"] == "task.finished" and r["host"] == "h1" and r["step_id"] == "check"]
    assert failed_record[0]["status"] == "failed"

    # The same states, run for real without a plan: the same outcome.
    seed_repair(hosts)
    code, out, err = cli(capsys, "run", pb, *args, "--format", "json")
    assert code == 0, err
    actual = outcomes(json.loads(out)["results"])
    tally = Counter(f"{p['prediction']}->{actual[k]['status']}" for k, p in preds.items())
    assert all(actual[k]["status"] in MATCHES[p["prediction"]] for k, p in preds.items()), tally


def test_rescued_hosts_do_not_stop_a_serial_run_but_a_failed_rescue_does(
        tmp_path: Path, work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    pb = tmp_path / "serial.yml"
    pb.write_text(yaml.safe_dump({
        "runbook": "serial", "concurrency": 1, "max_failures": 0,
        "steps": [{"name": "try", "block": [{"name": "probe", "shell": "test -f {{ (home ~ '/missing') | quote }}"}],
                   "rescue": [{"name": "fallback", "shell": "test -f {{ (home ~ '/can-rescue') | quote }}"}],
                   "always": [{"name": "mark", "shell": "touch {{ (home ~ '/tried') | quote }}"}]},
                  {"name": "after", "shell": "touch {{ (home ~ '/after') | quote }}"}],
        "on_failure": [{"name": "page", "shell": "touch {{ (home ~ '/paged') | quote }}"}],
    }, sort_keys=False))
    inv = inventory(tmp_path / "inv.yml", hosts)
    for h in hosts:
        seed(h, {"can-rescue": "yes\n"})
    args = ["-i", str(inv), "--known-hosts", str(known_hosts), "--format", "json"]
    code, out, err = cli(capsys, "run", pb, *args)
    assert code == 0, err
    assert json.loads(out)["rescued_hosts"] == ["h0", "h1", "h2"]
    for h in hosts:
        assert (h.home / "tried").exists() and (h.home / "after").exists() and not (h.home / "paged").exists()
        for name in ("tried", "after"):
            (h.home / name).unlink()

    (hosts[0].home / "can-rescue").unlink()
    code, out, err = cli(capsys, "run", pb, *args)
    assert code == 2, err
    result = json.loads(out)
    assert "max_failures exceeded" in (result["stop_reason"] or "")
    h0, h1, h2 = hosts
    assert (h0.home / "tried").exists() and (h0.home / "paged").exists() and not (h0.home / "after").exists()
    assert not any((h.home / "tried").exists() for h in (h1, h2))     # no new host after a real failure
