"""service, package, user, group and cron against a real sshd host, as root through sudo.

Every test host is a user on this one machine, so system state (init scripts, packages, accounts,
crontabs) is shared with it: each test uses names unique to the run (`rbt-…-<random>`), cleans up
after itself, and never touches a real service, package or account. The host's user gets
passwordless sudo to root only while this module runs (a sudoers drop-in of its own).
"""

from __future__ import annotations

import json
import os
import grp
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.cli import main
from tests.aptrepo import AptRepo
from tests.sshd import SSHHost, root_sudo, write_inventory

pytestmark = pytest.mark.ssh

SUDOERS = Path("/etc/sudoers.d")


def unique(prefix: str) -> str:
    """A name nothing on this machine has (one per test run)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def root_host(ssh_hosts: list[SSHHost]) -> Iterator[SSHHost]:
    """The first test host, whose user may sudo to root without a password while this module runs."""
    if os.geteuid() != 0 or shutil.which("sudo") is None or not SUDOERS.is_dir():
        pytest.skip("the system resource tests need to run as root on a machine with sudo")
    host = ssh_hosts[0]
    if host.user == pwd.getpwuid(os.geteuid()).pw_name:
        pytest.skip("the sshd test hosts log in as the current user (no per-host users)")
    with root_sudo([host.user], "runbook-tests-root-"):
        yield host


class Runbook:
    """The real CLI in process against one sshd host: run, plan (to a file) and apply that plan."""

    def __init__(self, tmp: Path, host: SSHHost, known_hosts: Path, capsys: pytest.CaptureFixture[str]):
        self.tmp, self.known_hosts, self.capsys = tmp, known_hosts, capsys
        self.inventory = write_inventory(tmp / "inventory.yml", [host])
        self.count = 0

    def playbook(self, steps: list[dict[str, Any]], **top: Any) -> Path:
        """Write a playbook of these steps (each `sudo: true` unless it says otherwise)."""
        self.count += 1
        path = self.tmp / f"pb{self.count}.yml"
        steps = [{"sudo": True, **s} for s in steps]
        path.write_text(yaml.safe_dump({"runbook": "system", "hosts": "all", **top, "steps": steps}, sort_keys=False))
        return path

    def _cli(self, *args: str | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def run(self, steps: list[dict[str, Any]], **top: Any) -> tuple[int, dict[str, dict[str, Any]]]:
        """`runbook run` of these steps: (exit code, {step_id: result})."""
        code, out, err = self._cli("run", self.playbook(steps, **top), "-i", self.inventory, "--known-hosts",
                                   self.known_hosts, "--output", "json")
        assert out.strip(), f"run printed no JSON (rc={code}):\n{err}"
        return code, {r["step_id"]: r for r in json.loads(out)["results"]}

    def plan(self, steps: list[dict[str, Any]], **top: Any) -> tuple[Path, dict[str, dict[str, Any]]]:
        """`runbook plan` of these steps to a file: (plan path, {step_id: prediction})."""
        out = self.tmp / f"plan{self.count + 1}.json"
        code, text, err = self._cli("plan", self.playbook(steps, **top), "-i", self.inventory, "--known-hosts",
                                    self.known_hosts, "--out", out)
        assert out.exists(), f"plan failed (rc={code}):\n{text}\n{err}"
        return out, {p["step_id"]: p for p in json.loads(out.read_text())["predictions"]}

    def apply(self, plan: Path) -> tuple[int, dict[str, dict[str, Any]]]:
        """`runbook apply` of a saved plan: (exit code, {step_id: result})."""
        code, out, err = self._cli("apply", plan, "--known-hosts", self.known_hosts, "--output", "json")
        assert out.strip(), f"apply printed no JSON (rc={code}):\n{err}"
        return code, {r["step_id"]: r for r in json.loads(out)["results"]}

    def idempotent(self, steps: list[dict[str, Any]], **top: Any) -> None:
        """Applying again changes nothing, and a plan now predicts `ok` for every step."""
        code, again = self.run(steps, **top)
        assert code == 0 and {k: r["status"] for k, r in again.items()} == {k: "ok" for k in again}, again
        _, preds = self.plan(steps, **top)
        assert {k: p["prediction"] for k, p in preds.items()} == {k: "ok" for k in preds}, preds


@pytest.fixture
def rb(tmp_path: Path, root_host: SSHHost, known_hosts: Path, capsys: pytest.CaptureFixture[str],
       monkeypatch: pytest.MonkeyPatch) -> Runbook:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("NO_COLOR", "1")
    return Runbook(tmp_path, root_host, known_hosts, capsys)


# --- service (SysV: systemd does not run in CI containers) ---------------------------------------------

INIT_SCRIPT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: runbook test service
### END INIT INFO
PID=/run/{name}.pid
running() {{ [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }}
case "$1" in
  start) {fail}running || {{ setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > "$PID"; }} ;;
  stop) if running; then kill "$(cat "$PID")"; fi; rm -f "$PID" ;;
  restart|force-reload) "$0" stop; "$0" start ;;
  reload) running && echo reloaded >> /run/{name}.reloads ;;
  status) running && exit 0; exit 3 ;;
  *) echo "usage: $0 start|stop|restart|reload|status" >&2; exit 2 ;;
esac
"""


def _links(name: str) -> set[str]:
    return {p.name[0] for d in ("rc2.d", "rc3.d", "rc4.d", "rc5.d") for p in (Path("/etc") / d).glob(f"[SK][0-9][0-9]{name}")}


def service_pid(name: str) -> int | None:
    """The pid a SysV service wrote to /run/NAME.pid, if that process is alive."""
    try:
        pid = int(Path(f"/run/{name}.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


@pytest.fixture
def init_script(root_host: SSHHost) -> Iterator[Any]:
    """`init_script(fail=False)` writes /etc/init.d/rbt-svc-<random> (a sleep with a pid file); removed after."""
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd: the SysV backend is not the one detected here")
    if shutil.which("update-rc.d") is None or shutil.which("service") is None:
        pytest.skip("needs Debian's `service` and `update-rc.d`")
    made: list[str] = []

    def make(fail: bool = False) -> str:
        name = unique("rbt-svc")
        script = Path("/etc/init.d") / name
        script.write_text(INIT_SCRIPT.format(name=name, fail="echo cannot bind port 8080 >&2; exit 1; " if fail else ""))
        script.chmod(0o755)
        made.append(name)
        return name

    yield make
    for name in made:
        pid = service_pid(name)
        if pid:
            os.kill(pid, 15)
        subprocess.run(["update-rc.d", "-f", name, "remove"], capture_output=True)
        for leftover in (Path("/etc/init.d") / name, Path(f"/run/{name}.pid"), Path(f"/run/{name}.reloads")):
            leftover.unlink(missing_ok=True)


def test_service_started_enabled_exact_plan_apply_and_idempotence(rb: Runbook, init_script: Any) -> None:
    name = init_script()
    steps = [{"name": "svc", "service": {"name": name, "state": "started", "enabled": True}}]
    plan, preds = rb.plan(steps)
    assert preds["svc"]["prediction"] == "change", preds
    assert preds["svc"]["diff"].splitlines()[2:] == ["@@ -1,2 +1,2 @@", "-running: no", "-enabled: no",
                                                     "+running: yes", "+enabled: yes"]
    assert preds["svc"]["command"] == f"service {name} start; update-rc.d {name} defaults"
    assert service_pid(name) is None and _links(name) == set(), "the dry run changed the host"

    code, results = rb.apply(plan)
    assert code == 0 and results["svc"]["status"] == "changed", results
    assert results["svc"]["data"] == {"backend": "sysv", "before": {"running": False, "enabled": False},
                                      "after": {"running": True, "enabled": True}}
    assert service_pid(name) is not None and _links(name) == {"S"}
    rb.idempotent(steps)


def test_service_restarted_always_changes_and_restarts(rb: Runbook, init_script: Any) -> None:
    name = init_script()
    rb.run([{"name": "up", "service": {"name": name, "state": "started"}}])
    before = service_pid(name)
    steps = [{"name": "restart", "service": {"name": name, "state": "restarted"}}]
    _, preds = rb.plan(steps)
    assert preds["restart"]["prediction"] == "change" and "restarted always changes" in preds["restart"]["reason"]
    assert service_pid(name) == before
    code, results = rb.run(steps)
    assert code == 0 and results["restart"]["status"] == "changed"
    assert service_pid(name) not in (None, before)
    code, results = rb.run([{"name": "reload", "service": {"name": name, "state": "reloaded"}}])
    assert code == 0 and results["reload"]["status"] == "changed"
    assert Path(f"/run/{name}.reloads").read_text() == "reloaded\n"


def test_service_stopped_disabled_then_idempotent(rb: Runbook, init_script: Any) -> None:
    name = init_script()
    rb.run([{"name": "up", "service": {"name": name, "state": "started", "enabled": True}}])
    steps = [{"name": "down", "service": {"name": name, "state": "stopped", "enabled": False}}]
    code, results = rb.run(steps)
    assert code == 0 and results["down"]["status"] == "changed", results
    assert results["down"]["data"]["after"] == {"running": False, "enabled": False}
    assert service_pid(name) is None and _links(name) == {"K"}
    rb.idempotent(steps)


def test_service_errors_name_the_host_the_service_and_what_failed(rb: Runbook, init_script: Any) -> None:
    broken = init_script(fail=True)
    missing = unique("rbt-svc-missing")
    steps = [{"name": "broken", "service": {"name": broken, "state": "started"}, "needs": []},
             {"name": "missing", "service": {"name": missing, "state": "started"}, "needs": []}]
    _, preds = rb.plan(steps)
    assert preds["broken"]["prediction"] == "change"
    assert preds["missing"]["prediction"] == "unknown" and f"/etc/init.d/{missing} does not exist" in preds["missing"]["reason"]
    code, results = rb.run(steps)
    assert code == 2
    msg = results["broken"]["message"]
    assert results["broken"]["status"] == "failed" and msg.startswith(f"h0: service {broken}: `service {broken} start` failed")
    assert "cannot bind port 8080" in msg
    assert results["missing"]["status"] == "failed" and results["missing"]["message"].startswith(f"h0: service {missing}:")


@pytest.fixture
def systemd_unit(root_host: SSHHost) -> Iterator[str]:
    """A runtime unit /run/systemd/system/rbt-svc-<random>.service (a sleep); stopped, disabled and removed after."""
    if not Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is not running here (CI containers): the SysV tests cover this machine")
    name = unique("rbt-svc") + ".service"
    unit = Path("/run/systemd/system") / name
    unit.write_text("[Unit]\nDescription=runbook test\n[Service]\nExecStart=/bin/sleep 600\nExecReload=/bin/true\n"
                    "[Install]\nWantedBy=multi-user.target\n")
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["systemctl", "disable", "--now", "--", name], capture_output=True)
        unit.unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)


def _systemd(name: str, prop: str) -> str:
    return subprocess.run(["systemctl", "show", f"--property={prop}", "--value", "--", name],
                          capture_output=True, text=True).stdout.strip()


def test_service_on_systemd_where_it_runs(rb: Runbook, systemd_unit: str) -> None:
    steps = [{"name": "svc", "service": {"name": systemd_unit, "state": "started", "enabled": True}}]
    plan, preds = rb.plan(steps)
    assert preds["svc"]["prediction"] == "change"
    assert preds["svc"]["command"] == f"systemctl start -- {systemd_unit}; systemctl enable -- {systemd_unit}"
    assert _systemd(systemd_unit, "ActiveState") == "inactive"
    code, results = rb.apply(plan)
    assert code == 0 and results["svc"]["data"]["backend"] == "systemd", results
    assert _systemd(systemd_unit, "ActiveState") == "active" and _systemd(systemd_unit, "UnitFileState") == "enabled"
    rb.idempotent(steps)
    down = [{"name": "svc", "service": {"name": systemd_unit, "state": "stopped", "enabled": False}}]
    code, results = rb.run(down)
    assert code == 0 and results["svc"]["status"] == "changed"
    assert _systemd(systemd_unit, "ActiveState") == "inactive" and _systemd(systemd_unit, "UnitFileState") == "disabled"
    rb.idempotent(down)

# --- package (apt with a local `file:` source: no network, the machine's apt lists untouched) ----------

def installed(name: str) -> str | None:
    """The version dpkg says is installed, or None."""
    res = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", "--", name], capture_output=True, text=True)
    return res.stdout.split()[1] if res.returncode == 0 and res.stdout.startswith("ii") else None


@pytest.fixture
def apt_repo(root_host: SSHHost) -> Iterator[AptRepo]:
    """A local apt source in a temp dir readable by everyone; its packages are purged afterwards."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt and dpkg")
    base = Path(tempfile.mkdtemp(prefix="runbook-apt-"))
    base.chmod(0o755)
    repo = AptRepo(base)
    try:
        yield repo
    finally:
        if repo.names:
            subprocess.run(["dpkg", "--purge", *sorted(repo.names)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_package_present_from_a_local_source_then_latest_then_absent(rb: Runbook, apt_repo: AptRepo) -> None:
    name = unique("rbt-pkg")
    apt_repo.add(name, "1.0")
    env = {"APT_CONFIG": str(apt_repo.config)}
    first = [{"name": "pkg", "package": {"name": name, "update_cache": True}, "env": env}]
    _, preds = rb.plan(first)   # the private lists are empty: nothing offers the package yet
    assert preds["pkg"]["prediction"] == "unknown" and "update_cache" in preds["pkg"]["reason"]
    code, results = rb.run(first)
    assert code == 0 and results["pkg"]["status"] == "changed", results
    assert results["pkg"]["data"] == {"manager": "apt", "before": {name: None}, "after": {name: "1.0"}}
    assert installed(name) == "1.0" and Path(f"/usr/share/{name}/version").read_text() == "1.0\n"
    rb.idempotent(first)

    apt_repo.add(name, "2.0")
    apt_repo.refresh()
    present = [{"name": "pkg", "package": {"name": name, "state": "present"}, "env": env}]
    latest = [{"name": "pkg", "package": {"name": name, "state": "latest"}, "env": env}]
    _, preds = rb.plan(present)
    assert preds["pkg"]["prediction"] == "ok"
    plan, preds = rb.plan(latest)
    assert preds["pkg"]["prediction"] == "change", preds
    assert preds["pkg"]["diff"].splitlines()[2:] == ["@@ -1 +1 @@", f"-{name}: 1.0", f"+{name}: 2.0"]
    assert installed(name) == "1.0", "the dry run changed the host"
    code, results = rb.apply(plan)
    assert code == 0 and results["pkg"]["status"] == "changed" and results["pkg"]["data"]["after"] == {name: "2.0"}
    assert installed(name) == "2.0"
    rb.idempotent(latest)

    absent = [{"name": "pkg", "package": {"name": name, "state": "absent"}, "env": env}]
    plan, preds = rb.plan(absent)
    assert preds["pkg"]["prediction"] == "change" and f"+{name}: absent" in preds["pkg"]["diff"]
    code, results = rb.apply(plan)
    assert code == 0 and results["pkg"]["status"] == "changed" and installed(name) is None
    rb.idempotent(absent)


def test_package_plan_names_dependencies_an_install_pulls_in_and_a_removal_takes(rb: Runbook, apt_repo: AptRepo) -> None:
    app, lib = unique("rbt-app"), unique("rbt-lib")
    apt_repo.add(lib, "1.2")
    apt_repo.add(app, "1.0", depends=lib)
    apt_repo.refresh()
    env = {"APT_CONFIG": str(apt_repo.config)}
    plan, preds = rb.plan([{"name": "app", "package": {"name": app}, "env": env}])
    assert preds["app"]["prediction"] == "change" and f"with {lib}" in preds["app"]["reason"]
    assert sorted(preds["app"]["diff"].splitlines()[3:]) == sorted(
        [f"-{app}: absent", f"-{lib}: absent", f"+{app}: 1.0", f"+{lib}: 1.2"])
    code, results = rb.apply(plan)
    assert code == 0 and results["app"]["status"] == "changed"
    assert installed(app) == "1.0" and installed(lib) == "1.2"
    _, preds = rb.plan([{"name": "lib", "package": {"name": lib, "state": "absent"}, "env": env}])
    assert preds["lib"]["prediction"] == "change" and f"with {app}" in preds["lib"]["reason"]
    assert f"+{app}: absent" in preds["lib"]["diff"]


def test_package_errors_name_the_host_the_package_and_what_failed(rb: Runbook, apt_repo: AptRepo) -> None:
    missing = unique("rbt-nopkg")
    apt_repo.refresh()
    code, results = rb.run([{"name": "pkg", "package": {"name": missing}, "env": {"APT_CONFIG": str(apt_repo.config)}}])
    assert code == 2 and results["pkg"]["status"] == "failed"
    assert results["pkg"]["message"] == f"h0: package {missing}: finding a candidate failed: no candidate for {missing} in the apt lists"


# --- group and user ----------------------------------------------------------------------------------------

def free_id(exists: Any, start: int = 62000) -> int:
    """The first id from `start` that no account (or group) on this machine has."""
    for n in range(start, start + 3000):
        try:
            exists(n)
        except KeyError:
            return n
    raise AssertionError("no free id")


@pytest.fixture
def accounts(root_host: SSHHost) -> Iterator[dict[str, list[str]]]:
    """Names of users and groups a test creates: deleted afterwards (users first, with their homes)."""
    made: dict[str, list[str]] = {"users": [], "groups": []}
    yield made
    for user in made["users"]:
        subprocess.run(["userdel", "-r", "--", user], capture_output=True)
    for group in made["groups"]:
        subprocess.run(["groupdel", "--", group], capture_output=True)


def shadow_hash(user: str) -> str | None:
    for line in Path("/etc/shadow").read_text().splitlines():
        if line.split(":", 1)[0] == user:
            return line.split(":")[1]
    return None


def test_groups_and_a_user_lifecycle_exact_and_the_hash_never_shown(rb: Runbook, accounts: dict[str, list[str]],
                                                                    tmp_path: Path) -> None:
    g1, g2, user = unique("rbtg"), unique("rbtg"), unique("rbtu")
    accounts["users"].append(user)
    accounts["groups"] += [g1, g2]
    gid, uid = free_id(grp.getgrgid), free_id(pwd.getpwuid)
    hash1 = "$6$rbtsalt1$" + uuid.uuid4().hex * 2
    hash2 = "$6$rbtsalt2$" + uuid.uuid4().hex * 2
    steps = [{"name": "g1", "group": {"name": g1, "gid": gid}},
             {"name": "g2", "group": {"name": g2, "system": True}},
             {"name": "user", "user": {"name": user, "uid": uid, "group": g1, "groups": [g2], "shell": "/bin/sh",
                                       "comment": "runbook test", "password": "{{ user_password }}"}}]
    secrets = {"user_password": hash1, "new_password": hash2}    # secret-named vars: masked in every output
    plan, preds = rb.plan(steps, vars=secrets)
    # The user's groups do not exist yet: the plan reads them as the group steps before it leave them.
    assert [preds[s]["prediction"] for s in ("g1", "g2", "user")] == ["change", "change", "change"], preds
    assert preds["g1"]["diff"].splitlines()[3:] == ["-absent", "+present", f"+gid: {gid}"]
    assert preds["user"]["diff"].splitlines()[3:] == [
        "-absent", "+present", f"+uid: {uid}", f"+group: {g1}", f"+groups: {g2}", "+shell: /bin/sh", "+comment: runbook test",
        "+password: (new hash)"]
    assert preds["user"]["command"] == (f"useradd -u {uid} -s /bin/sh -c 'runbook test' -g {g1} -G {g2} -m -- {user}; "
                                        "chpasswd -e")
    code, results = rb.apply(plan)
    assert code == 0 and [results[s]["status"] for s in ("g1", "g2", "user")] == ["changed"] * 3, [r["message"] for r in results.values()]
    entry = pwd.getpwnam(user)
    assert (entry.pw_uid, entry.pw_gid, entry.pw_shell, entry.pw_gecos) == (uid, gid, "/bin/sh", "runbook test")
    assert Path(entry.pw_dir).is_dir() and grp.getgrnam(g2).gr_mem == [user] and shadow_hash(user) == hash1
    assert results["user"]["data"]["after"] == {"uid": uid, "group": g1, "groups": [g2], "shell": "/bin/sh",
                                                "home": entry.pw_dir, "comment": "runbook test"}
    assert results["g1"]["data"] == {"before": None, "after": {"gid": gid}}
    rb.idempotent(steps, vars=secrets)

    changed = [{"name": "user", "user": {"name": user, "groups": [], "shell": "/bin/bash", "password": "{{ new_password }}"}}]
    plan, preds = rb.plan(changed, vars=secrets)
    assert preds["user"]["prediction"] == "change", preds
    diff = preds["user"]["diff"].splitlines()
    assert {"-groups: " + g2, "+groups: ", "-shell: /bin/sh", "+shell: /bin/bash", "-password: (hash differs)",
            "+password: (new hash)"} <= set(diff), diff
    code, results = rb.apply(plan)
    assert code == 0 and results["user"]["status"] == "changed", results
    assert pwd.getpwnam(user).pw_shell == "/bin/bash" and grp.getgrnam(g2).gr_mem == [] and shadow_hash(user) == hash2
    rb.idempotent(changed, vars=secrets)

    gone = [{"name": "user", "user": {"name": user, "state": "absent", "remove": True}},
            {"name": "g1", "group": {"name": g1, "state": "absent"}}, {"name": "g2", "group": {"name": g2, "state": "absent"}}]
    code, results = rb.run(gone)
    assert code == 0 and [results[s]["status"] for s in ("user", "g1", "g2")] == ["changed"] * 3, results
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    assert not Path(entry.pw_dir).exists()
    rb.idempotent(gone)
    # The hashes were on no command line, in no output, plan file or audit record.
    assert hash1 in (tmp_path / "pb1.yml").read_text()
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    assert hash1 not in written and hash2 not in written and "rbtsalt" not in written


def test_a_missing_group_is_unknown_unless_an_earlier_step_creates_it(rb: Runbook, accounts: dict[str, list[str]]) -> None:
    user, group = unique("rbtu"), unique("rbtg")
    accounts["users"].append(user)
    _, preds = rb.plan([{"name": "user", "user": {"name": user, "groups": [group]}}])
    assert preds["user"]["prediction"] == "unknown", preds
    assert preds["user"]["reason"] == f"user {user}: no group {group} on the host now; it fails unless an earlier step creates it"
    code, results = rb.run([{"name": "user", "user": {"name": user, "groups": [group]}}])
    assert code == 2 and results["user"]["message"] == f"h0: user {user}: checking the account failed: no group {group} on the host"


def test_cron_for_a_user_an_earlier_step_creates(rb: Runbook, accounts: dict[str, list[str]]) -> None:
    if shutil.which("crontab") is None:
        pytest.skip("crontab is not installed (the `cron` package)")
    user = unique("rbtu")
    accounts["users"].append(user)
    steps = [{"name": "user", "user": {"name": user, "create_home": False}},
             {"name": "cron", "cron": {"name": "report", "user": user, "special_time": "hourly", "job": "report --quiet"}}]
    try:
        plan, preds = rb.plan(steps)
        assert [preds[s]["prediction"] for s in ("user", "cron")] == ["change", "change"], preds
        assert preds["cron"]["diff"].splitlines()[3:] == ["+# runbook: report", "+@hourly report --quiet"]
        code, results = rb.apply(plan)
        assert code == 0 and [results[s]["status"] for s in ("user", "cron")] == ["changed", "changed"], results
        assert crontab(user) == "# runbook: report\n@hourly report --quiet\n"
        rb.idempotent(steps)
    finally:
        subprocess.run(["crontab", "-u", user, "-r"], capture_output=True)


def test_user_conflicts_and_errors_name_the_host_and_the_account(rb: Runbook, accounts: dict[str, list[str]]) -> None:
    user = unique("rbtu")
    accounts["users"].append(user)
    steps = [{"name": "user", "user": {"name": user, "uid": 0}}]
    _, preds = rb.plan(steps)
    assert preds["user"]["prediction"] == "fail" and preds["user"]["reason"] == f"user {user}: uid 0 belongs to user root"
    code, results = rb.run(steps)
    assert code == 2 and results["user"]["message"] == f"h0: user {user}: checking the account failed: uid 0 belongs to user root"
    code, results = rb.run([{"name": "user", "user": {"name": user, "shell": "/bin/sh"}}])
    assert code == 0 and results["user"]["status"] == "changed"
    # usermod refuses to change the uid of an account that has a running process: its own reason is reported.
    entry = pwd.getpwnam(user)
    busy = subprocess.Popen(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "sleep", "60"])
    try:
        time.sleep(0.2)
        code, results = rb.run([{"name": "uid", "user": {"name": user, "uid": free_id(pwd.getpwuid)}}])
    finally:
        busy.kill()
        busy.wait()
    msg = results["uid"]["message"]
    assert code == 2 and msg.startswith(f"h0: user {user}: `usermod -u "), msg
    assert f"user {user} is currently used by process {busy.pid}" in msg, msg


# --- cron ------------------------------------------------------------------------------------------------

FOREIGN = 'MAILTO=""\n# kept as it is\n*/5 * * * * echo foreign  # with a comment\n'


def crontab(user: str) -> str:
    """The user's crontab as `crontab -l` prints it ("" when there is none)."""
    res = subprocess.run(["crontab", "-u", user, "-l"], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""


@pytest.fixture
def cron_user(root_host: SSHHost) -> Iterator[str]:
    """The test host's user, with a crontab holding entries of its own; the crontab is removed afterwards."""
    if shutil.which("crontab") is None:
        pytest.skip("crontab is not installed (the `cron` package)")
    user = root_host.user
    subprocess.run(["crontab", "-u", user, "-"], input=FOREIGN, text=True, check=True, capture_output=True)
    try:
        yield user
    finally:
        subprocess.run(["crontab", "-u", user, "-r"], capture_output=True)


def test_cron_edits_only_its_marked_entry(rb: Runbook, cron_user: str) -> None:
    job = "/usr/local/bin/backup --db main > /dev/null 2>&1"
    steps = [{"name": "cron", "cron": {"name": "backup db", "user": cron_user, "minute": 30, "hour": 2, "job": job}}]
    plan, preds = rb.plan(steps)
    assert preds["cron"]["prediction"] == "change", preds
    assert preds["cron"]["diff"].splitlines()[2:] == ["@@ -3,0 +4,2 @@", "+# runbook: backup db", f"+30 2 * * * {job}"]
    assert crontab(cron_user) == FOREIGN, "the dry run changed the crontab"
    code, results = rb.apply(plan)
    assert code == 0 and results["cron"]["status"] == "changed", results
    assert results["cron"]["data"] == {"user": cron_user, "before": None, "after": f"30 2 * * * {job}"}
    assert crontab(cron_user) == FOREIGN + f"# runbook: backup db\n30 2 * * * {job}\n"
    rb.idempotent(steps)
    # The same entry seen from the user's own crontab (no `user`, no sudo).
    _, preds = rb.plan([{"name": "own", "sudo": False, "cron": {"name": "backup db", "minute": "30", "hour": "2", "job": job}}])
    assert preds["own"]["prediction"] == "ok", preds

    moved = [{"name": "cron", "cron": {"name": "backup db", "user": cron_user, "minute": 30, "hour": 3, "job": job}},
             {"name": "daily", "cron": {"name": "rotate", "user": cron_user, "special_time": "daily", "job": "rotate-logs"}}]
    _, preds = rb.plan(moved)
    assert preds["cron"]["diff"].splitlines()[3:] == [f"-30 2 * * * {job}", f"+30 3 * * * {job}"]
    code, results = rb.run(moved)
    assert code == 0 and [results[s]["status"] for s in ("cron", "daily")] == ["changed", "changed"]
    assert crontab(cron_user) == (FOREIGN + f"# runbook: backup db\n30 3 * * * {job}\n"
                                  "# runbook: rotate\n@daily rotate-logs\n")
    rb.idempotent(moved)

    gone = [{"name": "cron", "cron": {"name": "backup db", "user": cron_user, "state": "absent"}},
            {"name": "daily", "cron": {"name": "rotate", "user": cron_user, "state": "absent"}}]
    code, results = rb.run(gone)
    assert code == 0 and results["cron"]["data"]["before"] == f"30 3 * * * {job}" and results["cron"]["data"]["after"] is None
    assert crontab(cron_user) == FOREIGN, "other entries were not kept byte for byte"
    rb.idempotent(gone)


def test_cron_refuses_a_job_that_renders_to_several_lines(rb: Runbook, cron_user: str) -> None:
    steps = [{"name": "cron", "cron": {"name": "evil", "user": cron_user, "job": "{{ job }}"}}]
    code, results = rb.run(steps, vars={"job": "true\n* * * * * rm -rf /tmp/x"})
    assert code == 2 and results["cron"]["status"] == "failed"
    assert "h0: step `cron`: cron job '{{ job }}' rendered to 'true\\n* * * * * rm" in results["cron"]["message"]
    assert crontab(cron_user) == FOREIGN
    code, results = rb.run([{"name": "cron", "cron": {"name": "x", "user": "rbt-nosuch-user", "job": "true"}}])
    assert code == 2 and "h0: cron 'x': cannot read the crontab of rbt-nosuch-user: " in results["cron"]["message"]


# --- the shipped rolling-restart playbook restarts through `service` when no restart_command is given -------

def test_rolling_restart_uses_the_service_action_by_default(rb: Runbook, init_script: Any, root_host: SSHHost,
                                                           tmp_path: Path) -> None:
    name = init_script()
    rb.run([{"name": "up", "service": {"name": name, "state": "started"}}])
    before = service_pid(name)
    playbooks = Path(__file__).resolve().parents[2] / "playbooks"
    shutil.copy(playbooks / "rolling-restart.yml", tmp_path / "rolling-restart.yml")
    (tmp_path / "windows.yml").write_text('windows:\n  maintenance: {cron: "* * * * *", duration: 2h}\n')
    # The host's own sshd port stands in for the service's port: it is listening.
    inv = write_inventory(tmp_path / "restart-inventory.yml", [root_host],
                          extra={"service": name, "health_port": root_host.port, "drain_dir": str(tmp_path / "drain")})
    out = tmp_path / "restart.plan.json"
    code, _, err = rb._cli("plan", tmp_path / "rolling-restart.yml", "-i", inv, "--known-hosts", rb.known_hosts, "--out", out)
    preds = {p["step_id"]: p["prediction"] for p in json.loads(out.read_text())["predictions"]}
    assert preds == {"drain": "change", "restart-service": "change", "restart": "skip", "health": "unknown",
                     "undrain": "change"}, err
    assert service_pid(name) == before
    code, results = rb.apply(out)
    assert code == 0, results
    assert {k: r["status"] for k, r in results.items()} == {"drain": "changed", "restart-service": "changed",
                                                            "restart": "skipped", "health": "ok", "undrain": "changed"}
    assert service_pid(name) not in (None, before)


def test_apply_refuses_a_plan_the_host_drifted_from(rb: Runbook, init_script: Any, cron_user: str) -> None:
    name = init_script()
    steps = [{"name": "svc", "service": {"name": name, "state": "started"}},
             {"name": "cron", "cron": {"name": "drift", "user": cron_user, "job": "true"}, "needs": []}]
    plan, preds = rb.plan(steps)
    assert preds["svc"]["prediction"] == "change" and preds["cron"]["prediction"] == "change"
    subprocess.run(["service", name, "start"], check=True, capture_output=True)        # someone else started it
    subprocess.run(["crontab", "-u", cron_user, "-"], input=FOREIGN + "@hourly other\n", text=True, check=True)
    code, results = rb.apply(plan)
    assert code == 2 and results["svc"]["status"] == "drift" and results["cron"]["status"] == "drift", results
    assert "the plan said change" in results["svc"]["message"] and "now ok" in results["svc"]["message"]
    assert crontab(cron_user) == FOREIGN + "@hourly other\n"
