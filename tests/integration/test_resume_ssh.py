"""Run state and resume against real sshd hosts: an interrupted CLI run resumes without re-running finished tasks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, records
from tests.helpers import cli_env as env
from tests.sshd import SSHHost, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

STEPS = ("one", "two", "three", "four")

# Every step appends a line to its own counter file on the host, so re-runs show up as extra lines.
PLAYBOOK = """\
runbook: resumable
steps:
  - name: one
    shell: echo run >> count-one
  - name: two
    shell: echo run >> count-two; sleep {sleep}; echo done >> count-two
  - name: three
    shell: echo run >> count-three
  - name: four
    shell: echo run >> count-four
"""


def counts(host: SSHHost) -> dict[str, int]:
    """How many times each step started on a host (lines "run" in its counter file)."""
    out = {}
    for step in STEPS:
        f = host.home / f"count-{step}"
        out[step] = f.read_text().splitlines().count("run") if f.exists() else 0
    return out


def wait_for(predicate: Any, proc: subprocess.Popen[str], what: str, timeout: float = 30.0) -> None:
    """Poll until predicate() holds; fail early when the process already exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def interrupted_run(tmp_path: Path, hosts: list[SSHHost], sleep: float, signals: int) -> tuple[Path, Path, Path, str,
                                                                                               subprocess.CompletedProcess[str]]:
    """Start the CLI, SIGINT it `signals` times once step two runs everywhere; return paths, run id and outcome."""
    work = tmp_path / "work"
    work.mkdir()
    playbook = work / "resumable.yml"
    playbook.write_text(PLAYBOOK.format(sleep=sleep))
    write_inventory(work / "inventory.yml", hosts)
    write_known_hosts(work / "known_hosts", hosts)
    trail = tmp_path / "trail" / "audit.jsonl"
    # Relative paths from the playbook's directory, as an operator types them; resume runs elsewhere.
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", "resumable.yml", "-i", "inventory.yml",
                             "--known-hosts", "known_hosts", "--audit-log", str(trail)],
                            cwd=work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def two_running_everywhere() -> bool:
        if not trail.exists():
            return False
        started = {r["host"] for r in records(trail) if r["event"] == "task.started" and r["step_id"] == "two"}
        return started == {h.name for h in hosts} and all((h.home / "count-two").exists() for h in hosts)

    wait_for(two_running_everywhere, proc, "step two started on every host")
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    run_id = records(trail)[0]["run_id"]
    return work, playbook, trail, run_id, completed


def test_interrupted_run_resumes_without_rerunning_finished_tasks(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts
    work, playbook, trail, run_id, first = interrupted_run(tmp_path, hosts, sleep=1.5, signals=1)
    assert first.returncode == 130, first.stderr
    # One interrupt: step two (running) finished, nothing new started.
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 0, "four": 0}
        assert (h.home / "count-two").read_text() == "run\ndone\n"
    recs = records(trail)
    assert [r["event"] for r in recs].count("run.interrupted") == 1
    assert recs[-1]["event"] == "run.finished" and recs[-1]["interrupted"] is True
    verify = cli("audit", "verify", "--audit-log", str(trail))
    assert verify.returncode == 0, verify.stdout
    state_file = trail.parent / "runs" / f"{run_id}.json"
    state = json.loads(state_file.read_text())
    assert state["status"] == "interrupted"
    statuses = {k: t["status"] for k, t in state["tasks"].items()}
    for h in hosts:
        assert statuses[f"one@{h.name}"] == "changed" and statuses[f"two@{h.name}"] == "changed"
        assert statuses[f"three@{h.name}"] == "not_run" and statuses[f"four@{h.name}"] == "not_run"

    listed = cli("runs", "--audit-log", str(trail))
    assert listed.returncode == 0
    assert run_id in listed.stdout and "interrupted" in listed.stdout

    # Resume from another directory, by a run id prefix.
    resumed = cli("resume", run_id[:-2], "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"),
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for h in hosts:
        assert counts(h) == {"one": 1, "two": 1, "three": 1, "four": 1}
    recs = records(trail)
    second = [r for r in recs if r["run_id"] != run_id]
    assert second[0]["event"] == "run.started" and second[0]["mode"] == "resume"
    assert second[0]["details"]["resumed_from"] == run_id and second[0]["details"]["force"] is False
    assert {(r["host"], r["step_id"]) for r in second if r["event"] == "task.started"} == {
        (h.name, s) for h in hosts for s in ("three", "four")}
    assert cli("audit", "verify", "--audit-log", str(trail)).returncode == 0
    header, *listed = cli("runs", "--audit-log", str(trail)).stdout.splitlines()
    assert header.startswith("STARTED (UTC)")   # then one row per run, newest first: time, run id, mode, status
    assert listed[0].split()[2] == second[0]["run_id"] and " ok " in listed[0]
    assert listed[1].split()[2] == run_id


def test_second_interrupt_aborts_the_running_step_and_resume_reruns_it(clean_ssh_hosts: list[SSHHost],
                                                                       tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]
    work, playbook, trail, run_id, first = interrupted_run(tmp_path, hosts, sleep=20, signals=2)
    assert first.returncode == 130, first.stderr
    state = json.loads((trail.parent / "runs" / f"{run_id}.json").read_text())
    for h in hosts:
        assert state["tasks"][f"two@{h.name}"]["status"] == "failed"
        assert "second interrupt" in state["tasks"][f"two@{h.name}"]["message"]
        assert counts(h) == {"one": 1, "two": 1, "three": 0, "four": 0}
    assert cli("audit", "verify", "--audit-log", str(trail)).returncode == 0
    # Editing the playbook (here: a quick step two) makes resume refuse; --force goes on and is recorded.
    playbook.write_text(PLAYBOOK.format(sleep=0))
    refused = cli("resume", run_id, "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"))
    assert refused.returncode == 4, refused.stderr
    assert "the playbook changed" in refused.stderr
    for h in hosts:
        assert counts(h)["three"] == 0       # nothing ran
    forced = cli("resume", run_id, "--force", "--audit-log", str(trail), "--known-hosts", str(work / "known_hosts"))
    assert forced.returncode == 0, forced.stderr
    for h in hosts:
        # Step one is not re-run; the aborted step two is.
        assert counts(h) == {"one": 1, "two": 2, "three": 1, "four": 1}
    started = [r for r in records(trail) if r["event"] == "run.started"]
    assert len(started) == 2       # the refused resume wrote nothing
    details = started[1]["details"]
    assert details["force"] is True and details["resumed_from"] == run_id
    assert details["forced"] == ["the playbook changed since the run"]
    assert cli("audit", "verify", "--audit-log", str(trail)).returncode == 0


SECRET_PLAYBOOK = """\
runbook: secret-resume
steps:
  - name: first
    shell: echo run >> count-one
  - name: uses key
    shell: test -e go && printf '%s' {{ api_key | quote }} > key.txt
"""


def test_resume_needs_redacted_extra_vars_again(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    # The run state stores -e values redacted; resuming must not run with the mask "***" as the value.
    host = clean_ssh_hosts[0]
    playbook = tmp_path / "secret.yml"
    playbook.write_text(SECRET_PLAYBOOK)
    inventory = write_inventory(tmp_path / "inventory.yml", [host])
    known = write_known_hosts(tmp_path / "known_hosts", [host])
    trail = tmp_path / "audit.jsonl"
    first = cli("run", str(playbook), "-i", str(inventory), "--known-hosts", str(known), "--audit-log", str(trail),
                "-e", "api_key=rk-SECRET-4242", "-e", "other=plain")
    assert first.returncode == 2, first.stderr        # no `go` file yet: the second step fails
    run_id = records(trail)[0]["run_id"]
    state_text = (tmp_path / "runs" / f"{run_id}.json").read_text()
    assert "rk-SECRET-4242" not in state_text
    (host.home / "go").touch()
    common = ["resume", run_id, "--audit-log", str(trail), "--known-hosts", str(known)]
    refused = cli(*common)
    assert refused.returncode == 4, refused.stderr
    assert "api_key" in refused.stderr and not (host.home / "key.txt").exists()
    resumed = cli(*common, "-e", "api_key=rk-SECRET-4242")
    assert resumed.returncode == 0, resumed.stderr
    assert (host.home / "key.txt").read_text() == "rk-SECRET-4242"
    assert counts(host)["one"] == 1
    assert "rk-SECRET-4242" not in trail.read_text() + resumed.stdout + resumed.stderr
