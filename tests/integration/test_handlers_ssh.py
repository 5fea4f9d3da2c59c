"""Handlers against real sshd hosts: plan predicts every handler, apply does exactly that, and the edge cases.

Three hosts in mixed states: h0 has nothing, h1 has everything as the playbook wants it, h2 has a
different config and no rotate file. Handlers are listed restart, reload, announce (restart notifies
announce); a flush point runs them after the two config steps; `rotate` notifies reload again at the
end. Each handler appends its name to `events`, so the order and count of real runs are visible.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook.audit import read_records
from tests.helpers import run_main as cli
from tests.sshd import SSHHost, seed, write_inventory

pytestmark = pytest.mark.ssh

PLAYBOOK = """\
runbook: handlers
hosts: all
vars: {d: "{{ home }}/svc"}
steps:
  - name: app dir
    file: {path: "{{ d }}", state: directory}
  - name: write config
    copy: {dest: "{{ d }}/app.conf", content: "port = 8080\\n"}
    notify: restart app
  - name: write env
    copy: {dest: "{{ d }}/env", content: "MODE=prod\\n"}
    notify: [reload app, restart app]
  - name: apply now
    flush_handlers: true
  - name: after flush
    shell: echo after >> {{ d | quote }}/events && touch {{ d | quote }}/after.done
    creates: "{{ d }}/after.done"
  - name: rotate
    copy: {dest: "{{ d }}/rotate", content: "weekly\\n"}
    notify: reload app
  - name: gate
    shell: test ! -e {{ d | quote }}/broken
    read_only: true
handlers:
  - name: restart app
    shell: echo restart >> {{ d | quote }}/events
    notify: announce
  - name: reload app
    shell: echo reload >> {{ d | quote }}/events
  - name: announce
    shell: echo announce >> {{ d | quote }}/events
"""

HANDLERS = ("handler:restart-app:apply-now", "handler:reload-app:apply-now", "handler:announce:apply-now",
            "handler:reload-app")
# Per handler task: the prediction on h0, h1, h2.
EXPECTED = {
    "handler:restart-app:apply-now": ("change", "skip", "change"),
    "handler:reload-app:apply-now": ("change", "skip", "skip"),
    "handler:announce:apply-now": ("change", "skip", "change"),
    "handler:reload-app": ("change", "skip", "change"),
}
OUTCOME = {"change": "changed", "ok": "ok", "skip": "skipped"}


def seed_states(hosts: list[SSHHost]) -> None:
    """h0: nothing; h1: everything as wanted (handlers ran before); h2: another config, no rotate file."""
    seed(hosts[1], {"svc/app.conf": "port = 8080\n", "svc/env": "MODE=prod\n", "svc/rotate": "weekly\n",
                    "svc/after.done": ""})
    seed(hosts[2], {"svc/app.conf": "port = 9090\n", "svc/env": "MODE=prod\n", "svc/after.done": ""})


def events(host: SSHHost) -> list[str]:
    path = host.home / "svc" / "events"
    return path.read_text().split() if path.exists() else []


def tree(host: SSHHost) -> dict[str, tuple[int, int, bytes]]:
    """Every file under the home: mode, mtime and content."""
    out = {}
    for dirpath, _, files in os.walk(host.home):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p)] = (st.st_mode, st.st_mtime_ns, p.read_bytes())
    return out


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_ssh_hosts: list[SSHHost]) -> Iterator[Path]:
    """A working directory with the playbook, an inventory (each host knows its `home`) and the audit trail."""
    hosts = clean_ssh_hosts[:3]
    wd = tmp_path / "work"
    wd.mkdir()
    monkeypatch.chdir(wd)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    (wd / "handlers.yml").write_text(PLAYBOOK)
    write_inventory(wd / "inv.yml", hosts, host_vars={h.name: {"home": str(h.home)} for h in hosts})
    seed_states(hosts)
    yield wd


def args(known_hosts: Path) -> list[str]:
    return ["-i", "inv.yml", "--known-hosts", str(known_hosts)]


def predictions(doc: dict) -> dict[tuple[str, str], dict]:
    return {(p["host"], p["step_id"]): p for p in doc["predictions"]}


def test_plan_predicts_every_handler_and_apply_does_exactly_that(
        work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    before = [tree(h) for h in hosts]
    code, out, err = cli(capsys, "plan", "handlers.yml", *args(known_hosts), "--out", "plan.json", "--output", "json")
    assert code == 0, err
    assert [tree(h) for h in hosts] == before, "a dry run changed a host"
    doc = json.loads(out)
    p = predictions(doc)
    assert {sid: tuple(p[(h.name, sid)]["prediction"] for h in hosts) for sid in HANDLERS} == EXPECTED
    assert not [q for q in doc["predictions"] if q["prediction"] == "unknown"]
    # The notifier is named as the reason, both ways.
    assert p[("h2", "handler:restart-app:apply-now")]["reason"].startswith(
        "would run: notified by `write config` (predicted change)")
    assert p[("h2", "handler:reload-app:apply-now")]["reason"] == \
        "not notified: `write env` is predicted no change on this host"
    assert p[("h0", "handler:announce:apply-now")]["reason"].startswith("would run: notified by `restart app`")
    assert "flush" not in {q["step_id"] for q in doc["predictions"]} and "apply-now" not in {q["step_id"] for q in doc["predictions"]}

    code, shown, err = cli(capsys, "show", "plan.json")
    assert code == 0, err
    assert "+ handler:restart-app:apply-now  change — would run: notified by `write config` (predicted change)" in shown
    assert "- handler:reload-app:apply-now  skip — not notified: `write env` is predicted no change on this host" in shown

    code, out, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y", "--output", "json")
    assert code == 0, err
    results = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"]}
    wrong = [f"{host} {sid}: predicted {q['prediction']}, got {results[(host, sid)]['status']}"
             for (host, sid), q in p.items() if OUTCOME.get(q["prediction"]) != results[(host, sid)]["status"]]
    assert not wrong, "\n".join(wrong)
    # What really ran, in order: listed order at the flush point (not notification order), before the
    # next step; once each per host although two steps notified restart; reload again at the end.
    assert events(hosts[0]) == ["restart", "reload", "announce", "after", "reload"]
    assert events(hosts[1]) == []
    assert events(hosts[2]) == ["restart", "announce", "reload"]

    # Nothing left to do: every handler is predicted skip, everywhere.
    code, out, err = cli(capsys, "plan", "handlers.yml", *args(known_hosts), "--output", "json")
    assert code == 0, err
    again = predictions(json.loads(out))
    assert {again[(h.name, sid)]["prediction"] for h in hosts for sid in HANDLERS} == {"skip"}

    # The same states, run for real without the plan (apply skipped what it reviewed as no change;
    # a real run executes every step): the first plan still predicted every task.
    for h in hosts:
        h.clear_home()
    seed_states(hosts)
    code, out, err = cli(capsys, "run", "handlers.yml", *args(known_hosts), "-y", "--format", "json")
    assert code == 0, err
    ran = {(r["host"], r["step_id"]): r["status"] for r in json.loads(out)["results"]}
    wrong = [f"{host} {sid}: predicted {q['prediction']}, ran {ran[(host, sid)]}"
             for (host, sid), q in p.items() if OUTCOME.get(q["prediction"]) != ran[(host, sid)]]
    assert not wrong, "\n".join(wrong)
    assert events(hosts[0]) == ["restart", "reload", "announce", "after", "reload"]


def test_apply_follows_what_notifiers_really_did_when_the_hosts_moved(
        work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:3]
    code, out, err = cli(capsys, "plan", "handlers.yml", *args(known_hosts), "--out", "plan.json", "--output", "json")
    assert code == 0, err
    p = predictions(json.loads(out))
    assert p[("h2", "handler:reload-app:apply-now")]["prediction"] == "skip"
    assert p[("h2", "handler:reload-app")]["prediction"] == "change"
    # Between review and apply, on h2: env is changed (its step, after a planned change, runs and now
    # changes), and the rotate file appears (its step now changes nothing).
    seed(hosts[2], {"svc/env": "MODE=dev\n", "svc/rotate": "weekly\n"})
    code, out, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y", "--output", "json")
    assert code == 0, err
    results = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"]}
    # The reviewed `- skip` handler runs: the change it reacts to happened, and a warning says so.
    assert results[("h2", "write-env")]["status"] == "changed"
    assert results[("h2", "handler:reload-app:apply-now")]["status"] == "changed"
    assert "runs although the reviewed plan said skip" in err
    # The reviewed `+ change` handler whose notifier turned out ok is skipped, saying why.
    assert results[("h2", "rotate")]["status"] == "ok"
    assert results[("h2", "handler:reload-app")]["status"] == "skipped"
    assert results[("h2", "handler:reload-app")]["message"] == \
        "not notified: `rotate` did not change on this host; the reviewed plan expected it to run"
    assert events(hosts[2]) == ["restart", "reload", "announce"]
    # The other hosts went exactly as planned.
    assert events(hosts[0]) == ["restart", "reload", "announce", "after", "reload"] and events(hosts[1]) == []
    # The audit trail records handler tasks like any other, with their reasons.
    finished = [r for r in read_records(tmp_path / "audit.jsonl") if r.get("event") == "task.finished"
                and r.get("host") == "h2" and str(r.get("step_id", "")).startswith("handler:")]
    assert {r["step_id"] for r in finished} >= {"handler:reload-app", "handler:reload-app:apply-now"}


def test_a_host_that_fails_before_the_end_runs_no_end_handlers_and_the_console_shows_them(
        work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    seed(hosts[0], {"svc/broken": ""})
    code, out, err = cli(capsys, "run", "handlers.yml", *args(known_hosts), "-y")
    assert code == 2, err
    # h0 ran its flush-point handlers (before the failure), not the end one; h2 ran everything.
    assert events(hosts[0]) == ["restart", "reload", "announce", "after"]
    assert events(hosts[2]) == ["restart", "announce", "reload"]
    # One line per task, `host: task: status DURATION — reason`, for handler tasks as for steps.
    lines = [re.sub(r" [0-9.]+s( — |$)", r"\1", ln) for ln in err.splitlines()]
    assert "h0: handler:reload-app: not_run — upstream step `gate` failed" in lines
    assert "h2: handler:reload-app: changed — notified by `rotate` (changed)" in lines
    assert ("h1: handler:restart-app:apply-now: skipped — not notified: `write config`, `write env` did not change "
            "on this host") in lines
    assert "h0: handler:announce:apply-now: changed — notified by `restart app` (changed)" in lines


CLUSTERED = """\
runbook: handlers-clustered
hosts: all
vars: {d: "{{ home }}/svc"}
steps:
  - name: open ticket
    shell: "true"
    once: true
    notify: announce
  - name: write config
    copy: {dest: "{{ d }}/app.conf", content: "port = 8080\\n"}
    notify: restart app
handlers:
  - name: restart app
    shell: echo restart >> {{ d | quote }}/events
  - name: announce
    shell: echo announce >> {{ d | quote }}/events
"""


def test_a_cluster_runs_handlers_as_decided_on_the_controller(
        work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path) -> None:
    from tests.helpers import cli as subprocess_cli

    hosts = clean_ssh_hosts[:3]
    seed(hosts[0], {"svc/.keep": ""})
    (work / "clustered.yml").write_text(CLUSTERED)
    plans = []
    for extra in ([], ["--cluster", "local:2"]):
        planned = subprocess_cli("plan", "clustered.yml", "-i", "inv.yml", "--known-hosts", str(known_hosts), "--output",
                                 "json", *extra, cwd=work, timeout=240)
        assert planned.returncode == 0, planned.stderr
        plans.append({(q["host"], q["step_id"]): (q["prediction"], q["reason"]) for q in json.loads(planned.stdout)["predictions"]})
    # Workers predict handlers as the controller would: from the notifiers' predictions on every host.
    assert plans[0] == plans[1]
    assert plans[1][("h1", "handler:restart-app")][0] == "skip" and plans[1][("h2", "handler:announce")][0] == "unknown"
    done = subprocess_cli("run", "clustered.yml", "-i", "inv.yml", "--known-hosts", str(known_hosts), "-y",
                          "--format", "json", "--cluster", "local:2", cwd=work, timeout=240)
    assert done.returncode == 0, done.stderr
    results = {(r["host"], r["step_id"]): r for r in json.loads(done.stdout)["results"]}
    # The once step ran on h0's worker; its change notifies `announce` on every host, whichever worker
    # holds it. `restart app` runs where the config changed (h0, h2), not on h1.
    assert [events(h) for h in hosts] == [["restart", "announce"], ["announce"], ["restart", "announce"]]
    assert results[("h1", "handler:restart-app")]["status"] == "skipped"
    assert results[("h1", "handler:restart-app")]["message"] == "not notified: `write config` did not change on this host"
    assert {r.get("worker") for r in results.values() if r["step_id"].startswith("handler:")} - {None}


def test_resume_runs_the_handlers_a_failure_held_back(
        work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    seed(hosts[0], {"svc/broken": ""})
    code, out, err = cli(capsys, "run", "handlers.yml", *args(known_hosts), "-y", "--format", "json")
    assert code == 2, err
    run_id = json.loads(out)["run_id"]
    assert events(hosts[0]) == ["restart", "reload", "announce", "after"]   # the end handler did not run
    (hosts[0].home / "svc" / "broken").unlink()
    code, out, err = cli(capsys, "resume", run_id, "--known-hosts", str(known_hosts), "-y", "--format", "json")
    assert code == 0, err
    results = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"]}
    # `rotate` changed in the first run (not run again): its notification still stands.
    assert results[("h0", "rotate")]["from_run"] == run_id
    assert results[("h0", "handler:reload-app")]["status"] == "changed"
    assert results[("h0", "handler:reload-app")]["message"] == "notified by `rotate` (changed)"
    assert events(hosts[0]) == ["restart", "reload", "announce", "after", "reload"]
    # The flush-point handlers that ran in the first run do not run again.
    assert results[("h0", "handler:restart-app:apply-now")]["from_run"] == run_id
