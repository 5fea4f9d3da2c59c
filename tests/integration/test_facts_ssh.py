"""Facts against real OpenSSH servers on 127.0.0.1 (no mocks): `runbook facts HOST` reports the machine as the
login user sees it (and whether that user may sudo), playbooks read them with `facts: true` or on first use, and a
dry run gathers them too while changing nothing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.facts import Facts
from runbook.results import Status
from tests.helpers import cli
from tests.sshd import SSHHost, free_port, root_sudo, write_inventory

pytestmark = pytest.mark.ssh

SUDOERS_PREFIX = "runbook-tests-factsroot-"


def inventory(tmp_path: Path, hosts: list[SSHHost]) -> Path:
    return write_inventory(tmp_path / "inventory.yml", hosts, host_vars={h.name: {"home": str(h.home)} for h in hosts})


def facts_of(host: SSHHost, inv: Path, known: Path) -> dict[str, Any]:
    proc = cli("facts", host.name, "-i", str(inv), "--known-hosts", str(known))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def per_host_users(host: SSHHost) -> bool:
    return host.user != pwd.getpwuid(os.geteuid()).pw_name


def test_runbook_facts_reports_the_machine_as_the_login_user_sees_it(tmp_path: Path, ssh_hosts: list[SSHHost],
                                                                   known_hosts: Path) -> None:
    host = ssh_hosts[0]
    doc = facts_of(host, inventory(tmp_path, ssh_hosts), known_hosts)
    assert set(doc) == set(Facts().as_dict())
    uname = os.uname()
    assert (doc["system"], doc["kernel"], doc["architecture"]) == (uname.sysname, uname.release, uname.machine)
    assert doc["hostname"] == socket.gethostname()
    assert doc["user"] == host.user and doc["uid"] == pwd.getpwnam(host.user).pw_uid
    assert doc["cpu_count"] == os.cpu_count()
    total = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
    assert doc["memory_total_bytes"] == total * 1024
    root = next(m for m in doc["mounts"] if m["mount"] == "/")
    vfs = os.statvfs("/")
    assert root["size_bytes"] == pytest.approx(vfs.f_blocks * vfs.f_frsize, rel=0.01)
    assert 0 <= root["used_percent"] <= 100
    release = dict(ln.split("=", 1) for ln in Path("/etc/os-release").read_text().splitlines() if "=" in ln)
    assert doc["distribution"] == release["ID"].strip('"')
    assert doc["distribution_version"] == (release.get("VERSION_ID", "").strip('"') or None)
    if shutil.which("apt-get"):
        assert (doc["os_family"], doc["package_manager"]) == ("debian", "apt")
    assert doc["init_system"] == ("systemd" if Path("/run/systemd/system").is_dir()
                                  else Path("/proc/1/comm").read_text().strip().lower())
    if doc["default_ipv4"] is not None:
        assert doc["default_ipv4"]["address"].count(".") == 3


def test_can_sudo_is_what_sudo_n_true_says_for_the_login_user(tmp_path: Path, ssh_hosts: list[SSHHost],
                                                             known_hosts: Path) -> None:
    host = ssh_hosts[0]
    if not per_host_users(host) or shutil.which("sudo") is None:
        pytest.skip("needs per-host test users (run as root) and sudo")
    inv = inventory(tmp_path, ssh_hosts)
    assert facts_of(host, inv, known_hosts)["can_sudo"] is False    # test users may sudo to each other, not to root
    with root_sudo([host.user], SUDOERS_PREFIX):
        assert facts_of(host, inv, known_hosts)["can_sudo"] is True
    assert facts_of(host, inv, known_hosts)["can_sudo"] is False


def test_runbook_facts_errors_and_exit_codes(tmp_path: Path, ssh_hosts: list[SSHHost], known_hosts: Path) -> None:
    inv = inventory(tmp_path, ssh_hosts)
    unknown = cli("facts", "h9", "-i", str(inv), "--known-hosts", str(known_hosts))
    assert unknown.returncode == 4 and "unknown host `h9`" in unknown.stderr and "Traceback" not in unknown.stderr
    doc = yaml.safe_load(inv.read_text())
    doc["all"]["hosts"]["gone"] = {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "nobody"}
    inv.write_text(yaml.safe_dump(doc))
    gone = cli("facts", "gone", "-i", str(inv), "--known-hosts", str(known_hosts), "--connect-timeout", "3")
    assert gone.returncode == 3 and "gone" in gone.stderr and "Traceback" not in gone.stderr and gone.stdout == ""
    strict = cli("facts", "h0", "-i", str(inv), "--known-hosts", str(tmp_path / "empty_known_hosts"))
    assert strict.returncode == 3 and "host key" in strict.stderr.lower()


def test_playbooks_read_facts_in_runs_and_dry_runs(tmp_path: Path, clean_ssh_hosts: list[SSHHost],
                                                  known_hosts: Path) -> None:
    hosts = clean_ssh_hosts
    inv = inventory(tmp_path, hosts)
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "t", "facts": True, "steps": [
        {"name": "about", "print": {"user": "{{ facts.user }}", "os": "{{ facts.os_family }}",
                                    "root_free": "{{ (facts.mounts | selectattr('mount', 'eq', '/') | first).available_bytes }}"}},
        {"name": "record", "when": "facts.kernel | length > 0",
         "shell": "echo {{ facts.memory_total_bytes }} {{ facts.user }} > {{ home }}/facts",
         "creates": "{{ home }}/facts"},
        {"name": "never", "when": "facts.cpu_count < 1", "shell": "touch {{ home }}/never"},
    ]}, sort_keys=False))
    common: dict[str, Any] = {"known_hosts": str(known_hosts), "audit_log": str(tmp_path / "audit.jsonl"),
                              "state_dir": str(tmp_path / "runs"), "connect_timeout": 5.0}
    plan = run(pb, str(inv), mode="plan", **common)
    assert plan.exit_code() == 0, plan.as_dict()
    assert not any((h.home / "facts").exists() for h in hosts)
    assert {str(plan.get(h.name, "record").prediction) for h in hosts} == {"change"}
    assert {str(plan.get(h.name, "never").prediction) for h in hosts} == {"skip"}
    result = run(pb, str(inv), **common)
    assert result.exit_code() == 0, result.as_dict()
    total = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
    for h in hosts:
        assert (h.home / "facts").read_text().split() == [str(total * 1024), h.user]
        about = result.get(h.name, "about")
        assert about.status == Status.OK and about.data["message"]["user"] == h.user
        assert int(about.data["message"]["root_free"]) > 0
        assert result.get(h.name, "never").status == Status.SKIPPED and not (h.home / "never").exists()
