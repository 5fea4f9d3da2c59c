"""The accuracy scenario: every resource action on three hosts in mixed states, plan ↔ apply, then plan again.

h0 has nothing yet, h1 already has everything as the playbook wants it, h2 has most of it but
different (another mode, value, shell, cron time; a package and a service in the other state).
`plan` must predict every task exactly (never `unknown`), `apply` must do what it predicted, and a
second `plan` must find nothing left to change. All test hosts are sshd instances on this one
machine, so accounts, packages, init scripts and crontabs are machine-wide: every such name carries
the host's name and a random suffix of the run, and everything is removed afterwards. The hosts'
users may sudo to root only while this module runs (a sudoers drop-in of its own).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import cli
from tests.aptrepo import AptRepo
from tests.integration.test_resource_system_ssh import service_pid
from tests.sshd import SSHHost, root_sudo, write_inventory

pytestmark = pytest.mark.ssh

SUDOERS = Path("/etc/sudoers.d")
PREFIX = "runbook-tests-accroot-"
EXPECTED = {"change": "changed", "ok": "ok", "skip": "skipped"}

# --- the playbook: files as the login user, system resources as root ------------------------------------

ENV = "# managed by runbook\nLISTEN=127.0.0.1:8080\n# BEGIN MANAGED BY RUNBOOK\nMAX=10\nMIN=1\n# END MANAGED BY RUNBOOK\n"
SYSCTL = "net.ipv4.tcp_keepalive_time = 600\nnet.ipv4.tcp_keepalive_probes = 5\n"
NAME = "{{ inventory_hostname }}-{{ sfx }}"
APT = {"APT_CONFIG": "{{ apt_config }}"}


def _root(step: dict[str, Any]) -> dict[str, Any]:
    return {**step, "sudo": True}


STEPS: list[dict[str, Any]] = [
    {"id": "dir", "file": {"path": "~/acc/conf.d", "state": "directory", "mode": "0750"}},
    {"id": "conf", "copy": {"dest": "~/acc/conf.d/app.conf", "content": "name = {{ inventory_hostname }}\nworkers = 4\n",
                            "mode": "0640"}},
    {"id": "token", "copy": {"dest": "~/acc/conf.d/token", "content": "t0ken\n", "mode": "0600"}},
    {"id": "seed", "copy": {"dest": "~/acc/seed.conf", "content": "seed\n", "force": False}},
    {"id": "listen", "line": {"path": "~/acc/conf.d/env", "regexp": "^LISTEN=", "line": "LISTEN=127.0.0.1:8080",
                              "create": True}},
    {"id": "header", "line": {"path": "~/acc/conf.d/env", "line": "# managed by runbook", "insertbefore": "BOF"}},
    {"id": "nodebug", "line": {"path": "~/acc/conf.d/env", "regexp": "^DEBUG=", "state": "absent"}},
    {"id": "limits", "block": {"path": "~/acc/conf.d/env", "block": "MAX=10\nMIN=1"}},
    {"id": "legacy", "block": {"path": "~/acc/conf.d/env", "marker": "# {mark} legacy", "state": "absent"}},
    {"id": "motd", "block": {"path": "~/acc/motd", "block": "Welcome to {{ inventory_hostname }}", "create": True,
                             "marker": "# {mark} motd"}},
    {"id": "motd-mode", "file": {"path": "~/acc/motd", "mode": "0600"}},
    {"id": "current", "file": {"path": "~/acc/current", "state": "link", "src": "conf.d/app.conf"}},
    {"id": "stamp", "file": {"path": "~/acc/stamp", "state": "touch", "mode": "0600"}},
    {"id": "cache", "file": {"path": "~/acc/cache", "state": "absent"}},
    {"id": "logs", "file": {"path": "~/acc/logs", "state": "directory", "mode": "0700"}},
    {"id": "keepalive", "sysctl": {"name": "net.ipv4.tcp_keepalive_time", "value": 600,
                                   "persist": "~/acc/sysctl.d/60-acc.conf", "reload": False}},
    {"id": "intvl", "sysctl": {"name": "net.ipv4.tcp_keepalive_intvl", "state": "absent",
                               "persist": "~/acc/sysctl.d/60-acc.conf", "reload": False}},
    {"id": "probes", "sysctl": {"name": "net.ipv4.tcp_keepalive_probes", "value": 5,
                                "persist": "~/acc/sysctl.d/60-acc.conf", "reload": False}},
    {"id": "h1-only", "when": "inventory_hostname == 'h1'", "copy": {"dest": "~/acc/h1-only", "content": "only h1\n"}},
    {"id": "not-h0", "when": "inventory_hostname != 'h0'", "file": {"path": "~/acc/extra.d", "state": "directory"}},
    _root({"id": "grp", "group": {"name": f"rbag-{NAME}"}}),
    _root({"id": "grp-extra", "group": {"name": f"rbah-{NAME}"}}),
    _root({"id": "grp-old", "group": {"name": f"rbax-{NAME}", "state": "absent"}}),
    _root({"id": "user", "user": {"name": f"rbau-{NAME}", "group": f"rbag-{NAME}", "groups": [f"rbah-{NAME}"],
                                  "shell": "/bin/sh", "comment": "runbook accuracy", "create_home": False}}),
    _root({"id": "user-old", "user": {"name": f"rbav-{NAME}", "state": "absent"}}),
    _root({"id": "cron-nightly", "cron": {"name": "nightly", "user": f"rbau-{NAME}", "minute": 30, "hour": 2,
                                          "job": "/bin/true"}}),
    _root({"id": "cron-rotate", "cron": {"name": "rotate", "user": f"rbau-{NAME}", "special_time": "daily",
                                         "job": "/bin/true rotate"}}),
    _root({"id": "cron-old", "cron": {"name": "old", "user": f"rbau-{NAME}", "state": "absent"}}),
    _root({"id": "pkg", "package": {"name": f"rbap-{NAME}"}, "env": APT}),
    _root({"id": "pkg-old", "package": {"name": f"rbaq-{NAME}", "state": "absent"}, "env": APT}),
    _root({"id": "svc", "service": {"name": f"rbas-{NAME}", "state": "started", "enabled": True}}),
    _root({"id": "svc-old", "service": {"name": f"rbat-{NAME}", "state": "stopped", "enabled": False}}),
]

# What the first plan must predict, per step, on (h0: nothing, h1: all as wanted, h2: present but different).
CH, OK, SK = "change", "ok", "skip"
PREDICTED: dict[str, tuple[str, str, str]] = {
    "dir": (CH, OK, CH), "conf": (CH, OK, CH), "token": (CH, OK, CH), "seed": (CH, OK, OK), "listen": (CH, OK, CH),
    "header": (CH, OK, CH), "nodebug": (OK, OK, CH), "limits": (CH, OK, CH), "legacy": (OK, OK, CH), "motd": (CH, OK, CH),
    "motd-mode": (CH, OK, OK), "current": (CH, OK, CH), "stamp": (CH, OK, CH), "cache": (OK, OK, CH), "logs": (CH, OK, CH),
    "keepalive": (CH, OK, CH), "intvl": (OK, OK, CH), "probes": (CH, OK, OK), "h1-only": (SK, OK, SK), "not-h0": (SK, OK, CH),
    "grp": (CH, OK, OK), "grp-extra": (CH, OK, OK), "grp-old": (OK, OK, CH), "user": (CH, OK, CH), "user-old": (OK, OK, CH),
    "cron-nightly": (CH, OK, CH), "cron-rotate": (CH, OK, CH), "cron-old": (OK, OK, CH), "pkg": (CH, OK, CH),
    "pkg-old": (OK, OK, CH), "svc": (CH, OK, CH), "svc-old": (OK, OK, CH),
}

INIT_SCRIPT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: runbook accuracy test service
### END INIT INFO
PID=/run/{name}.pid
running() {{ [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }}
case "$1" in
  start) running || {{ setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > "$PID"; }} ;;
  stop) if running; then kill "$(cat "$PID")"; fi; rm -f "$PID" ;;
  restart|force-reload) "$0" stop; "$0" start ;;
  status) running && exit 0; exit 3 ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
"""

# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root_hosts(ssh_hosts: list[SSHHost]) -> Iterator[list[SSHHost]]:
    """Three test hosts whose users may sudo to root without a password while this module runs."""
    if os.geteuid() != 0 or shutil.which("sudo") is None or not SUDOERS.is_dir():
        pytest.skip("the accuracy scenario needs to run as root on a machine with sudo")
    if Path("/run/systemd/system").is_dir() or not (shutil.which("update-rc.d") and shutil.which("service")):
        pytest.skip("the scenario's services are SysV init scripts (needs Debian's `service`, no systemd)")
    for tool in ("crontab", "apt-get", "dpkg-deb", "useradd"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    hosts = ssh_hosts[:3]
    if len(hosts) < 3 or len({h.user for h in hosts}) < 3:
        pytest.skip("needs three sshd test hosts with users of their own (run as root)")
    with root_sudo([h.user for h in hosts], PREFIX):
        yield hosts


def _run(*args: str, stdin: str | None = None) -> None:
    res = subprocess.run(list(args), input=stdin, capture_output=True, text=True)
    assert res.returncode == 0, f"{args}: {res.stderr}"


class Machine:
    """The machine-wide resources of the scenario: made by the test, every one removed afterwards."""

    def __init__(self, sfx: str, apt: AptRepo):
        self.sfx, self.apt = sfx, apt
        self.users: list[str] = []
        self.groups: list[str] = []
        self.services: list[str] = []

    def names(self, host: str) -> dict[str, str]:
        n = f"{host}-{self.sfx}"
        return {k: f"rba{k}-{n}" for k in ("g", "h", "x", "u", "v", "p", "q", "s", "t")}

    def declare(self, hosts: list[str]) -> None:
        """Record every name before anything is made, so a setup that fails half way is cleaned too."""
        for h in hosts:
            n = self.names(h)
            self.users += [n["u"], n["v"]]
            self.groups += [n["g"], n["h"], n["x"]]
            self.services += [n["s"], n["t"]]
        for name in self.services:
            script = Path("/etc/init.d") / name
            script.write_text(INIT_SCRIPT.format(name=name))
            script.chmod(0o755)
        for name in (self.names(h)[k] for h in hosts for k in ("p", "q")):
            self.apt.add(name, "1.0")
        self.apt.refresh()

    def cleanup(self) -> None:
        for user in self.users:
            subprocess.run(["crontab", "-u", user, "-r"], capture_output=True)
            subprocess.run(["userdel", "--", user], capture_output=True)
        for group in self.groups:
            subprocess.run(["groupdel", "--", group], capture_output=True)
        if self.apt.names:
            subprocess.run(["dpkg", "--purge", *sorted(self.apt.names)], capture_output=True)
        for name in self.services:
            pid = service_pid(name)
            if pid:
                os.kill(pid, 15)
            subprocess.run(["update-rc.d", "-f", name, "remove"], capture_output=True)
            for leftover in (Path("/etc/init.d") / name, Path(f"/run/{name}.pid")):
                leftover.unlink(missing_ok=True)


@pytest.fixture
def machine(root_hosts: list[SSHHost]) -> Iterator[Machine]:
    """The scenario's names (suffix, apt source); accounts, packages, services, crontabs and homes cleaned after."""
    base = Path(tempfile.mkdtemp(prefix="runbook-acc-apt-"))
    base.chmod(0o755)     # the hosts' users read the private apt config and lists
    m = Machine(uuid.uuid4().hex[:6], AptRepo(base))
    try:
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        for h in root_hosts:
            h.clear_home()


# --- the mixed states --------------------------------------------------------------------------------------


def _files(host: SSHHost, files: dict[str, tuple[str, int]], dirs: dict[str, int], links: dict[str, str]) -> None:
    """Write files, directories and links into the host's home, owned by the host's user."""
    for rel, mode in dirs.items():
        (host.home / rel).mkdir(parents=True, exist_ok=True)
        (host.home / rel).chmod(mode)
    for rel, (text, mode) in files.items():
        path = host.home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    for rel, target in links.items():
        (host.home / rel).symlink_to(target)
    pw = pwd.getpwnam(host.user)
    for dirpath, dirnames, filenames in os.walk(host.home / "acc"):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, pw.pw_uid, pw.pw_gid)


def setup_h1(host: SSHHost, m: Machine) -> None:
    """Everything already as the playbook wants it."""
    _files(host, {"acc/conf.d/app.conf": ("name = h1\nworkers = 4\n", 0o640), "acc/conf.d/token": ("t0ken\n", 0o600),
                  "acc/seed.conf": ("seed\n", 0o644), "acc/conf.d/env": (ENV, 0o644),
                  "acc/motd": ("# BEGIN motd\nWelcome to h1\n# END motd\n", 0o600), "acc/stamp": ("", 0o600),
                  "acc/sysctl.d/60-acc.conf": (SYSCTL, 0o644), "acc/h1-only": ("only h1\n", 0o644)},
           {"acc": 0o755, "acc/conf.d": 0o750, "acc/logs": 0o700, "acc/extra.d": 0o755}, {"acc/current": "conf.d/app.conf"})
    n = m.names(host.name)
    _run("groupadd", "--", n["g"])
    _run("groupadd", "--", n["h"])
    _run("useradd", "-M", "-g", n["g"], "-G", n["h"], "-s", "/bin/sh", "-c", "runbook accuracy", "--", n["u"])
    _run("crontab", "-u", n["u"], "-",
         stdin="# runbook: nightly\n30 2 * * * /bin/true\n# runbook: rotate\n@daily /bin/true rotate\n")
    m.apt.install(n["p"])
    _run("service", n["s"], "start")
    _run("update-rc.d", n["s"], "defaults")


def setup_h2(host: SSHHost, m: Machine) -> None:
    """Most things there, but different."""
    env = ("DEBUG=1\nLISTEN=0.0.0.0:80\n# BEGIN legacy\nold=1\n# END legacy\n"
           "# BEGIN MANAGED BY RUNBOOK\nMAX=5\n# END MANAGED BY RUNBOOK\n")
    _files(host, {"acc/conf.d/app.conf": ("name = h2\nworkers = 2\n", 0o640), "acc/conf.d/token": ("t0ken\n", 0o644),
                  "acc/seed.conf": ("edited here\n", 0o644), "acc/conf.d/env": (env, 0o644),
                  "acc/conf.d/old.conf": ("old\n", 0o644), "acc/motd": ("# BEGIN motd\nWelcome\n# END motd\n", 0o600),
                  "acc/stamp": ("", 0o644), "acc/cache/x": ("cached\n", 0o644),
                  "acc/sysctl.d/60-acc.conf": ("net.ipv4.tcp_keepalive_time = 300\nnet.ipv4.tcp_keepalive_intvl = 30\n"
                                               "net.ipv4.tcp_keepalive_probes = 5\n", 0o644)},
           {"acc": 0o755, "acc/conf.d": 0o755, "acc/logs": 0o755}, {"acc/current": "conf.d/old.conf"})
    n = m.names(host.name)
    for group in (n["g"], n["h"], n["x"]):
        _run("groupadd", "--", group)
    _run("useradd", "-M", "-g", n["g"], "-s", "/bin/bash", "-c", "runbook accuracy", "--", n["u"])
    _run("useradd", "-M", "-g", n["g"], "--", n["v"])
    _run("crontab", "-u", n["u"], "-", stdin="# runbook: nightly\n30 3 * * * /bin/true\n# runbook: old\n@hourly /bin/true\n")
    m.apt.install(n["q"])
    _run("service", n["s"], "start")                # running, but not enabled
    _run("service", n["t"], "start")                # running and enabled: to be stopped and disabled
    _run("update-rc.d", n["t"], "defaults")


# --- the scenario ------------------------------------------------------------------------------------------


def _runbook(tmp: Path, *args: str | Path) -> tuple[int, str, str]:
    """The real `runbook` command in a subprocess: (exit code, stdout, stderr)."""
    res = cli(*map(str, args), env={"RUNBOOK_AUDIT_LOG": str(tmp / "audit.jsonl"), "NO_COLOR": "1"}, cwd=tmp)
    return res.returncode, res.stdout, res.stderr


def _plan(tmp: Path, pb: Path, inv: Path, known: Path, sfx: str, apt: Path, out: Path) -> dict[str, Any]:
    code, _, err = _runbook(tmp, "plan", pb, "-i", inv, "--known-hosts", known, "--out", out,
                            "-e", f"sfx={sfx}", "-e", f"apt_config={apt}")
    assert out.exists(), f"plan failed (rc={code}):\n{err}"
    return json.loads(out.read_text())


def predictions(plan: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(host, step) -> prediction kind."""
    return {(p["host"], p["step_id"]): p["prediction"] for p in plan["predictions"]}


def statuses(result: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(host, step) -> status of the real run."""
    return {(r["host"], r["step_id"]): r["status"] for r in result["results"]}


def test_every_resource_action_predicted_exactly_on_hosts_in_mixed_states(
        root_hosts: list[SSHHost], machine: Machine, tmp_path: Path, known_hosts: Path) -> None:
    h0, h1, h2 = root_hosts
    for h in root_hosts:
        h.clear_home()
    machine.declare([h.name for h in root_hosts])
    setup_h1(h1, machine)
    setup_h2(h2, machine)
    assert len(STEPS) >= 30 and {s["id"] for s in STEPS} == set(PREDICTED)
    assert {next(k for k in s if k not in ("id", "when", "sudo", "env")) for s in STEPS} == {
        "file", "copy", "line", "block", "service", "package", "user", "group", "cron", "sysctl"}
    pb = tmp_path / "accuracy.yml"
    steps = [{"name": s["id"].replace("-", " "), **s} for s in STEPS]
    pb.write_text(yaml.safe_dump({"runbook": "accuracy", "hosts": "all", "steps": steps}, sort_keys=False))
    inv = write_inventory(tmp_path / "inventory.yml", root_hosts)

    plan = _plan(tmp_path, pb, inv, known_hosts, machine.sfx, machine.apt.config, tmp_path / "plan.json")
    preds = predictions(plan)
    reasons = {(p["host"], p["step_id"]): p.get("reason") for p in plan["predictions"]}
    assert len(preds) == len(STEPS) * 3
    unknown = {k: reasons[k] for k, v in preds.items() if v == "unknown"}
    assert not unknown, unknown
    want = {(h.name, step): kinds[i] for step, kinds in PREDICTED.items() for i, h in enumerate(root_hosts)}
    wrong = {k: (v, want[k], reasons[k]) for k, v in preds.items() if v != want[k]}
    assert not wrong, "\n".join(f"{k}: predicted {v} (expected {w}): {r}" for k, (v, w, r) in wrong.items())

    code, out, err = _runbook(tmp_path, "apply", tmp_path / "plan.json", "--known-hosts", known_hosts,
                              "--output", "json")
    assert out.strip(), f"apply printed no JSON (rc={code}):\n{err}"
    result = json.loads(out)
    got = statuses(result)
    messages = {(r["host"], r["step_id"]): r.get("message") for r in result["results"]}
    mismatched = [f"{k}: predicted {v}, outcome {got.get(k)}: {messages.get(k)}" for k, v in preds.items()
                  if got.get(k) != EXPECTED[v]]
    assert not mismatched, "\n".join(mismatched)
    assert code == 0, err

    # What apply did is on the machine, not only in its report.
    for h in root_hosts:
        n = machine.names(h.name)
        assert (h.home / "acc/conf.d/env").read_text() == ENV
        assert (h.home / "acc/sysctl.d/60-acc.conf").read_text() == SYSCTL
        assert pwd.getpwnam(n["u"]).pw_shell == "/bin/sh"
        assert service_pid(n["s"]) is not None and service_pid(n["t"]) is None
        assert Path(f"/usr/share/{n['p']}/version").exists() and not Path(f"/usr/share/{n['q']}").exists()
        tab = subprocess.run(["crontab", "-u", n["u"], "-l"], capture_output=True, text=True).stdout
        assert tab == "# runbook: nightly\n30 2 * * * /bin/true\n# runbook: rotate\n@daily /bin/true rotate\n"
    assert (h2.home / "acc/seed.conf").read_text() == "edited here\n"    # force: false keeps it

    again = predictions(_plan(tmp_path, pb, inv, known_hosts, machine.sfx, machine.apt.config, tmp_path / "again.json"))
    left = {k: v for k, v in again.items() if v not in ("ok", "skip")}
    assert not left, left
    assert len(again) == len(preds)
    # The figures of the scenario (visible with -s): steps, hosts and predictions by kind.
    print(f"accuracy: {len(STEPS)} steps x {len(root_hosts)} hosts; first plan {dict(Counter(preds.values()))}; "
          f"second plan {dict(Counter(again.values()))}")
