"""Stopping a cluster run against real sshd hosts: an interrupt, and the scheduler killed mid-run; both resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli, cli_env
from tests.integration.test_cluster_ssh import (STEPS, Cluster, counts, plain_cluster, start_cluster,
                                                wait_step_two_everywhere, workdir)
from tests.sshd import SSHHost

pytestmark = pytest.mark.ssh
__all__ = ["plain_cluster"]   # the fixture, shared with test_cluster_ssh


def start_run(work: Path, address: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runbook", "run", "pb.yml", "-i", "inventory.yml", "--known-hosts",
                             "known_hosts", "--audit-log", str(work / "audit.jsonl"), "--format", "json", "--cluster",
                             address], cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resume(work: Path, run_id: str, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("resume", run_id, *extra, "--audit-log", str(work / "audit.jsonl"), "--known-hosts",
               str(work / "known_hosts"), "--cluster", address, "--format", "json", cwd=work)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_lets_running_cluster_tasks_finish_and_resume_completes(sig: signal.Signals, plain_cluster: Cluster,
                                                                           clean_ssh_hosts: list[SSHHost],
                                                                           tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "interrupted", sleep=1.5)
    proc = start_run(work, plain_cluster.address)
    wait_step_two_everywhere(work, hosts, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    result = json.loads(out)
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 0, "four": 0}
        assert (h.home / "count-two").read_text() == "run\ndone\n"   # the running task finished on its worker
    statuses = {(r["host"], r["step_id"]): r["status"] for r in result["results"]}
    assert {statuses[(h.name, "two")] for h in hosts} == {"changed"}
    assert {statuses[(h.name, "three")] for h in hosts} == {"not_run"}
    assert all(p.poll() is None for p in plain_cluster.workers.values())   # the workers were not interrupted
    resumed = resume(work, result["run_id"], plain_cluster.address)
    assert resumed.returncode == 0, resumed.stderr
    for h in hosts:
        assert counts(h) == dict.fromkeys(STEPS, 1)


def test_a_lost_scheduler_stops_the_run_and_resume_completes_it(plain_cluster: Cluster, clean_ssh_hosts: list[SSHHost],
                                                                tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "no-scheduler", sleep=3)
    proc = start_run(work, plain_cluster.address)
    wait_step_two_everywhere(work, hosts, proc)
    os.kill(plain_cluster.scheduler.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (3, 130), err
    result = json.loads(out)
    statuses = {(r["host"], r["step_id"]): r["status"] for r in result["results"]}
    for h in hosts:
        assert statuses[(h.name, "one")] == "changed"
        assert statuses[(h.name, "two")] in ("changed", "lost")      # lost: it was running when its worker went
        assert statuses[(h.name, "three")] in ("not_run", "unreachable")
        assert counts(h)["three"] == 0                                # nothing started after the loss
    state = json.loads((work / "runs" / f"{result['run_id']}.json").read_text())
    assert state["status"] in ("failed", "interrupted")
    lost = {h.name for h in hosts if statuses[(h.name, "two")] == "lost"}
    assert lost, "step two was running everywhere when the scheduler (and with it its workers) went"

    fresh = start_cluster(tmp_path, {"n1": None, "n2": None})
    try:
        resumed = resume(work, result["run_id"], fresh.address, "--rerun-in-flight")
        assert resumed.returncode == 0, resumed.stderr
    finally:
        fresh.stop()
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 2 if h.name in lost else 1, "three": 1, "four": 1}, h.name


def test_ctrl_c_on_the_terminal_leaves_local_workers_to_the_controller(clean_ssh_hosts: list[SSHHost],
                                                                       tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: local:N workers must not die of it."""
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "ctrl-c", sleep=2)
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", "pb.yml", "-i", "inventory.yml", "--known-hosts",
                             "known_hosts", "--audit-log", str(work / "audit.jsonl"), "--format", "json", "--cluster",
                             "local:2"], cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_step_two_everywhere(work, hosts, proc)
    os.killpg(proc.pid, signal.SIGINT)   # what the terminal does: every process of the foreground group
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    result = json.loads(out)
    statuses = {(r["host"], r["step_id"]): r["status"] for r in result["results"]}
    for h in hosts:
        assert statuses[(h.name, "two")] == "changed", err        # not lost: its worker kept running
        assert (h.home / "count-two").read_text() == "run\ndone\n"
        assert counts(h)["three"] == 0
