"""A worker's run (runbook/cluster/worker.py), driven as the channel drives it, on a host of the local kind.

What is checked here is the facts' part of its contract with the controller: a task that gathers a
host's facts sends them back once, with its outcome; an order that brings facts (a host moved here)
is not gathered again; a facts request gathers there and keeps them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from runbook.cluster.launch import worker_options
from runbook.cluster.wire import SessionSetup, TaskOrder
from runbook.cluster.worker import WorkerRun
from runbook.engine.options import ExecOptions
from runbook.facts import Facts
from runbook.graph import TaskKey
from runbook.results import Status
from runbook.runner import RunRequest, prepare

PLAYBOOK = """\
runbook: facts-on-a-worker
steps:
  - name: plain
    shell: "true"
  - name: reads
    shell: "echo {{ facts.hostname }}"
  - name: again
    shell: "echo {{ facts.hostname }}"
"""


def worker_run(tmp_path: Path) -> tuple[WorkerRun, list[str]]:
    (tmp_path / "pb.yml").write_text(PLAYBOOK)
    (tmp_path / "inv.yml").write_text(textwrap.dedent("""\
        all:
          hosts:
            web1: {ansible_connection: local}
            web2: {ansible_connection: local}
        """))
    prepared = prepare(tmp_path / "pb.yml", str(tmp_path / "inv.yml"), RunRequest())
    setup = SessionSetup(prepared.playbook, prepared.hosts, prepared.info, worker_options(ExecOptions()), "", "strict",
                         5.0, 4)
    work = WorkerRun(setup, "w1", lambda event: None)
    gathered: list[str] = []

    def count(host: str, conn: Any) -> Facts:
        gathered.append(host)
        return Facts(hostname=f"{host}.example")

    work.runner.facts.gatherer = count
    return work, gathered


def order(task_id: int, step: str, host: str, facts: Facts | None = None) -> TaskOrder:
    return TaskOrder(task_id, TaskKey(step, host), False, {}, facts=facts)


def test_the_task_that_gathers_a_hosts_facts_sends_them_back_once(tmp_path: Path) -> None:
    work, gathered = worker_run(tmp_path)
    try:
        outcomes = [work.run(order(i, step, "web1")) for i, step in enumerate(["plain", "reads", "again"], 1)]
    finally:
        work.close()
    assert [o.result.status for o in outcomes] == [Status.CHANGED] * 3
    assert [o.facts for o in outcomes] == [None, Facts(hostname="web1.example"), None]
    assert outcomes[2].result.stdout == "web1.example\n" and gathered == ["web1"]


def test_a_host_that_brings_its_facts_is_not_gathered_again(tmp_path: Path) -> None:
    work, gathered = worker_run(tmp_path)
    try:
        outcome = work.run(order(1, "reads", "web1", Facts(hostname="from-the-old-worker")))
    finally:
        work.close()
    assert outcome.result.stdout == "from-the-old-worker\n" and outcome.facts is None and gathered == []


def test_a_facts_request_gathers_here_and_keeps_them_for_the_hosts_tasks(tmp_path: Path) -> None:
    work, gathered = worker_run(tmp_path)
    try:
        reply = work.gather("web2")
        outcome = work.run(order(1, "reads", "web2"))
        stranger = work.gather("db9")   # not a host of this run: nothing is connected for it
    finally:
        work.close()
    assert reply.facts == Facts(hostname="web2.example") and reply.reason is None
    assert outcome.result.stdout == "web2.example\n" and outcome.facts is None   # the controller has them
    assert gathered == ["web2"]
    assert stranger.facts is None and "not part of this run" in str(stranger.reason)
