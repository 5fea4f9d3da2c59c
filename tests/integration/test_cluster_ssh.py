"""Runs on a real Dask cluster (a `dask scheduler` and `runbook worker` processes, or local:N) against real sshd hosts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, cli_env, records, stop_processes
from tests.sshd import SSHHost, free_port, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

VENV_BIN = Path(sys.executable).parent

PLAYBOOK = """\
runbook: clustered
steps:
  - name: one
    shell: echo "one from {{ inventory_hostname }}"; echo run >> count-one
    register: first
  - name: two
    shell: echo "saw {{ first.stdout }}"; echo run >> count-two; sleep SLEEP; echo done >> count-two
  - name: three
    shell: echo run >> count-three
    when: first.rc == 0
  - name: four
    shell: echo run >> count-four
"""
STEPS = ("one", "two", "three", "four")


@dataclass
class Cluster:
    """A running scheduler and its workers (name -> process)."""

    address: str
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]]

    def stop(self) -> None:
        # Workers first: stopped together, a worker's close can cross its scheduler's and hang (cluster/stopping.py).
        stop_processes(list(self.workers.values()))
        stop_processes([self.scheduler])


def wait_workers(address: str, names: set[str], procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """Until the scheduler lists every named worker (fails early when a process died)."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=30, set_as_default=False) as client:
        while True:
            seen = {str(w.get("name")) for w in client.scheduler_info(n_workers=-1)["workers"].values()}
            if names <= seen:
                return
            for proc in procs:
                if proc.poll() is not None:
                    pytest.fail(f"a cluster process exited ({proc.returncode}): {proc.args}")
            if time.monotonic() > deadline:
                pytest.fail(f"workers {sorted(names - seen)} did not join within {timeout}s")
            time.sleep(0.2)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a cluster process with its stderr in `log` (for a failing test's diagnosis)."""
    with log.open("wb") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=cli_env())


def start_cluster(tmp_path: Path, workers: dict[str, str | None], plain: frozenset[str] = frozenset(),
                  hide: Path | None = None) -> Cluster:
    """`dask scheduler` plus one `runbook worker` per name (name -> zone); names in `plain` are plain `dask worker`s.

    With `hide`, the workers see an empty directory there (a mount namespace of their own), as a worker
    on another machine sees no copy of the controller's playbook directory."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "cluster-logs"
    logs.mkdir(exist_ok=True)
    scheduler = _spawn([str(VENV_BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--no-dashboard"], logs / "scheduler")
    cluster = Cluster(address, scheduler, {})
    try:
        for name, zone in workers.items():
            argv = [sys.executable, "-m", "runbook", "worker", address, "--name", name, "--nthreads", "1",
                    *(["--zone", zone] if zone else [])]
            if name in plain:   # a Dask worker that knows nothing of runbook but has it installed
                argv = [str(VENV_BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1", "--no-nanny",
                        *(["--resources", f"zone:{zone}=1"] if zone else [])]
            if hide is not None:
                empty = tmp_path / "nothing-here"
                empty.mkdir(exist_ok=True)
                argv = ["unshare", "--mount", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
                        str(empty), str(hide), *argv]
            cluster.workers[name] = _spawn(argv, logs / f"worker-{name}")
        wait_workers(address, set(workers), [scheduler, *cluster.workers.values()])
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def zoned_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Two zones: east (two `runbook worker`s) and west (one plain `dask worker`)."""
    cluster = start_cluster(tmp_path, {"east-1": "east", "east-2": "east", "west-1": "west"}, frozenset({"west-1"}))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def plain_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Two workers of no zone."""
    cluster = start_cluster(tmp_path, {"w1": None, "w2": None})
    try:
        yield cluster
    finally:
        cluster.stop()


def workdir(tmp_path: Path, hosts: list[SSHHost], name: str, sleep: float = 0.1,
            host_vars: dict[str, dict[str, Any]] | None = None) -> Path:
    work = tmp_path / name
    work.mkdir()
    (work / "pb.yml").write_text(PLAYBOOK.replace("SLEEP", str(sleep)))
    write_inventory(work / "inventory.yml", hosts, host_vars)
    write_known_hosts(work / "known_hosts", hosts)
    return work


def run_cli(work: Path, *extra: str, command: str = "run") -> subprocess.CompletedProcess[str]:
    return cli(command, "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
               str(work / "audit.jsonl"), "--format", "json", *extra, cwd=work, timeout=180)


def counts(host: SSHHost) -> dict[str, int]:
    out = {}
    for step in STEPS:
        f = host.home / f"count-{step}"
        out[step] = f.read_text().splitlines().count("run") if f.exists() else 0
    return out


def comparable(result: dict[str, Any]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """What must match between runs: per task, its status, rc, output, attempts, message."""
    return {(r["host"], r["step_id"]): (r["status"], r["rc"], r["stdout"], r["attempts"], r["message"])
            for r in result["results"]}


def audit_shape(trail: Path) -> dict[tuple[str, str], list[str]]:
    """Per task, the audit events it got, in order."""
    out: dict[tuple[str, str], list[str]] = {}
    for r in records(trail):
        if r["event"].startswith("task."):
            out.setdefault((r["host"], r["step_id"]), []).append(r["event"])
    return out


def state_of(trail: Path, run_id: str) -> dict[str, Any]:
    return json.loads((trail.parent / "runs" / f"{run_id}.json").read_text())


def wait_step_two_everywhere(work: Path, hosts: list[SSHHost], proc: subprocess.Popen[str]) -> None:
    """Wait until step `two` started on every host (its marker written, its start in the audit trail)."""
    trail = work / "audit.jsonl"
    deadline = time.monotonic() + 60
    while not (trail.exists() and all((h.home / "count-two").exists() for h in hosts)
               and {r.get("host") for r in records(trail) if r["event"] == "task.started" and r.get("step_id") == "two"}
               == {h.name for h in hosts}):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "step two did not start everywhere"
        time.sleep(0.05)


def test_local_cluster_matches_an_in_process_run(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    here = run_cli(workdir(tmp_path, hosts, "here"))
    assert here.returncode == 0, here.stderr
    for h in hosts:
        h.clear_home()
    work = workdir(tmp_path, hosts, "cluster")
    taken = socket.socket()   # Dask's default HTTP port, taken: the local scheduler must not warn about it
    with contextlib.suppress(OSError):
        taken.bind(("127.0.0.1", 8787))
        taken.listen()
    try:
        there = run_cli(work, "--cluster", "local:2")
    finally:
        taken.close()
    assert there.returncode == 0, there.stderr
    assert "8787" not in there.stderr and "already in use" not in there.stderr, there.stderr
    a, b = json.loads(here.stdout), json.loads(there.stdout)
    assert comparable(a) == comparable(b)
    assert b["results"][0]["stdout"].startswith("one from ")
    assert {r["stdout"] for r in b["results"] if r["step_id"] == "two"} == {f"saw one from {h.name}\n\n" for h in hosts}
    assert all("worker" not in r for r in a["results"])           # in-process: no worker recorded
    workers = {r["host"]: r["worker"] for r in b["results"]}
    assert all(workers.values()) and len(set(workers.values())) == 2
    for r in b["results"]:                                          # a host's tasks all ran on one worker
        assert r["worker"] == workers[r["host"]]
    for h in hosts:
        assert counts(h) == dict.fromkeys(STEPS, 1)
    # The audit trail and the run state look as for an in-process run.
    assert audit_shape(tmp_path / "here" / "audit.jsonl") == audit_shape(work / "audit.jsonl")
    assert cli("audit", "verify", "--audit-log", str(work / "audit.jsonl")).returncode == 0
    state = state_of(work / "audit.jsonl", b["run_id"])
    assert state["status"] == "ok"
    assert {k: t["status"] for k, t in state["tasks"].items()} == {f"{s}@{h.name}": "changed" for s in STEPS for h in hosts}
    assert state["tasks"][f"one@{hosts[0].name}"]["worker"] == workers[hosts[0].name]


def test_zones_route_each_hosts_tasks_to_a_worker_of_its_zone(zoned_cluster: Cluster, clean_ssh_hosts: list[SSHHost],
                                                               tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    zones = {h.name: ("west" if i == len(hosts) - 1 else "east") for i, h in enumerate(hosts)}
    work = workdir(tmp_path, hosts, "zoned", host_vars={n: {"runbook_zone": z} for n, z in zones.items()})
    done = run_cli(work, "--cluster", zoned_cluster.address)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["results"]) == len(STEPS) * len(hosts)
    for r in result["results"]:
        assert r["status"] == "changed"
        assert r["worker"].startswith(zones[r["host"]] + "-"), r
    east = {r["worker"] for r in result["results"] if zones[r["host"]] == "east"}
    assert east == {"east-1", "east-2"}      # spread over the zone's workers
    for h in hosts:
        assert counts(h) == dict.fromkeys(STEPS, 1)


def test_a_zone_without_a_worker_is_refused_before_any_host_is_touched(zoned_cluster: Cluster,
                                                                        clean_ssh_hosts: list[SSHHost],
                                                                        tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "north", host_vars={hosts[0].name: {"runbook_zone": "north"}})
    refused = run_cli(work, "--cluster", zoned_cluster.address)
    assert refused.returncode == 4, refused.stderr
    assert "zone `north` has no worker" in refused.stderr and hosts[0].name in refused.stderr
    assert "--zone north" in refused.stderr
    assert not (work / "audit.jsonl").exists()
    for h in hosts:
        assert counts(h) == dict.fromkeys(STEPS, 0)


def test_a_dry_run_through_the_cluster_changes_nothing(plain_cluster: Cluster, clean_ssh_hosts: list[SSHHost],
                                                       tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "plan")
    planned = cli("plan", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
                  str(work / "audit.jsonl"), "--format", "json", "--cluster", plain_cluster.address, cwd=work)
    assert planned.returncode == 0, planned.stderr
    doc = json.loads(planned.stdout)
    assert doc["predictions"], doc
    kinds = {(p["host"], p["step_id"]): (p["prediction"], p["reason"]) for p in doc["predictions"]}
    assert set(kinds) == {(h.name, s) for h in hosts for s in STEPS}
    here = cli("plan", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
               str(work / "audit.jsonl"), "--format", "json", cwd=work)
    assert kinds == {(p["host"], p["step_id"]): (p["prediction"], p["reason"]) for p in json.loads(here.stdout)["predictions"]}
    assert {kinds[(h.name, "one")][0] for h in hosts} == {"unknown"}   # a plain shell step: it may change anything
    for h in hosts:
        assert counts(h) == dict.fromkeys(STEPS, 0)
        assert list(h.home.iterdir()) == []
    dry = run_cli(work, "--dry-run", "--cluster", plain_cluster.address)
    assert dry.returncode == 0, dry.stderr
    for h in hosts:
        assert list(h.home.iterdir()) == []


def test_a_worker_killed_mid_run_loses_its_tasks_and_resume_completes(plain_cluster: Cluster,
                                                                       clean_ssh_hosts: list[SSHHost],
                                                                       tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "killed", sleep=3)
    trail = work / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", "pb.yml", "-i", "inventory.yml", "--known-hosts",
                             "known_hosts", "--audit-log", str(trail), "--format", "json", "--cluster",
                             plain_cluster.address], cwd=work, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_step_two_everywhere(work, hosts, proc)
    victim = plain_cluster.workers["w1"]
    os.kill(victim.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    result = json.loads(out)
    by_task = {(r["host"], r["step_id"]): r for r in result["results"]}
    lost_hosts = {r["host"] for r in result["results"] if r["status"] == "lost"}
    assert lost_hosts, "the killed worker ran some hosts"
    kept_hosts = {h.name for h in hosts} - lost_hosts
    assert kept_hosts, "the other worker ran the others"
    for host in lost_hosts:
        assert by_task[(host, "one")]["status"] == "changed"          # finished before: stays finished
        assert by_task[(host, "two")]["worker"] == "w1" and "was lost" in by_task[(host, "two")]["message"]
        assert by_task[(host, "three")]["status"] == "not_run"       # never run elsewhere
    for host in kept_hosts:
        assert all(by_task[(host, s)]["status"] == "changed" for s in STEPS)
        assert by_task[(host, "two")]["worker"] == "w2"
    assert "cluster worker w1 was lost" in err
    state = state_of(trail, result["run_id"])
    assert {k for k, t in state["tasks"].items() if t["status"] == "lost"} == {f"two@{h}" for h in lost_hosts}
    for h in hosts:
        assert counts(h)["three"] == (0 if h.name in lost_hosts else 1)

    # Resume: lost tasks may have run, so they run again only when the operator says so.
    refused = cli("resume", result["run_id"], "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"),
                  "--cluster", plain_cluster.address, cwd=work)
    assert refused.returncode == 4, refused.stderr
    assert "outcome is unknown" in refused.stderr and f"two@{sorted(lost_hosts)[0]}" in refused.stderr
    resumed = cli("resume", result["run_id"], "--rerun-in-flight", "--audit-log", str(trail), "--known-hosts",
                  str(work / "known_hosts"), "--cluster", plain_cluster.address, "--format", "json", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    ran = {(r["host"], r["step_id"]) for r in again["results"] if not r.get("from_run")}
    assert ran == {(h, s) for h in lost_hosts for s in ("two", "three", "four")}
    assert {r["worker"] for r in again["results"] if not r.get("from_run")} == {"w2"}
    for h in hosts:
        # Nothing ran twice, except the lost task that the operator chose to run again.
        expected = {"one": 1, "two": 2 if h.name in lost_hosts else 1, "three": 1, "four": 1}
        assert counts(h) == expected, h.name


def test_apply_through_the_cluster_checks_drift_on_the_workers(plain_cluster: Cluster, clean_ssh_hosts: list[SSHHost],
                                                               tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work = workdir(tmp_path, hosts, "apply")
    (work / "pb.yml").write_text("""\
runbook: reviewed
steps:
  - name: marker
    shell: touch marker
    creates: marker
  - name: after
    shell: echo run >> count-after
""")
    planned = cli("plan", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
                  str(work / "audit.jsonl"), "--out", "plan.json", "--cluster", plain_cluster.address, cwd=work)
    assert planned.returncode == 0, planned.stderr
    (hosts[0].home / "marker").write_text("")   # the host moved after review
    applied = cli("apply", "plan.json", "--known-hosts", "known_hosts", "--audit-log", str(work / "audit.jsonl"),
                  "--format", "json", "--cluster", plain_cluster.address, cwd=work)
    assert applied.returncode == 2, applied.stderr
    statuses = {(r["host"], r["step_id"]): (r["status"], r["message"]) for r in json.loads(applied.stdout)["results"]}
    assert statuses[(hosts[0].name, "marker")][0] == "drift"
    assert statuses[(hosts[0].name, "after")][0] == "not_run" and "drifted" in statuses[(hosts[0].name, "after")][1]
    assert not (hosts[0].home / "count-after").exists()
    for h in hosts[1:]:
        assert statuses[(h.name, "marker")][0] == "changed" and statuses[(h.name, "after")][0] == "changed"
        assert (h.home / "marker").exists() and (h.home / "count-after").read_text() == "run\n"
