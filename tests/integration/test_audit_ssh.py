"""The audit trail of real runs against real sshd hosts: records, verify after tampering, show, secrets, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, records
from tests.sshd import SSHHost, free_port, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

REPO = Path(__file__).resolve().parents[2]


def seq_output(name: str, n: int) -> str:
    """What `echo NAME; seq 1 N` prints."""
    return name + "\n" + "".join(f"{i}\n" for i in range(1, n + 1))


# ---------------------------------------------------------------------------------------------
# One run with successes, a failure and an unreachable host (shared by several tests)
# ---------------------------------------------------------------------------------------------

PLAYBOOK = """\
runbook: audit-demo
steps:
  - name: write marker
    shell: echo {{ host.name }} > marker.txt; echo {{ host.name }}; seq 1 2000
  - name: check host
    shell: echo "check failed on {{ host.name }}" >&2; test {{ host.name | quote }} != h1
  - name: after check
    shell: echo after >> after.txt
"""


@dataclass
class DemoRun:
    """The outcome of the shared demo run."""

    hosts: list[SSHHost]
    dead_port: int
    repo: Path
    playbook: Path
    inventory: Path
    known_hosts: Path
    trail: Path
    proc: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    commit: str


@pytest.fixture(scope="module")
def demo(ssh_hosts: list[SSHHost], tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """Run the demo playbook (from a git repo) on 3 real hosts plus a closed port, twice into one trail."""
    for h in ssh_hosts:
        h.clear_home()
    base = tmp_path_factory.mktemp("audit-demo")
    repo = base / "repo"
    repo.mkdir()
    playbook = repo / "demo.yml"
    playbook.write_text(PLAYBOOK)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "demo.yml"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "demo"], check=True)
    commit = subprocess.run(git[:3] + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    dead_port = free_port()   # nothing listens there: connection refused
    inventory = write_inventory(base / "inventory.yml", ssh_hosts)
    doc = inventory.read_text() + f"    dead:\n      ansible_host: 127.0.0.1\n      ansible_port: {dead_port}\n"
    inventory.write_text(doc)
    known = write_known_hosts(base / "known_hosts", ssh_hosts)
    trail = base / "audit.jsonl"
    common = ["run", str(playbook), "-i", str(inventory), "--known-hosts", str(known), "--audit-log", str(trail),
              "--connect-timeout", "5"]
    proc = cli(*common, "--operator", "alice", "-e", "api_key=Xk3y-extra-VALUE", "-e", "threshold=7")
    second = cli(*common, env={"RUNBOOK_OPERATOR": "bob"})
    return DemoRun(list(ssh_hosts), dead_port, repo, playbook, inventory, known, trail, proc, second, commit)


def run_records(demo: DemoRun, which: int = 0) -> list[dict[str, Any]]:
    """The records of the first (0) or second (1) demo run."""
    all_records = records(demo.trail)
    run_ids = list(dict.fromkeys(r["run_id"] for r in all_records))
    assert len(run_ids) == 2, run_ids
    return [r for r in all_records if r["run_id"] == run_ids[which]]


def test_demo_run_really_ran_and_exits_unreachable(demo: DemoRun) -> None:
    assert demo.proc.returncode == 3, demo.proc.stderr          # unreachable wins over failed
    assert demo.second.returncode == 3, demo.second.stderr
    for h in demo.hosts:
        assert (h.home / "marker.txt").read_text() == f"{h.name}\n"
    # h1 failed its check, so its last step never ran (twice: once per run); the others ran it twice.
    assert not (demo.hosts[1].home / "after.txt").exists()
    assert (demo.hosts[0].home / "after.txt").read_text() == "after\nafter\n"


def test_run_started_record(demo: DemoRun) -> None:
    started = run_records(demo)[0]
    assert started["event"] == "run.started" and started["seq"] == 1
    assert started["operator"] == "alice"
    assert started["mode"] == "run"
    assert started["host_key_checking"] == "strict"
    assert started["hosts"] == ["h0", "h1", "h2", "dead"]
    assert started["playbook_path"] == str(demo.playbook.resolve())
    assert started["playbook_hash"] == hashlib.sha256(demo.playbook.read_bytes()).hexdigest()
    assert len(started["inventory_hash"]) == 64
    assert started["git_commit"] == demo.commit
    # Secret-looking extra vars are masked, the others kept.
    assert started["extra_vars"] == {"api_key": "***", "threshold": "7"}   # -e key=value is text, as in Ansible
    assert started["control_host"]
    assert started["timestamp"].endswith("Z")
    # The second run: operator from RUNBOOK_OPERATOR, same playbook and inventory hashes.
    second = run_records(demo, 1)[0]
    assert second["operator"] == "bob"
    assert (second["playbook_hash"], second["inventory_hash"]) == (started["playbook_hash"], started["inventory_hash"])
    assert second["prev"] == run_records(demo)[-1]["hash"]    # both runs extend one chain


def test_task_records(demo: DemoRun) -> None:
    recs = run_records(demo)
    started = {(r["host"], r["step_id"]): r for r in recs if r["event"] == "task.started"}
    finished = {(r["host"], r["step_id"]): r for r in recs if r["event"] == "task.finished"}
    assert started[("h2", "write-marker")]["command"] == "echo h2 > marker.txt; echo h2; seq 1 2000"
    assert started[("h2", "write-marker")]["action"] == "shell"
    # Output over the 4096-character default is cut, with the full length and hash of all of it.
    marker = finished[("h0", "write-marker")]
    full = seq_output("h0", 2000)
    assert marker["status"] == "changed" and marker["rc"] == 0 and marker["changed"] is True
    assert marker["command"] == "echo h0 > marker.txt; echo h0; seq 1 2000"
    assert marker["stdout_truncated"] is True
    assert marker["stdout"] == full[:4096]
    assert marker["stdout_len"] == len(full)
    assert marker["stdout_sha256"] == hashlib.sha256(full.encode()).hexdigest()
    assert marker["duration"] >= 0 and marker["attempts"] == 1
    assert marker["finished_at"] >= marker["started_at"]
    failed = finished[("h1", "check-host")]
    assert failed["status"] == "failed" and failed["rc"] == 1
    assert failed["stderr"] == "check failed on h1\n" and failed["stderr_truncated"] is False
    assert failed["stderr_len"] == len("check failed on h1\n")
    assert finished[("h0", "check-host")]["status"] == "changed"
    assert finished[("h1", "after-check")]["status"] == "not_run"
    assert "check-host" in finished[("h1", "after-check")]["message"]
    assert ("h1", "after-check") not in started
    for step in ("write-marker", "check-host", "after-check"):
        assert finished[("dead", step)]["status"] == "unreachable"
        assert ("dead", step) not in started


def test_unreachable_and_finished_records(demo: DemoRun) -> None:
    recs = run_records(demo)
    unreachable = [r for r in recs if r["event"] == "host.unreachable"]
    assert [r["host"] for r in unreachable] == ["dead"]
    assert str(demo.dead_port) in unreachable[0]["reason"]
    last = recs[-1]
    assert last["event"] == "run.finished"
    assert last["totals"] == {"changed": 7, "failed": 1, "not_run": 1, "unreachable": 3}
    assert last["exit_code"] == 3
    assert last["records"] == len(recs) == last["seq"]
    assert last["unreachable"].keys() == {"dead"}
    assert last["wall_time"] >= 0


def test_verify_passes_on_the_clean_trail(demo: DemoRun) -> None:
    proc = cli("audit", "verify", "--audit-log", str(demo.trail))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(records(demo.trail))} records, chain intact" in proc.stdout
    # RUNBOOK_AUDIT_LOG names the file as well as the flag does.
    assert cli("audit", "verify", env={"RUNBOOK_AUDIT_LOG": str(demo.trail)}).returncode == 0


def _edit(lines: list[bytes]) -> tuple[list[bytes], int]:
    rec = json.loads(lines[4])
    rec["rc"] = 0 if rec.get("rc") else 99
    rec["status"] = "ok"
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return lines, 5


def _edit_rehashed(lines: list[bytes]) -> tuple[list[bytes], int]:
    # Even with its own hash recomputed, the edited record no longer matches the next record's `prev`.
    from runbook.audit import record_hash

    rec = json.loads(lines[4])
    rec["operator"] = "mallory"
    rec["hash"] = record_hash(rec)
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return lines, 6


def _delete_middle(lines: list[bytes]) -> tuple[list[bytes], int]:
    del lines[6]
    return lines, 7


def _swap(lines: list[bytes]) -> tuple[list[bytes], int]:
    lines[7], lines[8] = lines[8], lines[7]
    return lines, 8


def _truncate_mid_file(lines: list[bytes]) -> tuple[list[bytes], int]:
    # The file cut off in the middle of line 10: everything after it is gone.
    return lines[:9] + [lines[9][: len(lines[9]) // 2]], 10


def _line_cut_short(lines: list[bytes]) -> tuple[list[bytes], int]:
    # Line 10 loses its second half; the lines after it stay.
    lines[9] = lines[9][: len(lines[9]) // 2] + b"\n"
    return lines, 10


@pytest.mark.parametrize("tamper", [_edit, _edit_rehashed, _delete_middle, _swap, _truncate_mid_file, _line_cut_short],
                         ids=["edit", "edit-rehashed", "delete-middle", "swap", "truncate-mid-file", "line-cut-short"])
def test_verify_fails_after_tampering(demo: DemoRun, tmp_path: Path, tamper: Any) -> None:
    lines = demo.trail.read_bytes().splitlines(keepends=True)
    assert len(lines) > 12
    tampered, line = tamper(list(lines))
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(tampered))
    proc = cli("audit", "verify", "--audit-log", str(copy))
    assert proc.returncode != 0, proc.stdout
    assert f"{copy}:{line}:" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "chain intact" not in proc.stdout


def test_records_removed_from_the_end_show_an_incomplete_run(demo: DemoRun, tmp_path: Path) -> None:
    # What a chain cannot prove: a cut tail is a valid shorter chain; verify still names the unfinished run.
    lines = demo.trail.read_bytes().splitlines(keepends=True)
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(lines[:-1]))
    proc = cli("audit", "verify", "--audit-log", str(copy))
    assert proc.returncode == 0
    assert "incomplete runs" in proc.stdout and run_records(demo, 1)[0]["run_id"] in proc.stdout


def test_audit_show_by_host_run_and_format(demo: DemoRun) -> None:
    first_id = run_records(demo)[0]["run_id"]
    proc = cli("audit", "show", "--audit-log", str(demo.trail), "--host", "h1", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert {r["event"] for r in shown} == {"run.started", "task.started", "task.finished"}
    assert all(r.get("host") == "h1" or "h1" in r.get("hosts", []) for r in shown)
    assert len([r for r in shown if r["event"] == "task.finished"]) == 6    # 3 steps x 2 runs
    # A prefix of the id (both runs may start in the same second, so keep most of the random suffix).
    proc = cli("audit", "show", "--audit-log", str(demo.trail), "--host", "h1", "--run", first_id[:-2],
               "--format", "json")
    one_run = json.loads(proc.stdout)
    assert {r["run_id"] for r in one_run} == {first_id} and len(one_run) == len(shown) // 2
    proc = cli("audit", "show", "--audit-log", str(demo.trail), "--host", "h1", "--run", first_id)
    assert proc.returncode == 0
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["TIME", "(UTC)", "RUN", "OPERATOR"]
    rows = {(line.split()[5], line.split()[6]): line for line in table[1:] if "task.finished" in line}
    assert " alice " in rows[("task.finished", "check-host")]
    assert rows[("task.finished", "check-host")].rstrip().endswith("failed")
    assert rows[("task.finished", "after-check")].rstrip().endswith("not_run")
    assert len(table) == 1 + len(one_run)


# ---------------------------------------------------------------------------------------------
# Secrets never appear in clear
# ---------------------------------------------------------------------------------------------

SECRET_PLAYBOOK = """\
runbook: secret-demo
secrets: {api_token: env:RB_TEST_TOKEN}
steps:
  - name: use token
    shell: printf '%s' {{ api_token | quote }} > token.txt
  - name: echo secrets
    shell: echo "token={{ api_token }} db={{ db_password }} key={{ api_key }}"
    register: echoed
  - name: reuse register
    shell: echo "again {{ echoed.stdout }}"
  - name: failing with secret
    shell: echo "auth failed for {{ db_password }} with {{ api_token }}" >&2; exit 4
    ignore_errors: true
  - name: assert with secret
    assert:
      that: ["'nope' in echoed.stdout"]
      msg: "expected {{ api_key }} in {{ echoed.stdout }}"
"""

TOKEN = "tok-RB-7f3c9e1d-secret"
DB_PASSWORD = "dbpw-RB-5a1b2c3d4e-secret"
API_KEY = "ak-RB-0e9d8c7b6a-secret"


def test_no_secret_value_in_any_output(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]
    playbook = tmp_path / "secret.yml"
    playbook.write_text(SECRET_PLAYBOOK)
    inventory = write_inventory(tmp_path / "inventory.yml", hosts, extra={"db_password": DB_PASSWORD})
    known = write_known_hosts(tmp_path / "known_hosts", hosts)
    trail = tmp_path / "audit.jsonl"
    env = {"RB_TEST_TOKEN": TOKEN}
    common = [str(playbook), "-i", str(inventory), "--known-hosts", str(known), "--audit-log", str(trail),
              "-e", f"api_key={API_KEY}"]
    outputs: dict[str, str] = {}
    text_run = cli("run", *common, "-v", env=env)
    outputs["run stdout+stderr"] = text_run.stdout + text_run.stderr
    json_run = cli("run", *common, "--output", "json", env=env)
    outputs["run --output json"] = json_run.stdout + json_run.stderr
    plan_file = tmp_path / "plan.json"
    plan = cli("plan", *common, "--out", str(plan_file), env=env)
    outputs["plan"] = plan.stdout + plan.stderr
    outputs["plan file"] = plan_file.read_text()
    shown = cli("show", str(plan_file))
    outputs["show"] = shown.stdout + shown.stderr
    outputs["audit file"] = trail.read_text()
    table = cli("audit", "show", "--audit-log", str(trail))
    outputs["audit show"] = table.stdout + table.stderr
    state_files = sorted((tmp_path / "runs").glob("*.json"))
    assert len(state_files) == 2
    for f in state_files:
        outputs[f"state {f.name}"] = f.read_text()

    # The runs really used the secrets: they reached the hosts and the outputs are about them.
    for h in hosts:
        assert (h.home / "token.txt").read_text() == TOKEN
    assert text_run.returncode == 2, outputs["run stdout+stderr"]       # the assert step fails
    result = json.loads(json_run.stdout)
    by_step = {(r["host"], r["step_id"]): r for r in result["results"]}
    assert by_step[("h0", "echo-secrets")]["stdout"] == "token=*** db=*** key=***\n"
    assert by_step[("h0", "reuse-register")]["stdout"] == "again token=*** db=*** key=***\n\n"
    assert by_step[("h0", "failing-with-secret")]["stderr"] == "auth failed for *** with ***\n"
    assert by_step[("h0", "failing-with-secret")]["ignored"] is True
    assert by_step[("h0", "assert-with-secret")]["status"] == "failed"
    assert "expected ***" in by_step[("h0", "assert-with-secret")]["message"]
    assert "failing-with-secret" in outputs["plan file"] and "auth failed" in outputs["audit file"]
    for name, text in outputs.items():
        assert text, name
        for secret in (TOKEN, DB_PASSWORD, API_KEY):
            assert secret not in text, f"{secret!r} appears in {name}"


# ---------------------------------------------------------------------------------------------
# Concurrent runs share one trail
# ---------------------------------------------------------------------------------------------

CONCURRENT_PLAYBOOK = """\
runbook: concurrent-{n}
steps:
{steps}
"""


def test_two_concurrent_runs_append_to_one_trail_that_verifies(clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "inventory.yml", clean_ssh_hosts)
    known = write_known_hosts(tmp_path / "known_hosts", clean_ssh_hosts)
    trail = tmp_path / "audit.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_AUDIT_LOG", "RUNBOOK_OPERATOR")}
    env["PYTHONPATH"] = str(REPO)
    procs = []
    for n in (1, 2):
        steps = "".join(f"  - name: s{i}\n    shell: echo {n}-{i} >> run{n}.log; sleep 0.05\n" for i in range(6))
        playbook = tmp_path / f"p{n}.yml"
        playbook.write_text(CONCURRENT_PLAYBOOK.format(n=n, steps=steps))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "runbook", "run", str(playbook), "-i", str(inventory), "--known-hosts", str(known),
             "--audit-log", str(trail)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for h in clean_ssh_hosts:
        for n in (1, 2):
            assert (h.home / f"run{n}.log").read_text() == "".join(f"{n}-{i}\n" for i in range(6))
    recs = records(trail)
    run_ids = list(dict.fromkeys(r["run_id"] for r in recs))
    assert len(run_ids) == 2
    for run_id in run_ids:
        mine = [r for r in recs if r["run_id"] == run_id]
        assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
        assert mine[-1]["event"] == "run.finished" and mine[-1]["records"] == len(mine)
        assert len([r for r in mine if r["event"] == "task.finished"]) == 6 * len(clean_ssh_hosts)
    # The runs overlapped: the second run's first record comes before the first run's last one.
    positions = {run_id: [i for i, r in enumerate(recs) if r["run_id"] == run_id] for run_id in run_ids}
    first, second = sorted(positions.values())
    assert second[0] < first[-1], "the runs did not overlap; the test proves nothing"
    proc = cli("audit", "verify", "--audit-log", str(trail))
    assert proc.returncode == 0, proc.stdout
    assert f"{len(recs)} records, chain intact" in proc.stdout
