"""The execution engine against real OpenSSH servers on 127.0.0.1 (no mocks).

Every test writes a playbook, runs it over the test hosts (through `runbook.run` or the CLI) and
checks real effects: files the steps wrote in each host's home (timestamps for ordering and
overlap), task statuses, JSON output and exit codes. Ordering is always judged from timestamps
the steps wrote themselves, never from the wall time the test took.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

from runbook import run
from runbook.connections.ssh import fingerprint
from runbook.results import RunResult, Status
from tests.sshd import SSHHost, free_port, write_inventory

pytestmark = pytest.mark.ssh

REPO = Path(__file__).resolve().parents[2]


# --- helpers ------------------------------------------------------------------------------------------


def playbook(path: Path, steps: list[dict[str, Any]], **top: Any) -> Path:
    """Write a playbook with these steps (and top-level keys) and return its path."""
    doc = {"runbook": "t", **top, "steps": steps}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def inventory(path: Path, hosts: list[SSHHost], host_vars: dict[str, dict] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """An inventory of the test hosts where every host also has `home` (its home directory)."""
    hv = {h.name: {"home": str(h.home), **(host_vars or {}).get(h.name, {})} for h in hosts}
    return write_inventory(path, hosts, host_vars=hv, extra=extra)


def go(pb: Path, inv: Path, known: Path, **kw: Any) -> RunResult:
    """Run through the library with the audit trail and run state in the test's tmp dir."""
    kw.setdefault("audit_log", str(pb.parent / "audit.jsonl"))
    kw.setdefault("state_dir", str(pb.parent / "runs"))
    kw.setdefault("connect_timeout", 5.0)
    return run(pb, str(inv), known_hosts=str(known), **kw)


def cli(args: list[str], tmp: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run `python -m runbook ARGS` as a subprocess (stdin not a terminal)."""
    env = {**os.environ, "RUNBOOK_AUDIT_LOG": str(tmp / "audit.jsonl"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "runbook", *args], capture_output=True, text=True, cwd=tmp,
                          env=env, stdin=subprocess.DEVNULL, timeout=kw.pop("timeout", 60), check=False, **kw)


def ts(host: SSHHost, name: str) -> float:
    """A `date +%s.%N` timestamp a step wrote into the host's home."""
    return float((host.home / name).read_text().strip())


def statuses(result: RunResult) -> dict[tuple[str, str], str]:
    """(host, step id) -> status value."""
    return {(r.host, r.step_id): r.status.value for r in result.results}


def stamp(name: str) -> str:
    """Shell that writes the current time (sub-second) into $home/name."""
    return f"date +%s.%N > {{{{ home }}}}/{name}"


@pytest.fixture
def hosts(clean_ssh_hosts: list[SSHHost]) -> list[SSHHost]:
    """The test hosts, homes emptied."""
    return clean_ssh_hosts


@pytest.fixture
def inv(tmp_path: Path, hosts: list[SSHHost]) -> Path:
    """Inventory of every test host, with `home` and a per-host `color`."""
    colors = ["red", "green", "blue", "cyan", "pink"]
    return inventory(tmp_path / "inventory.yml", hosts,
                     {h.name: {"color": colors[i % len(colors)]} for i, h in enumerate(hosts)})


# --- ordering and parallelism -------------------------------------------------------------------------


def test_dependency_order_per_host_parallel_across_hosts_and_branches(tmp_path: Path, hosts: list[SSHHost],
                                                                     known_hosts: Path) -> None:
    # h0's first step is slow; the others must not wait for it (no lock-step across hosts).
    inv = inventory(tmp_path / "inv.yml", hosts, {h.name: {"pause": 1.5 if i == 0 else 0.5} for i, h in enumerate(hosts)})
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "a", "shell": f"{stamp('a.start')}; sleep {{{{ pause }}}}; {stamp('a.end')}"},
        {"name": "b", "shell": f"{stamp('b.start')}; sleep 0.5; {stamp('b.end')}"},
        {"name": "c", "needs": ["a"], "shell": f"{stamp('c.start')}; sleep 0.5; {stamp('c.end')}"},
        {"name": "d", "needs": ["b", "c"], "shell": stamp("d.start")},
    ])
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0, result.as_dict()
    assert set(statuses(result).values()) == {"changed"} and len(result.results) == 4 * len(hosts)
    for h in hosts:
        # Dependency order on each host.
        assert ts(h, "a.end") <= ts(h, "b.start") and ts(h, "a.end") <= ts(h, "c.start")
        assert ts(h, "d.start") >= max(ts(h, "b.end"), ts(h, "c.end"))
        # b and c are independent branches: they ran at the same time over the one connection.
        assert ts(h, "b.start") < ts(h, "c.end") and ts(h, "c.start") < ts(h, "b.end")
    # Parallel across hosts: every host's `a` started before any host's `a` ended.
    assert max(ts(h, "a.start") for h in hosts) < min(ts(h, "a.end") for h in hosts)
    # No lock-step: the fast hosts finished their whole graph while h0 was still in its first step.
    for h in hosts[1:]:
        assert ts(h, "d.start") < ts(hosts[0], "a.end")


def test_registers_and_when_flow_between_steps(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                               known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        # Each host registers its own value: h0 -> 10, h1 -> 11, ...
        {"name": "measure", "shell": "echo 1{{ inventory_hostname[1:] }}; echo warn >&2", "register": "m"},
        {"name": "big", "when": "m.stdout | int > 10",
         "shell": "echo '{{ m.stdout | trim }} {{ m.rc }} {{ m.stderr | trim }}' > {{ home }}/big"},
        {"name": "small", "needs": ["measure"], "when": "m.stdout | int <= 10", "shell": "touch {{ home }}/small",
         "register": "s"},
        {"name": "after", "needs": ["big", "small"], "shell": "echo {{ s.skipped }} > {{ home }}/after"},
    ])
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0
    st = statuses(result)
    h0, rest = hosts[0], hosts[1:]
    assert st[(h0.name, "big")] == "skipped" and st[(h0.name, "small")] == "changed"
    assert "when" in result.get(h0.name, "big").message
    assert (h0.home / "small").exists() and not (h0.home / "big").exists()
    assert (h0.home / "after").read_text() == "False\n"
    for i, h in enumerate(rest, start=1):
        assert st[(h.name, "big")] == "changed" and st[(h.name, "small")] == "skipped"
        assert (h.home / "big").read_text() == f"1{i} 0 warn\n"
        assert (h.home / "after").read_text() == "True\n"


# --- idempotent file actions ------------------------------------------------------------------------


def test_upload_and_template_change_only_when_content_or_mode_differs(tmp_path: Path, hosts: list[SSHHost],
                                                                      inv: Path, known_hosts: Path) -> None:
    (tmp_path / "motd").write_bytes(b"hello\x00binary\n")
    (tmp_path / "app.conf.j2").write_text("host={{ inventory_hostname }}\ncolor={{ color }}\n")
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "up", "upload": {"src": "motd", "dest": "{{ home }}/motd", "mode": "0640"}},
        {"name": "tpl", "needs": [], "template": {"src": "app.conf.j2", "dest": "{{ home }}/app.conf"}},
    ])
    first = go(pb, inv, known_hosts)
    assert first.exit_code() == 0
    assert set(statuses(first).values()) == {"changed"}
    for h in hosts:
        assert (h.home / "motd").read_bytes() == b"hello\x00binary\n"
        assert (h.home / "motd").stat().st_mode & 0o777 == 0o640
        color = yaml.safe_load(inv.read_text())["all"]["hosts"][h.name]["color"]
        assert (h.home / "app.conf").read_text() == f"host={h.name}\ncolor={color}\n"
    assert "+color=" in (first.get(hosts[0].name, "tpl").diff or "")

    second = go(pb, inv, known_hosts)
    assert set(statuses(second).values()) == {"ok"}, statuses(second)
    assert all(not r.changed for r in second.results)

    # Only the mode of one host's file changed: only that upload changes, and says why.
    (hosts[1].home / "motd").chmod(0o666)
    (hosts[2].home / "app.conf").write_text("edited by hand\n")
    third = go(pb, inv, known_hosts)
    st = statuses(third)
    assert st[(hosts[1].name, "up")] == "changed" and "mode 0666 -> 0640" in third.get(hosts[1].name, "up").message
    assert st[(hosts[2].name, "tpl")] == "changed" and "content differs" in third.get(hosts[2].name, "tpl").message
    assert "-edited by hand" in (third.get(hosts[2].name, "tpl").diff or "")
    assert sorted(k for k, v in st.items() if v == "changed") == sorted([(hosts[1].name, "up"), (hosts[2].name, "tpl")])
    assert (hosts[1].home / "motd").stat().st_mode & 0o777 == 0o640
    assert (hosts[2].home / "app.conf").read_text().startswith(f"host={hosts[2].name}\n")


def test_fetch_into_dest_per_host(tmp_path: Path, hosts: list[SSHHost], inv: Path, known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "make", "shell": "printf 'report of %s\\n' {{ inventory_hostname }} > {{ home }}/report.txt",
         "changed_when": False},
        {"name": "get", "fetch": {"src": "{{ home }}/report.txt", "dest": str(tmp_path / "out")}},
    ])
    first = go(pb, inv, known_hosts)
    assert first.exit_code() == 0
    for h in hosts:
        assert (tmp_path / "out" / h.name / "report.txt").read_text() == f"report of {h.name}\n"
        assert first.get(h.name, "get").status == Status.CHANGED
    again = go(pb, inv, known_hosts)
    assert {again.get(h.name, "get").status for h in hosts} == {Status.OK}


# --- retries, timeouts, failure rules ---------------------------------------------------------------


def test_retries_and_until_succeed_on_the_third_attempt(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                        known_hosts: Path) -> None:
    bump = "n=$(cat {{ home }}/%s 2>/dev/null || echo 0); n=$((n+1)); echo $n > {{ home }}/%s; "
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "by-rc", "shell": bump % ("c1", "c1") + "test $n -ge 3", "retries": 5, "delay": "50ms"},
        {"name": "by-until", "needs": [], "shell": bump % ("c2", "c2") + "echo $n", "register": "r",
         "until": "r.stdout | int >= 3", "retries": 5, "delay": "50ms"},
        {"name": "never", "needs": [], "shell": bump % ("c3", "c3") + "false", "retries": 2, "delay": 0},
    ])
    result = go(pb, inv, known_hosts)
    for h in hosts:
        rc, until, never = (result.get(h.name, s) for s in ("by-rc", "by-until", "never"))
        assert rc.status == Status.CHANGED and rc.attempts == 3
        assert (h.home / "c1").read_text() == "3\n"
        assert until.status == Status.CHANGED and until.attempts == 3 and until.stdout == "3\n"
        assert (h.home / "c2").read_text() == "3\n"
        assert never.status == Status.FAILED and never.attempts == 3
        assert (h.home / "c3").read_text() == "3\n"
    assert result.exit_code() == 2


def test_command_timeout_fails_the_step_and_kills_the_command(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                              known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "slow", "shell": "sleep 7.25; touch {{ home }}/late", "timeout": "0.5s"},
        {"name": "after", "shell": "touch {{ home }}/after"},
    ], hosts=hosts[0].name)
    result = go(pb, inv, known_hosts)
    slow = result.get(hosts[0].name, "slow")
    assert slow.status == Status.FAILED
    assert "timed out after 0.5s" in slow.message and slow.rc == 124
    assert result.get(hosts[0].name, "after").status == Status.NOT_RUN
    assert not (hosts[0].home / "after").exists()
    # The remote command was killed on the host, not just abandoned.
    for _ in range(40):
        ps = subprocess.run(["pgrep", "-u", hosts[0].user, "-f", "sleep 7.25"], capture_output=True, text=True, check=False)
        if ps.returncode != 0:
            break
        time.sleep(0.05)
    assert ps.returncode != 0, f"sleep still running on the host: {ps.stdout}"
    assert result.exit_code() == 2


def test_ignore_errors_and_on_failure_for_the_failed_host_only(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                               known_hosts: Path) -> None:
    bad = hosts[1].name
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "flaky", "shell": "exit 3", "ignore_errors": True},
        {"name": "after-flaky", "shell": "touch {{ home }}/after-flaky"},
        {"name": "breaks", "shell": f"test {{{{ inventory_hostname }}}} != {bad}"},
        {"name": "end", "shell": "touch {{ home }}/end"},
    ], on_failure=[
        {"name": "rollback", "shell": "echo rolled back {{ inventory_hostname }} > {{ home }}/rollback"},
    ])
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 2, [(r.host, r.step_id, r.status.value, r.ignored, r.message) for r in result.results]
    for h in hosts:
        flaky = result.get(h.name, "flaky")
        assert flaky.status == Status.FAILED and flaky.ignored and flaky.rc == 3
        assert (h.home / "after-flaky").exists()          # the host went on past the ignored failure
        if h.name == bad:
            assert result.get(h.name, "breaks").status == Status.FAILED
            assert result.get(h.name, "end").status == Status.NOT_RUN
            assert "upstream step `breaks` failed" in result.get(h.name, "end").message
            assert not (h.home / "end").exists()
            assert (h.home / "rollback").read_text() == f"rolled back {bad}\n"
            assert result.get(h.name, "rollback").status == Status.CHANGED
        else:
            assert (h.home / "end").exists()
            assert not (h.home / "rollback").exists()
            assert result.get(h.name, "rollback") is None or result.get(h.name, "rollback").status != Status.CHANGED


def test_batches_run_one_after_another(tmp_path: Path, hosts: list[SSHHost], inv: Path, known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "work", "shell": f"{stamp('start')}; sleep 0.2"},
        {"name": "done", "shell": stamp("end")},
    ], batch=1)
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0
    for before, after in itertools.pairwise(hosts):
        assert ts(after, "start") >= ts(before, "end"), (before.name, after.name)


def test_max_failures_stops_later_batches(tmp_path: Path, hosts: list[SSHHost], inv: Path, known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "mark", "shell": "touch {{ home }}/started"},
        {"name": "check", "shell": f"test {{{{ inventory_hostname }}}} != {hosts[0].name}"},
    ], batch=1, max_failures=0)
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 2
    assert (hosts[0].home / "started").exists()
    assert result.get(hosts[0].name, "check").status == Status.FAILED
    assert result.stop_reason and "max_failures exceeded" in result.stop_reason
    for h in hosts[1:]:
        assert not (h.home / "started").exists()
        for sid in ("mark", "check"):
            r = result.get(h.name, sid)
            assert r is not None and r.status == Status.NOT_RUN
            assert "max_failures exceeded" in r.message


# --- unreachable hosts and host keys -----------------------------------------------------------------


def _dead_host_inventory(tmp_path: Path, hosts: list[SSHHost]) -> tuple[Path, int]:
    port = free_port()   # nothing listens there: connection refused
    doc = yaml.safe_load(inventory(tmp_path / "inv.yml", hosts[:2]).read_text())
    doc["all"]["hosts"]["dead"] = {**hosts[0].inventory_vars(), "ansible_port": port, "home": "/nonexistent"}
    (tmp_path / "inv.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "inv.yml", port


def test_unreachable_host_beside_healthy_ones_exits_3(tmp_path: Path, hosts: list[SSHHost], known_hosts: Path) -> None:
    inv, port = _dead_host_inventory(tmp_path, hosts)
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "one", "shell": "touch {{ home }}/one"},
        {"name": "two", "shell": "touch {{ home }}/two"},
    ])
    proc = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json",
                "--connect-timeout", "5"], tmp_path)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert "connection refused" in doc["unreachable"]["dead"] and str(port) in doc["unreachable"]["dead"]
    by = {(r["host"], r["step_id"]): r for r in doc["results"]}
    assert by[("dead", "one")]["status"] == by[("dead", "two")]["status"] == "unreachable"
    for h in hosts[:2]:
        assert by[(h.name, "one")]["status"] == by[(h.name, "two")]["status"] == "changed"
        assert (h.home / "two").exists()
    assert "dead" in proc.stderr and "unreachable" in proc.stderr


def test_unknown_host_key_is_rejected_by_default(tmp_path: Path, hosts: list[SSHHost], inv: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    pb = playbook(tmp_path / "pb.yml", [{"name": "one", "shell": "touch {{ home }}/one"}])
    proc = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(empty), "--output", "json"], tmp_path)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    for h in hosts:
        reason = doc["unreachable"][h.name]
        key = paramiko.Ed25519Key(filename=str(h.host_key_file))
        assert "unknown host key" in reason and fingerprint(key) in reason
        assert not (h.home / "one").exists()
    assert empty.read_text() == ""   # strict never records anything


def test_accept_new_records_the_key_then_trusts_it(tmp_path: Path, hosts: list[SSHHost], inv: Path) -> None:
    known = tmp_path / "kh" / "known_hosts"
    pb = playbook(tmp_path / "pb.yml", [{"name": "one", "shell": "touch {{ home }}/one"}])
    proc = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(known), "--host-key-checking", "accept-new"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    recorded = sorted(known.read_text().splitlines())
    assert recorded == sorted(h.host_public_key for h in hosts)
    assert all((h.home / "one").exists() for h in hosts)
    # Recorded keys are now trusted in strict mode too.
    again = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(known)], tmp_path)
    assert again.returncode == 0, again.stderr


def test_changed_host_key_is_refused_naming_both_fingerprints(tmp_path: Path, hosts: list[SSHHost], inv: Path) -> None:
    victim, other = hosts[0], hosts[1]
    # The victim's name with the other host's key: what a reinstalled host or an impostor looks like.
    wrong = other.host_public_key.replace(other.known_hosts_name, victim.known_hosts_name)
    known = tmp_path / "known_hosts"
    known.write_text(wrong + "\n" + "".join(h.host_public_key + "\n" for h in hosts[1:]))
    pb = playbook(tmp_path / "pb.yml", [{"name": "one", "shell": "touch {{ home }}/one"}])
    for mode in ("strict", "accept-new"):
        res = go(pb, inv, known, host_key_checking=mode)
        assert res.exit_code() == 3
        reason = res.unreachable[victim.name]
        offered = fingerprint(paramiko.Ed25519Key(filename=str(victim.host_key_file)))
        expected = fingerprint(paramiko.Ed25519Key(filename=str(other.host_key_file)))
        assert "CHANGED" in reason and offered in reason and expected in reason, reason
        assert set(res.unreachable) == {victim.name}
        assert not (victim.home / "one").exists()
        assert all((h.home / "one").exists() for h in hosts[1:])
        for h in hosts[1:]:
            (h.home / "one").unlink()
    assert known.read_text().startswith(wrong)   # accept-new never overwrites a known key


# --- sudo, once, controller -------------------------------------------------------------------------


def test_sudo_to_another_test_user(tmp_path: Path, hosts: list[SSHHost], inv: Path, known_hosts: Path) -> None:
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed")
    if os.geteuid() != 0:
        pytest.skip("per-host test users (and the sudoers drop-in between them) need the tests to run as root")
    target = hosts[1].user
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "who", "shell": "whoami", "sudo": target, "register": "w"},
        {"name": "plain", "shell": "whoami", "register": "p"},
        {"name": "keep", "shell": "echo '{{ w.stdout | trim }} {{ p.stdout | trim }}' > {{ home }}/who"},
    ], hosts=hosts[0].name)
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0, result.as_dict()
    assert result.get(hosts[0].name, "who").stdout == f"{target}\n"
    assert (hosts[0].home / "who").read_text() == f"{target} {hosts[0].user}\n"


def test_once_runs_once_and_controller_steps_run_locally_per_host(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                                  known_hosts: Path) -> None:
    local = tmp_path / "controller.log"
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "once", "shell": "touch {{ home }}/once; echo shared-{{ inventory_hostname }}", "once": True,
         "register": "o"},
        {"name": "ctl", "on": "controller",
         "shell": f"echo {{{{ inventory_hostname }}}} {{{{ color }}}} $(id -un) >> {local}"},
        {"name": "use", "shell": "echo {{ o.stdout | trim }} > {{ home }}/use"},
    ])
    result = go(pb, inv, known_hosts)
    assert result.exit_code() == 0, result.as_dict()
    assert sum((h.home / "once").exists() for h in hosts) == 1
    ran = [r for r in result.results if r.step_id == "once" and r.status == Status.CHANGED]
    assert len(ran) == 1
    shared = ran[0].stdout.strip()
    assert all((h.home / "use").read_text().strip() == shared for h in hosts)
    colors = yaml.safe_load(inv.read_text())["all"]["hosts"]
    me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=False).stdout.strip()
    assert sorted(local.read_text().splitlines()) == sorted(f"{h.name} {colors[h.name]['color']} {me}" for h in hosts)


# --- selection and variables ------------------------------------------------------------------------


def test_tags_and_skip_tags(tmp_path: Path, hosts: list[SSHHost], inv: Path, known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "a", "shell": "touch {{ home }}/a", "tags": ["x"]},
        {"name": "b", "shell": "touch {{ home }}/b", "tags": ["y"]},
        {"name": "c", "shell": "touch {{ home }}/c", "tags": ["x", "y"]},
        {"name": "d", "shell": "touch {{ home }}/d", "tags": ["always"]},
    ], hosts=hosts[0].name)
    home = hosts[0].home
    only_x = go(pb, inv, known_hosts, tags=frozenset({"x"}))
    assert sorted(p.name for p in home.iterdir()) == ["a", "c", "d"]
    assert only_x.get(hosts[0].name, "b").status == Status.SKIPPED
    assert only_x.get(hosts[0].name, "b").message == "tag filter"
    hosts[0].clear_home()
    go(pb, inv, known_hosts, skip_tags=frozenset({"x"}))
    assert sorted(p.name for p in home.iterdir()) == ["b", "d"]


def test_extra_vars_take_precedence(tmp_path: Path, hosts: list[SSHHost], known_hosts: Path) -> None:
    inv = inventory(tmp_path / "inv.yml", hosts, {hosts[0].name: {"level": "inventory"}})
    pb = playbook(tmp_path / "pb.yml", [{"name": "w", "shell": "echo {{ level }} > {{ home }}/level"}],
                  vars={"level": "playbook"})
    go(pb, inv, known_hosts)
    assert (hosts[0].home / "level").read_text() == "inventory\n"
    assert (hosts[1].home / "level").read_text() == "playbook\n"
    extra = tmp_path / "extra.yml"
    extra.write_text("level: from-file\n")
    proc = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "-e", f"@{extra}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {(h.home / "level").read_text() for h in hosts} == {"from-file\n"}
    proc = cli(["run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "-e", f"@{extra}",
                "-e", "level=cli"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {(h.home / "level").read_text() for h in hosts} == {"cli\n"}


# --- CLI: JSON, exit codes, approve, interrupts -------------------------------------------------------


def test_json_output_has_every_task_and_exit_codes(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                  known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "one", "shell": "echo hi-{{ inventory_hostname }}"},
        {"name": "two", "shell": "true", "when": "inventory_hostname != 'h0'"},
        {"name": "three", "needs": [], "shell": "{{ fail_cmd | default('true') }}"},
    ])
    base = ["run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json"]
    proc = cli(base, tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == 0 and doc["hosts"] == [h.name for h in hosts]
    by = {(r["host"], r["step_id"]): r for r in doc["results"]}
    assert set(by) == {(h.name, s) for h in hosts for s in ("one", "two", "three")}
    assert all(r["status"] in {"changed", "skipped"} for r in by.values())
    assert by[(hosts[1].name, "one")]["stdout"] == f"hi-{hosts[1].name}\n"
    assert by[("h0", "two")]["status"] == "skipped"
    assert {h: sum(c.values()) for h, c in doc["recap"].items()} == {h.name: 3 for h in hosts}

    failed = cli([*base, "-e", "fail_cmd=false"], tmp_path)
    assert failed.returncode == 2, failed.stderr
    assert {r["status"] for r in json.loads(failed.stdout)["results"] if r["step_id"] == "three"} == {"failed"}

    (tmp_path / "bad.yml").write_text("runbook: bad\nsteps:\n  - name: x\n    shell: true\n    bogus: 1\n")
    invalid = cli(["run", str(tmp_path / "bad.yml"), "-i", str(inv), "--known-hosts", str(known_hosts)], tmp_path)
    assert invalid.returncode == 4
    assert "bogus" in invalid.stderr
    assert not any((h.home / "x").exists() for h in hosts)


def test_approve_needs_yes_when_not_interactive(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                known_hosts: Path) -> None:
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "gate", "approve": "Restart {{ inventory_hostname }}?"},
        {"name": "act", "shell": "touch {{ home }}/acted"},
    ], hosts=hosts[0].name)
    base = ["run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json"]
    refused = cli(base, tmp_path)
    assert refused.returncode == 2, refused.stderr
    by = {r["step_id"]: r for r in json.loads(refused.stdout)["results"]}
    assert by["gate"]["status"] == "failed" and "not interactive" in by["gate"]["message"]
    assert "--yes" in by["gate"]["message"]
    assert by["act"]["status"] == "not_run" and not (hosts[0].home / "acted").exists()
    granted = cli([*base, "--yes"], tmp_path)
    assert granted.returncode == 0, granted.stderr
    by = {r["step_id"]: r for r in json.loads(granted.stdout)["results"]}
    assert by["gate"]["status"] == "ok" and "--yes" in by["gate"]["message"]
    assert (hosts[0].home / "acted").exists()


def _start_interruptible(tmp_path: Path, inv: Path, known_hosts: Path, sleep: float,
                         step_timeout: str | None = None) -> tuple[subprocess.Popen[str], Path]:
    nap: dict[str, Any] = {"name": "nap", "shell": f"{stamp('nap.start')}; sleep {sleep}; touch {{{{ home }}}}/nap.done"}
    if step_timeout:
        nap["timeout"] = step_timeout   # the command then runs under coreutils timeout on the host
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "first", "shell": "touch {{ home }}/first"},
        nap,
        {"name": "last", "shell": "touch {{ home }}/last"},
    ])
    env = {**os.environ, "RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", str(pb), "-i", str(inv), "--known-hosts",
                             str(known_hosts), "--output", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, cwd=tmp_path, env=env)
    return proc, pb


def _wait_for_files(paths: list[Path], proc: subprocess.Popen[str], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"never appeared: {[p for p in paths if not p.exists()]}"
        time.sleep(0.02)


def test_sigint_lets_running_tasks_finish_then_exits_130(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                         known_hosts: Path) -> None:
    proc, _ = _start_interruptible(tmp_path, inv, known_hosts, sleep=1.5)
    try:
        _wait_for_files([h.home / "nap.start" for h in hosts], proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["exit_code"] == 130
    by = {(r["host"], r["step_id"]): r for r in doc["results"]}
    for h in hosts:
        assert by[(h.name, "first")]["status"] == "changed"
        assert by[(h.name, "nap")]["status"] == "changed"      # the running task was allowed to finish
        assert (h.home / "nap.done").exists()
        assert by[(h.name, "last")]["status"] == "not_run"
        assert not (h.home / "last").exists()
    # The summary was printed: the recap, why the run stopped, and the exit code.
    assert "stopped: interrupted" in err and "exit code 130" in err
    assert all(h.name in err.split("stopped:")[0].rsplit("interrupted", 1)[-1] for h in hosts)


@pytest.mark.parametrize("step_timeout", [None, "60s"])
def test_second_sigint_aborts_running_tasks(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                            known_hosts: Path, step_timeout: str | None) -> None:
    proc, _ = _start_interruptible(tmp_path, inv, known_hosts, sleep=5, step_timeout=step_timeout)
    try:
        _wait_for_files([h.home / "nap.start" for h in hosts], proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)   # let the first interrupt be handled before the second arrives
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    doc = json.loads(out)
    by = {(r["host"], r["step_id"]): r for r in doc["results"]}
    for h in hosts:
        assert by[(h.name, "nap")]["status"] == "failed"
        assert "aborted" in by[(h.name, "nap")]["message"]
        assert by[(h.name, "last")]["status"] == "not_run"
    # The aborted commands were stopped on the hosts too, not left running behind a closed channel.
    for h in hosts:
        ps = subprocess.run(["pgrep", "-u", h.user, "-x", "sleep"], capture_output=True, text=True, check=False)
        for _ in range(40):
            if ps.returncode != 0:
                break
            time.sleep(0.05)
            ps = subprocess.run(["pgrep", "-u", h.user, "-x", "sleep"], capture_output=True, text=True, check=False)
        assert ps.returncode != 0, f"{h.name}: sleep still running after the abort: {ps.stdout}"
        assert not (h.home / "nap.done").exists()


def test_upload_and_template_with_sudo_to_another_user(tmp_path: Path, hosts: list[SSHHost], inv: Path,
                                                       known_hosts: Path) -> None:
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed")
    if os.geteuid() != 0:
        pytest.skip("per-host test users (and the sudoers drop-in between them) need the tests to run as root")
    login, target = hosts[0], hosts[1]
    (tmp_path / "conf").write_text("owned by the target\n")
    (tmp_path / "t.j2").write_text("rendered for {{ inventory_hostname }}\n")
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "up", "upload": {"src": "conf", "dest": f"{target.home}/conf", "mode": "0600"}, "sudo": target.user},
        {"name": "tpl", "template": {"src": "t.j2", "dest": f"{target.home}/t.txt"}, "sudo": target.user},
    ], hosts=login.name)
    first = go(pb, inv, known_hosts)
    assert first.exit_code() == 0, [(r.step_id, r.status.value, r.message) for r in first.results]
    conf = target.home / "conf"
    assert conf.read_text() == "owned by the target\n" and conf.stat().st_mode & 0o777 == 0o600
    assert conf.owner() == target.user and (target.home / "t.txt").owner() == target.user
    assert (target.home / "t.txt").read_text() == f"rendered for {login.name}\n"
    # No temporary copies left behind in /tmp by the login user.
    leftovers = subprocess.run(["find", "/tmp", "-maxdepth", "1", "-name", ".runbook-*", "-user", login.user],
                               capture_output=True, text=True, check=False).stdout
    assert leftovers == ""
    second = go(pb, inv, known_hosts)
    assert {r.status for r in second.results} == {Status.OK}, [(r.step_id, r.status.value, r.message) for r in second.results]


def test_sudo_upload_of_a_large_private_file_is_idempotent_and_predicted(tmp_path: Path, hosts: list[SSHHost],
                                                                         inv: Path, known_hosts: Path) -> None:
    """A file only the sudo user can read, larger than a command's bounded output: compared by its sha256."""
    if shutil.which("sudo") is None or os.geteuid() != 0:
        pytest.skip("per-host test users (and the sudoers drop-in between them) need the tests to run as root")
    login, target = hosts[0], hosts[1]
    (tmp_path / "big").write_bytes(os.urandom(300 * 1024))          # base64 of it exceeds 64 KiB head + tail
    pb = playbook(tmp_path / "pb.yml", [
        {"name": "up", "upload": {"src": "big", "dest": f"{target.home}/big", "mode": "0600"}, "sudo": target.user},
    ], hosts=login.name)
    assert go(pb, inv, known_hosts).exit_code() == 0
    assert (target.home / "big").read_bytes() == (tmp_path / "big").read_bytes()
    second = go(pb, inv, known_hosts)
    assert second.get(login.name, "up").status == Status.OK, second.get(login.name, "up").message
    planned = go(pb, inv, known_hosts, mode="plan")
    assert planned.get(login.name, "up").prediction == "ok"
