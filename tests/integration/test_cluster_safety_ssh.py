"""Cluster runs against real sshd hosts: secrets, host keys learned on workers, and what stays on the controller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli
from tests.sshd import SSHHost, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

TOKEN = "s3cr3t-T0KEN-for-cluster-test"


def test_secrets_reach_their_tasks_and_nothing_records_them(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    (tmp_path / "pb.yml").write_text("""\
runbook: secretive
secrets:
  api_token: env:CLUSTER_TEST_TOKEN
steps:
  - name: store
    shell: printf '%s' {{ api_token | quote }} > token
  - name: show
    shell: cat token; echo; echo "and {{ api_token }}"
  - name: plain
    shell: echo nothing secret
""")
    write_inventory(tmp_path / "inventory.yml", hosts)
    write_known_hosts(tmp_path / "known_hosts", hosts)
    done = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
               str(tmp_path / "audit.jsonl"), "--format", "json", "--cluster", "local:2", "-v",
               env={"CLUSTER_TEST_TOKEN": TOKEN}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for h in hosts:
        assert (h.home / "token").read_text() == TOKEN      # the worker had the secret its task reads
    result = json.loads(done.stdout)
    assert {r["worker"] for r in result["results"]} and all(r["worker"] for r in result["results"])
    shown = next(r for r in result["results"] if r["step_id"] == "show")
    assert "***" in shown["stdout"]
    for text, what in ((done.stdout, "json output"), (done.stderr, "console"),
                       ((tmp_path / "audit.jsonl").read_text(), "audit trail"),
                       ("".join(p.read_text() for p in (tmp_path / "runs").iterdir()), "run state")):
        assert TOKEN not in text, what


def test_accept_new_keys_learned_on_workers_are_recorded_by_the_controller(clean_ssh_hosts: list[SSHHost],
                                                                            tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    (tmp_path / "pb.yml").write_text("runbook: keys\nsteps:\n  - name: one\n    command: [\"true\"]\n")
    write_inventory(tmp_path / "inventory.yml", hosts)
    known = tmp_path / "known_hosts"
    refused = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", str(known), "--audit-log",
                  str(tmp_path / "audit.jsonl"), "--cluster", "local:2", cwd=tmp_path)
    assert refused.returncode == 3, refused.stderr                 # strict: unknown keys refused on the workers
    assert "unknown host key" in refused.stderr and not known.exists()
    learned = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", str(known), "--audit-log",
                  str(tmp_path / "audit.jsonl"), "--cluster", "local:2", "--host-key-checking", "accept-new",
                  cwd=tmp_path)
    assert learned.returncode == 0, learned.stderr
    lines = set(known.read_text().splitlines())
    for h in hosts:   # the keys the workers saw, each under its host's own name, now in the controller's file
        name, kind, key = h.host_public_key.split()[:3]
        assert f"{name} {kind} {key}" in lines
    strict = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", str(known), "--audit-log",
                 str(tmp_path / "audit.jsonl"), "--cluster", "local:2", cwd=tmp_path)
    assert strict.returncode == 0, strict.stderr


def test_controller_steps_and_gates_stay_on_the_controller(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    (tmp_path / "pb.yml").write_text("""\
runbook: mixed
steps:
  - name: remote
    shell: echo "on {{ inventory_hostname }}" > where
  - name: gate
    approve: "go on?"
  - name: local
    on: controller
    shell: echo "{{ inventory_hostname }}" >> controller-log
""")
    write_inventory(tmp_path / "inventory.yml", hosts)
    write_known_hosts(tmp_path / "known_hosts", hosts)
    done = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
               str(tmp_path / "audit.jsonl"), "--format", "json", "--cluster", "local:2", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    where = {(r["host"], r["step_id"]): r.get("worker") for r in result["results"]}
    for h in hosts:
        assert where[(h.name, "remote")] is not None
        assert where[(h.name, "gate")] is None and where[(h.name, "local")] is None   # ran on the controller
        assert (h.home / "where").read_text() == f"on {h.name}\n"
    assert sorted((tmp_path / "controller-log").read_text().split()) == sorted(h.name for h in hosts)
