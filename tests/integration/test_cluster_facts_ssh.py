"""A cluster run's facts: steps on the controller read a remote host's facts as in an in-process run.

The facts of a host are gathered over its connection, which lives on its worker. A step that runs
on the controller for that host (`on: controller`, `delegate_to:`) used to fail there ("its
connection is on cluster worker ..."); now it reads the facts its worker gathered, or asks the
worker for them when none of the host's tasks has gathered them yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_in_workdir
from tests.sshd import SSHHost

pytestmark = pytest.mark.ssh

PLAYBOOK = """\
runbook: facts-on-the-controller
steps:
  - name: register-first
    on: controller
    shell: echo "backend {{ inventory_hostname }} {{ facts.user }} {{ facts.system }}" >> lb.txt
  - name: on-host
    shell: echo "{{ facts.user }} {{ facts.uid }}"
  - name: register-after
    delegate_to: controller
    shell: echo "again {{ inventory_hostname }} {{ facts.user }} {{ facts.uid }}"
"""


def run(tmp_path: Path, hosts: list[SSHHost], name: str, *extra: str) -> tuple[dict[str, Any], Path]:
    work = tmp_path / name
    proc = run_in_workdir(work, PLAYBOOK, hosts, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout), work


def test_steps_on_the_controller_read_the_facts_a_worker_gathered_as_in_process(clean_ssh_hosts: list[SSHHost],
                                                                               tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    here, here_dir = run(tmp_path, hosts, "here")
    there, there_dir = run(tmp_path, hosts, "cluster", "--cluster", "local:2")
    outputs = {(r["host"], r["step_id"]): r["stdout"] for r in there["results"]}
    assert outputs == {(r["host"], r["step_id"]): r["stdout"] for r in here["results"]}
    uids: dict[str, str] = {}
    for h in hosts:
        user, uid = outputs[(h.name, "on-host")].split()
        assert user == h.user and uid.isdigit()
        uids[h.name] = uid
        assert outputs[(h.name, "register-after")] == f"again {h.name} {h.user} {uid}\n"
    workers = {r["host"]: r["worker"] for r in there["results"] if r["step_id"] == "on-host"}
    assert all(workers.values()) and len(set(workers.values())) == 2   # the hosts' tasks ran on both workers
    lines = sorted((there_dir / "lb.txt").read_text().splitlines())
    assert lines == sorted((here_dir / "lb.txt").read_text().splitlines())
    assert lines == sorted(f"backend {h.name} {h.user} Linux" for h in hosts)


GATHER_FIRST = """\
runbook: facts-gathered-first
facts: true
steps:
  - name: notify
    on: controller
    shell: echo "maintenance starts on {{ inventory_hostname }}"
  - name: on-host
    shell: echo "{{ facts.user }}"
"""


def test_with_facts_true_a_first_step_on_the_controller_gets_them_from_the_hosts_worker(
        clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    """`facts: true` gathers before each host's first step, here one that runs on the controller."""
    hosts = clean_ssh_hosts
    proc = run_in_workdir(tmp_path / "cluster", GATHER_FIRST, hosts, "--cluster", "local:2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = {(r["host"], r["step_id"]): r["stdout"] for r in json.loads(proc.stdout)["results"]}
    for h in hosts:
        assert outputs[(h.name, "notify")] == f"maintenance starts on {h.name}\n"
        assert outputs[(h.name, "on-host")] == f"{h.user}\n"
