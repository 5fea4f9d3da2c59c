"""Loops against real sshd hosts: per-item predictions that apply item by item, item drift, resume, redaction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook.audit import read_records
from tests.helpers import cli as helpers_cli
from tests.helpers import cli_env, records, run_in_workdir
from tests.helpers import run_main as cli
from tests.integration.test_plan_ssh import assert_same, inventory_for, snapshot
from tests.integration.test_resume_ssh import wait_for
from tests.sshd import SSHHost, seed, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

SECRET = "Lo0p-s3cret-t0ken-rbls"
# Plan kind -> the status apply must end with for that item (`ok`: skipped as reviewed or run and unchanged).
APPLIED = {"change": {"changed"}, "ok": {"ok"}, "skip": {"skipped"}}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known_hosts: Path) -> Iterator[Path]:
    """A working directory with the audit trail, the operator and the secret set."""
    wd = tmp_path / "work"
    wd.mkdir()
    monkeypatch.chdir(wd)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("RUNBOOK_OPERATOR", "reviewer-rbls")
    monkeypatch.setenv("RBLS_TOKEN", SECRET)
    yield wd


LOOPS_PB = """\
runbook: loops
hosts: all
secrets: {api_token: env:RBLS_TOKEN}
vars:
  d: "{{ home }}/lp"
  settings: {port: "8080", workers: "4", log: info}
steps:
  - name: list drops
    read_only: true
    shell: ls {{ d | quote }}/drops 2>/dev/null | sort || true
    register: drops
  - name: archive drops
    # Over what a read_only step found: expanded in the dry run too.
    shell: cp {{ d | quote }}/drops/{{ item | quote }} {{ d | quote }}/archive/{{ item | quote }}
    creates: "{{ d }}/archive/{{ item }}"
    loop: drops.stdout_lines
    loop_concurrency: 2
  - name: settings
    line: {path: "{{ d }}/app.conf", regexp: "^{{ item.key }}=", line: "{{ item.key }}={{ item.value }}", create: true}
    loop: settings
    label: "{{ item.key }}"
  - name: users
    file: {path: "{{ d }}/users/{{ u.name }}", state: touch}
    loop: [{name: ann, on: true}, {name: bob, on: false}, {name: cy, on: true}]
    loop_var: u
    when: u.on
    creates: "{{ d }}/users/{{ u.name }}"
  - name: tokens
    shell: printf '%s' {{ item | quote }} | sha256sum > {{ d | quote }}/token-$(printf '%s' {{ item | quote }} | wc -c)
    creates: "{{ d }}/token-{{ item | length }}"
    loop: ["{{ api_token }}", plain]
"""


def _seed(hosts: list[SSHHost]) -> None:
    h0, h1, h2 = hosts
    # h0: two drops, one archived already; a config half right; one user there.
    seed(h0, {"lp/drops/a.log": "a", "lp/drops/b.log": "b", "lp/archive/a.log": "a", "lp/app.conf": "port=8080\nworkers=2\n",
              "lp/users/ann": ""})
    # h1: one drop; everything else missing.
    seed(h1, {"lp/drops/c.log": "c", "lp/archive/.keep": "", "lp/users/.keep": ""})
    # h2: nothing to archive; config and users complete.
    seed(h2, {"lp/archive/.keep": "", "lp/app.conf": "port=8080\nworkers=4\nlog=info\n", "lp/users/ann": "", "lp/users/cy": ""})


def _items(doc: dict) -> dict[tuple[str, str], dict]:
    return {(p["host"], p["step_id"]): p for p in doc["predictions"] if p.get("parent")}


def test_each_item_is_predicted_and_applied_as_reviewed(tmp_path: Path, work: Path, clean_ssh_hosts: list[SSHHost],
                                                        known_hosts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    _seed(hosts)
    inv = inventory_for(tmp_path / "inv.yml", hosts)
    pb = tmp_path / "loops.yml"
    pb.write_text(LOOPS_PB)
    kh = ["--known-hosts", str(known_hosts)]
    before = snapshot(hosts)
    code, out, err = cli(capsys, "plan", pb, "-i", inv, *kh, "--out", tmp_path / "plan.json")
    assert code == 0, err + out
    assert_same(before, snapshot(hosts), "plan")
    doc = json.loads((tmp_path / "plan.json").read_text())
    items = _items(doc)
    kinds = {k: p["prediction"] for k, p in items.items()}
    assert kinds[("h0", "archive-drops[a.log]")] == "skip" and kinds[("h0", "archive-drops[b.log]")] == "change"
    assert kinds[("h1", "archive-drops[c.log]")] == "change"
    assert not [k for k in kinds if k[0] == "h2" and k[1].startswith("archive-drops[")]
    assert kinds[("h0", "settings[port]")] == "ok" and kinds[("h0", "settings[workers]")] == "change"
    assert [kinds[("h2", f"settings[{k}]")] for k in ("port", "workers", "log")] == ["ok", "ok", "ok"]
    assert kinds[("h0", "users[ann]")] == "skip" and kinds[("h0", "users[bob]")] == "skip"
    assert kinds[("h0", "users[cy]")] == "change" and kinds[("h1", "users[ann]")] == "change"
    assert items[("h0", "users[bob]")]["reason"].startswith("when: `u.on` is false")
    # The secret item is labelled and keyed redacted, in the plan and its rendering.
    assert ("h0", "tokens[***]") in items and SECRET not in (tmp_path / "plan.json").read_text() + out + err
    by_step = {(p["host"], p["step_id"]): p for p in doc["predictions"]}
    assert by_step[("h2", "archive-drops")]["prediction"] == "skip" and by_step[("h2", "archive-drops")]["items"] == 0

    code, out, err = cli(capsys, "apply", tmp_path / "plan.json", "-i", inv, *kh, "--format", "json")
    assert code == 0, err
    applied = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"] if r.get("parent")}
    assert set(applied) == set(items)
    wrong = {k: (kinds[k], applied[k]["status"]) for k in items if applied[k]["status"] not in APPLIED[kinds[k]]}
    assert not wrong, f"items that did not do what the plan said: {wrong}"
    h0, h1, h2 = hosts
    assert (h0.home / "lp/archive/b.log").read_text() == "b" and (h1.home / "lp/archive/c.log").read_text() == "c"
    assert (h0.home / "lp/app.conf").read_text() == "port=8080\nworkers=4\nlog=info\n"
    assert sorted(p.name for p in (h0.home / "lp/users").iterdir()) == ["ann", "cy"]
    assert sorted(p.name for p in (h1.home / "lp/users").iterdir()) == [".keep", "ann", "cy"]
    assert SECRET not in out + err + Path(os.environ["RUNBOOK_AUDIT_LOG"]).read_text()

    # Planned again, every item is already as wanted: nothing to change.
    code, out, err = cli(capsys, "plan", pb, "-i", inv, *kh, "--out", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert {p["prediction"] for p in again["predictions"] if p.get("parent")} <= {"ok", "skip"}


def test_an_item_that_drifted_or_a_changed_item_list_stops_only_its_host(
        tmp_path: Path, work: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    _seed(hosts)
    h0, h1, h2 = hosts
    inv = inventory_for(tmp_path / "inv.yml", hosts)
    pb = tmp_path / "loops.yml"
    pb.write_text(LOOPS_PB)
    kh = ["--known-hosts", str(known_hosts)]
    code, out, err = cli(capsys, "plan", pb, "-i", inv, *kh, "--out", tmp_path / "plan.json")
    assert code == 0, err
    # h0: the archived copy the plan relied on (skip) is gone: that item drifted.
    (h0.home / "lp/archive/a.log").unlink()
    # h1: a new drop appeared after the review: the item list differs.
    seed(h1, {"lp/drops/new.log": "n"})
    code, out, err = cli(capsys, "apply", tmp_path / "plan.json", "-i", inv, *kh, "--format", "json")
    assert code == 2
    results = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"]}
    assert results[("h0", "archive-drops[a.log]")]["status"] == "drift"
    assert "creates:" in results[("h0", "archive-drops[a.log]")]["message"]
    assert results[("h1", "archive-drops")]["status"] == "drift"
    assert "new items: new.log" in results[("h1", "archive-drops")]["message"]
    assert not (h1.home / "lp/archive/c.log").exists()   # h1 stopped before any planned change
    assert not (h0.home / "lp/users/cy").exists()
    # h2 had nothing drift: it applied.
    assert results[("h2", "settings")]["status"] == "ok"
    assert "drift" in err and "new.log" in err


def test_resume_reruns_only_the_items_that_did_not_finish(tmp_path: Path, work: Path, clean_ssh_hosts: list[SSHHost],
                                                         known_hosts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:2]
    h0, h1 = hosts
    for h in hosts:
        seed(h, {"r/.keep": ""})
    inv = inventory_for(tmp_path / "inv.yml", hosts)
    pb = tmp_path / "resume.yml"
    pb.write_text("""\
runbook: loop-resume
hosts: all
steps:
  - name: each
    shell: echo {{ item }} >> {{ home | quote }}/r/count && test {{ item }} != 2 -o -f {{ home | quote }}/r/fixed
    loop: [1, 2, 3]
    register: each
  - name: sum
    shell: echo {{ each.results | map(attribute='item') | join(',') }} > {{ home | quote }}/r/sum
""")
    kh = ["--known-hosts", str(known_hosts)]
    code, out, err = cli(capsys, "run", pb, "-i", inv, *kh, "--format", "json")
    assert code == 2
    run_id = json.loads(out)["run_id"]
    for h in hosts:
        assert (h.home / "r/count").read_text().split() == ["1", "2", "3"]
    seed(h0, {"r/fixed": ""})
    seed(h1, {"r/fixed": ""})
    code, out, err = cli(capsys, "resume", run_id, "-i", inv, *kh)
    assert code == 0, err
    for h in hosts:
        assert (h.home / "r/count").read_text().split() == ["1", "2", "3", "2"], h.name
        assert (h.home / "r/sum").read_text().strip() == "1,2,3"
    records = [r for r in read_records(Path(os.environ["RUNBOOK_AUDIT_LOG"])) if r.get("event") == "task.started"]
    started_2 = [r for r in records if r["step_id"] == "each[2]"]
    started_1 = [r for r in records if r["step_id"] == "each[1]"]
    assert len(started_2) == 4 and len(started_1) == 2   # item 1: once per host; item 2: twice per host


def _run_until_item_two(tmp_path: Path, hosts: list[SSHHost], playbook: str,
                        *extra: str) -> tuple[subprocess.Popen[str], Path, Path]:
    """Start `runbook run` of this playbook as a real process; return (process, audit trail, its working directory)
    once item 2 of its loop `each` started on every host."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "pb.yml").write_text(playbook)
    trail = tmp_path / "trail" / "audit.jsonl"
    write_inventory(work / "inventory.yml", hosts)
    write_known_hosts(work / "known_hosts", hosts)
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", "pb.yml", "-i", "inventory.yml",
                             "--known-hosts", "known_hosts", "--audit-log", str(trail), *extra],
                            cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def item_two_running() -> bool:
        started = {r["host"] for r in (records(trail) if trail.exists() else [])
                   if r["event"] == "task.started" and r["step_id"] == "each[2]"}
        return started == {h.name for h in hosts}

    wait_for(item_two_running, proc, "item 2 started on every host")
    return proc, trail, work


def test_a_second_interrupt_aborts_the_running_item_and_resume_runs_only_what_did_not_finish(
        clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]
    proc, trail, work = _run_until_item_two(tmp_path, hosts, """\
runbook: loop-abort
steps:
  - name: each
    shell: echo {{ item }} >> count; test {{ item }} != 2 -o -e quick || sleep 30
    loop: [1, 2, 3]
""")
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run_id = records(trail)[0]["run_id"]
    state = json.loads((trail.parent / "runs" / f"{run_id}.json").read_text())
    for h in hosts:
        tasks = {k: t["status"] for k, t in state["tasks"].items() if k.endswith("@" + h.name)}
        assert tasks == {"each[1]@" + h.name: "changed", "each[2]@" + h.name: "failed",
                         "each[3]@" + h.name: "not_run", "each@" + h.name: "failed"}, tasks
        assert (h.home / "count").read_text().split() == ["1", "2"]
        seed(h, {"quick": ""})
    resumed = helpers_cli("resume", run_id, "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"))
    assert resumed.returncode == 0, resumed.stderr
    for h in hosts:
        assert (h.home / "count").read_text().split() == ["1", "2", "2", "3"]   # item 1 was not run again
    assert helpers_cli("audit", "verify", "--audit-log", str(trail)).returncode == 0


@pytest.mark.parametrize("where", [[], ["--cluster", "local:2"]], ids=["in-process", "cluster"])
def test_a_first_interrupt_lets_the_running_item_finish_and_starts_no_further_item(
        where: list[str], clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]
    proc, trail, work = _run_until_item_two(tmp_path, hosts, """\
runbook: loop-drain
steps:
  - name: each
    shell: echo {{ item }} >> count; test {{ item }} != 2 || sleep 3
    loop: [1, 2, 3]
""", *where)   # on a cluster, the loops run on the workers: the controller's first interrupt must reach them
    proc.send_signal(signal.SIGINT)   # once: what runs may finish, nothing new starts
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run_id = records(trail)[0]["run_id"]
    state = json.loads((trail.parent / "runs" / f"{run_id}.json").read_text())
    for h in hosts:
        tasks = {k: (t["status"], t.get("message")) for k, t in state["tasks"].items() if k.endswith("@" + h.name)}
        assert tasks["each[2]@" + h.name][0] == "changed", tasks       # the running item finished
        assert tasks["each[3]@" + h.name] == ("not_run", "not started: the run is stopping"), tasks
        assert (h.home / "count").read_text().split() == ["1", "2"]
    resumed = helpers_cli("resume", run_id, "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"))
    assert resumed.returncode == 0, resumed.stderr
    for h in hosts:
        assert (h.home / "count").read_text().split() == ["1", "2", "3"]   # only item 3 ran on resume


CLUSTER_PB = """\
runbook: loop-cluster
steps:
  - name: each
    shell: echo {{ item }} from {{ inventory_hostname }} >> count; echo {{ item }}
    loop: [a, b, c]
    loop_concurrency: 2
    register: each
  - name: sum
    shell: echo {{ each.results | map(attribute='stdout') | map('trim') | join(',') }} changed={{ each.changed }}
"""


def test_a_loop_on_cluster_workers_matches_an_in_process_run(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]

    def run_in(name: str, *extra: str) -> dict:
        done = run_in_workdir(tmp_path / name, CLUSTER_PB, hosts, *extra)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def shape(doc: dict) -> dict:
        return {(r["host"], r["step_id"]): (r["status"], r["stdout"], r.get("parent"), r.get("items"))
                for r in doc["results"]}

    here = run_in("here")
    for h in hosts:
        h.clear_home()
    there = run_in("there", "--cluster", "local:2")
    assert shape(here) == shape(there)
    assert {r["stdout"] for r in there["results"] if r["step_id"] == "sum"} == {"a,b,c changed=True\n"}
    for h in hosts:
        assert sorted((h.home / "count").read_text().split("\n")[:-1]) == [f"{i} from {h.name}" for i in "abc"]
