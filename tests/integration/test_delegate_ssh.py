"""`delegate_to` against real OpenSSH servers on 127.0.0.1 (no mocks): the step runs on the delegate's machine, as
its user, with the selected host's variables, over one connection for the run; dry runs stay read-only there; names
from the inventory or -e that are not inventory hosts are refused before anything runs anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.results import RunResult, Status
from tests.helpers import cli, records
from tests.sshd import SSHHost, free_port, write_inventory

pytestmark = pytest.mark.ssh

COLORS = ["red", "green", "blue"]


@pytest.fixture
def hosts(clean_ssh_hosts: list[SSHHost]) -> list[SSHHost]:
    if len(clean_ssh_hosts) < 3:
        pytest.skip("needs three test hosts")
    return clean_ssh_hosts[:3]


def inventory(tmp_path: Path, hosts: list[SSHHost], extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """Every test host with its `home` and a `color`; `extra` adds or overrides host variables."""
    hv = {h.name: {"home": str(h.home), "color": COLORS[i], **(extra or {}).get(h.name, {})} for i, h in enumerate(hosts)}
    return write_inventory(tmp_path / "inventory.yml", hosts, host_vars=hv)


def playbook(tmp_path: Path, steps: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "hosts": "h0:h1", **top, "steps": steps}, sort_keys=False))
    return path


def go(pb: Path, inv: Path, known: Path, **kw: Any) -> RunResult:
    return run(pb, str(inv), known_hosts=str(known), audit_log=str(pb.parent / "audit.jsonl"),
               state_dir=str(pb.parent / "runs"), connect_timeout=5.0, **kw)


def test_a_delegated_step_runs_on_the_delegate_over_one_connection(tmp_path: Path, hosts: list[SSHHost],
                                                                  known_hosts: Path) -> None:
    h0, h1, h2 = hosts
    inv = inventory(tmp_path, hosts)
    # $SSH_CONNECTION names the client's port: the same for every command sent over one connection.
    line = "echo {{ inventory_hostname }} {{ color }} $(id -un) $(echo $SSH_CONNECTION | cut -d' ' -f2)"
    pb = playbook(tmp_path, [
        {"name": "first", "delegate_to": "h2", "shell": line + " >> {{ d_home }}/log"},
        {"name": "second", "delegate_to": "h2", "shell": line + " >> {{ d_home }}/log"},
        {"name": "parallel", "needs": [], "delegate_to": "h2", "shell": line + " >> {{ d_home }}/log"},
        {"name": "own", "needs": [], "shell": line + " > {{ home }}/own"},
    ], vars={"d_home": str(h2.home)})
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0, result.as_dict()
    rows = [ln.split() for ln in (h2.home / "log").read_text().splitlines()]
    assert len(rows) == 6
    # The selected host's variables (h2's own color is blue), run as h2's user, on h2's sshd.
    assert sorted((name, color, user) for name, color, user, _ in rows) == sorted(
        [("h0", "red", h2.user)] * 3 + [("h1", "green", h2.user)] * 3)
    assert len({port for *_, port in rows}) == 1, rows           # one connection to h2 for the whole run
    own = {h.name: (h.home / "own").read_text().split() for h in (h0, h1)}
    assert own["h0"][2] == h0.user and own["h1"][2] == h1.user
    assert {own["h0"][3], own["h1"][3]}.isdisjoint({rows[0][3]})   # the hosts' own connections are their own
    assert not (h0.home / "log").exists() and not (h1.home / "log").exists()
    assert {(r.host, r.step_id): r.delegated_to for r in result.results if r.step_id != "own"} == {
        (h, s): "h2" for h in ("h0", "h1") for s in ("first", "second", "parallel")}
    finished = [r for r in records(tmp_path / "audit.jsonl") if r["event"] == "task.finished"]
    assert {(r["host"], r.get("delegated_to")) for r in finished if r["step_id"] == "first"} == {("h0", "h2"), ("h1", "h2")}
    assert all("delegated_to" not in r for r in finished if r["step_id"] == "own")


def test_a_dry_run_through_a_delegate_reads_it_and_changes_nothing(tmp_path: Path, hosts: list[SSHHost],
                                                                  known_hosts: Path) -> None:
    h0, h1, h2 = hosts
    inv = inventory(tmp_path, hosts)
    (h2.home / "present").write_text("x")
    src = tmp_path / "app.conf"
    src.write_text("port=80\n")
    pb = playbook(tmp_path, [
        {"name": "look", "delegate_to": "h2", "read_only": True, "shell": "ls {{ d_home }}", "register": "seen"},
        {"name": "say", "print": "h2 has {{ seen.stdout | trim }}"},
        {"name": "send", "delegate_to": "h2", "upload": {"src": str(src), "dest": "{{ d_home }}/app-{{ inventory_hostname }}.conf"}},
        {"name": "touch", "delegate_to": "h2", "shell": "touch {{ d_home }}/touched-{{ inventory_hostname }}",
         "creates": "{{ d_home }}/touched-{{ inventory_hostname }}"},
    ], vars={"d_home": str(h2.home)})
    plan = go(pb, inv, known_hosts, mode="plan")
    assert plan.exit_code() == 0, plan.as_dict()
    assert sorted(p.name for p in h2.home.iterdir()) == ["present"]
    assert plan.get("h0", "say").message == "h2 has present"
    assert str(plan.get("h0", "send").prediction) == "change" and str(plan.get("h1", "touch").prediction) == "change"
    done = go(pb, inv, known_hosts)
    assert done.exit_code() == 0, done.as_dict()
    assert sorted(p.name for p in h2.home.iterdir()) == [
        "app-h0.conf", "app-h1.conf", "present", "touched-h0", "touched-h1"]
    assert (h2.home / "app-h1.conf").read_text() == "port=80\n"
    assert list(h0.home.iterdir()) == [] and list(h1.home.iterdir()) == []
    again = go(pb, inv, known_hosts, mode="plan")    # read on the delegate: now nothing to do there
    assert str(again.get("h0", "send").prediction) == "ok" and str(again.get("h0", "touch").prediction) == "skip"


def test_hostile_delegate_names_from_the_inventory_or_extra_vars_are_refused(tmp_path: Path, hosts: list[SSHHost],
                                                                           known_hosts: Path) -> None:
    h0, h1, h2 = hosts
    marker = h2.home / "pwned"
    inv = inventory(tmp_path, hosts, extra={"h0": {"backup": f"h2; touch {marker}"}, "h1": {"backup": "h2"}})
    pb = playbook(tmp_path, [{"name": "copy", "delegate_to": "{{ backup }}",
                              "shell": "echo {{ inventory_hostname }} >> {{ d_home }}/ran"}], vars={"d_home": str(h2.home)})
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 2
    refused = result.get("h0", "copy")
    assert refused.status == Status.FAILED and "is not a host name" in refused.message and refused.delegated_to is None
    assert (h2.home / "ran").read_text() == "h1\n" and not marker.exists()
    pb2 = playbook(tmp_path, [{"name": "copy", "delegate_to": "{{ where }}", "shell": f"touch {marker}"}])
    proc = cli("run", str(pb2), "-i", str(inv), "--known-hosts", str(known_hosts), "--audit-log",
               str(tmp_path / "a.jsonl"), "-e", "where=db.example.com", "--format", "json")
    assert proc.returncode == 2, proc.stderr
    doc = json.loads(proc.stdout)
    assert {r["status"] for r in doc["results"]} == {"failed"}
    assert all("`db.example.com` (rendered from `{{ where }}`) is not a host of the inventory" in r["message"]
               for r in doc["results"])
    assert not marker.exists()


def test_an_unknown_literal_delegate_stops_the_run_before_any_connection(tmp_path: Path, hosts: list[SSHHost],
                                                                       known_hosts: Path) -> None:
    inv = inventory(tmp_path, hosts)
    pb = playbook(tmp_path, [{"name": "mark", "shell": "touch {{ home }}/touched"},
                             {"name": "x", "delegate_to": "hh2", "shell": "true"}])
    proc = cli("run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 4
    assert "pb.yml:7:16: error: `delegate_to: hh2`: no such host in the inventory" in proc.stderr
    assert "did you mean `h2`?" in proc.stderr and "Traceback" not in proc.stderr
    assert not any((h.home / "touched").exists() for h in hosts)
    assert not (tmp_path / "a.jsonl").exists()     # nothing started: no run was recorded


def test_an_unreachable_delegate_fails_its_steps_not_the_hosts(tmp_path: Path, hosts: list[SSHHost],
                                                             known_hosts: Path) -> None:
    inv_path = inventory(tmp_path, hosts)
    doc = yaml.safe_load(inv_path.read_text())
    doc["all"]["hosts"]["gone"] = {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "nobody"}
    inv_path.write_text(yaml.safe_dump(doc))
    pb = playbook(tmp_path, [{"name": "own", "shell": "touch {{ home }}/own"},
                             {"name": "report", "needs": [], "delegate_to": "gone", "shell": "true"},
                             {"name": "report-again", "delegate_to": "gone", "shell": "true"}])
    result = go(pb, inv_path, known_hosts)
    assert result.exit_code() == 2 and not result.unreachable
    for h in ("h0", "h1"):
        assert result.get(h, "own").status == Status.CHANGED
        assert "delegate gone is unreachable" in result.get(h, "report").message
        assert result.get(h, "report-again").status == Status.NOT_RUN
    assert (hosts[0].home / "own").exists() and (hosts[1].home / "own").exists()
