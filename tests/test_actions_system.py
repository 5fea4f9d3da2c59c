"""service, package, user, group, cron: spec validation (attack inputs refused, located), the command lines each
backend builds, the parsers of what hosts print, and read-only plans against this machine (nothing is changed)."""

from __future__ import annotations

import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.actions import Action, PredictionKind, TaskEnv, action_for
from runbook.actions._system import ABSENT, parse_sections, record_planned, state_diff
from runbook.actions._system import planned as planned_state
from runbook.actions.package import PackageSpec, Packages, commands, parse_apk, parse_apt, parse_rpm, simulated
from runbook.actions.package import plan_changes as package_changes
from runbook.actions.cron import CronSpec, entry_line, new_table, table_diff
from runbook.actions.group import GroupSpec, group_commands, parse_group
from runbook.actions.user import UserSpec, UserState, parse_user, user_changes
from runbook.actions.service import ServiceSpec, boot, control, parse_systemd, parse_sysv, plan_changes
from runbook.connections import ReadOnlyConnection
from runbook.connections.local import LocalConnection
from runbook.errors import RunbookError
from runbook.loader import load_playbook, validate_playbook


def write(tmp_path: Path, step: dict[str, Any]) -> Path:
    """A one-step playbook file, written as YAML."""
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [step]}, sort_keys=False))
    return path


def problems(tmp_path: Path, step: dict[str, Any]) -> list[str]:
    """Every problem `validate` finds in a one-step playbook, rendered with its location."""
    return [p.render() for p in validate_playbook(write(tmp_path, step)).errors]


def planned(tmp_path: Path, step: dict[str, Any], vars: dict[str, Any] | None = None) -> tuple[Action, TaskEnv]:
    """The action and a dry run's environment (read-only connection to this machine) for one step."""
    pb = load_playbook(write(tmp_path, step))
    action = action_for(pb.steps[0])
    conn = ReadOnlyConnection(LocalConnection("local"), allow_run=action.probes_read_only())
    return action, TaskEnv(step=pb.steps[0], host="web1", conn=conn, vars=dict(vars or {}), playbook=pb)


def unique(prefix: str) -> str:
    """A name nothing on this machine has."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- shared helpers ----------------------------------------------------------------------------------

def test_sections_split_on_marker_lines_only() -> None:
    text = "\n--rb:a--\none\ntwo --rb:b-- inline\n\n--rb:b--\n\n--rb:end--\n"
    assert parse_sections(text) == {"a": "one\ntwo --rb:b-- inline", "b": "", "end": ""}


def test_state_diff_is_empty_when_nothing_differs() -> None:
    assert state_diff(["a: 1"], ["a: 1"], "x") == ""
    diff = state_diff(["a: 1", "b: 2"], ["a: 1", "b: 3"], "user x")
    assert "-b: 2\n+b: 3\n" in diff and diff.startswith("--- user x (on host)\n+++ user x (wanted)\n")


# --- service ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x; rm -rf /", "$(reboot)", "-h", "a b", "a\nb", "`id`", "a|b", "../etc/x", "", "x" * 300])
def test_service_names_with_metacharacters_are_refused_located(tmp_path: Path, name: str) -> None:
    found = problems(tmp_path, {"name": "s", "service": {"name": name, "state": "started"}})
    assert len(found) == 1 and "invalid service name" in found[0], found
    assert found[0].startswith(f"{tmp_path / 'pb.yml'}:5:11: error: `name`: invalid service name"), found  # at the value


def test_service_needs_state_or_enabled_and_knows_its_states(tmp_path: Path) -> None:
    assert "service needs `state`, `enabled` or both" in problems(tmp_path, {"name": "s", "service": {"name": "a"}})[0]
    assert problems(tmp_path, {"name": "s", "service": {"name": "a", "state": "running"}})
    assert problems(tmp_path, {"name": "s", "service": {"name": "a", "state": "started", "enable": True}})
    assert problems(tmp_path, {"name": "s", "service": {"name": "app@1.service", "state": "reloaded", "enabled": False}}) == []


def test_systemd_show_parsing() -> None:
    st = parse_systemd("LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\n")
    assert (st.backend, st.exists, st.running, st.enabled) == ("systemd", True, True, True)
    st = parse_systemd("LoadState=loaded\nActiveState=failed\nSubState=failed\nUnitFileState=disabled\n")
    assert (st.running, st.enabled) == (False, False)
    assert not parse_systemd("LoadState=not-found\nActiveState=inactive\nSubState=dead\nUnitFileState=\n").exists
    static = parse_systemd("LoadState=loaded\nActiveState=inactive\nUnitFileState=static\n")
    assert static.enabled is None and "static" in static.why_fixed
    masked = parse_systemd("LoadState=masked\nActiveState=inactive\nUnitFileState=masked\n")
    assert masked.enabled is None and "masked" in masked.why_fixed


def _spec(**kw: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": "app", **kw})


def test_systemd_command_lines() -> None:
    stopped = parse_systemd("LoadState=loaded\nActiveState=inactive\nUnitFileState=disabled\n")
    running = parse_systemd("LoadState=loaded\nActiveState=active\nUnitFileState=enabled\n")
    assert plan_changes(_spec(state="started", enabled=True), "app", stopped).commands == [
        ["systemctl", "start", "--", "app"], ["systemctl", "enable", "--", "app"]]
    assert plan_changes(_spec(state="stopped", enabled=False), "app", running).commands == [
        ["systemctl", "stop", "--", "app"], ["systemctl", "disable", "--", "app"]]
    assert plan_changes(_spec(state="started", enabled=True), "app", running).commands == []
    assert plan_changes(_spec(state="restarted"), "app", running).commands == [["systemctl", "restart", "--", "app"]]
    assert plan_changes(_spec(state="reloaded"), "app", running).commands == [["systemctl", "reload", "--", "app"]]
    # Nothing to restart or reload in a stopped service: it is started.
    assert plan_changes(_spec(state="reloaded"), "app", stopped).commands == [["systemctl", "start", "--", "app"]]
    assert control(running, "app@2.service", "start") == ["systemctl", "start", "--", "app@2.service"]
    assert boot(running, "app", False) == [["systemctl", "disable", "--", "app"]]


def test_systemd_refuses_what_it_cannot_change() -> None:
    static = parse_systemd("LoadState=loaded\nActiveState=inactive\nUnitFileState=static\n")
    with pytest.raises(RunbookError, match="cannot make it enabled: the unit is static"):
        plan_changes(_spec(enabled=True), "app", static)
    assert plan_changes(_spec(state="started"), "app", static).commands == [["systemctl", "start", "--", "app"]]
    masked = parse_systemd("LoadState=masked\nActiveState=inactive\nUnitFileState=masked\n")
    with pytest.raises(RunbookError, match="masked"):
        plan_changes(_spec(state="started"), "app", masked)


def _sysv(status: str = "3", links: str = "", tools: str = "service\nupdate-rc.d", chkconfig: str = "") -> dict[str, str]:
    return {"init": "sysv", "script": "present", "tools": tools, "status": status, "links": links, "chkconfig": chkconfig}


def test_sysv_parsing_and_debian_command_lines() -> None:
    st = parse_sysv(_sysv("3"), "app")
    assert (st.backend, st.running, st.enabled) == ("sysv", False, False)
    assert plan_changes(_spec(state="started", enabled=True), "app.service", st).commands == [
        ["service", "app", "start"], ["update-rc.d", "app", "defaults"]]
    disabled = parse_sysv(_sysv("0", "K01app\nK01app\nK01app\nK01app"), "app")
    assert (disabled.running, disabled.enabled) == (True, False)
    assert plan_changes(_spec(enabled=True), "app", disabled).commands == [["update-rc.d", "app", "enable"]]
    enabled = parse_sysv(_sysv("0", "S01app\nS01app\nS01app\nS01app"), "app")
    assert plan_changes(_spec(state="stopped", enabled=False), "app", enabled).commands == [
        ["service", "app", "stop"], ["update-rc.d", "app", "disable"]]
    no_service = parse_sysv(_sysv("0", tools="update-rc.d"), "app")
    assert control(no_service, "app", "restart") == ["/etc/init.d/app", "restart"]


def test_sysv_chkconfig_command_lines_and_unknown_status() -> None:
    st = parse_sysv(_sysv("3", tools="service\nchkconfig", chkconfig="app 0:off 1:off 2:off 3:off 4:off 5:off 6:off"), "app")
    assert st.enabled is False
    assert plan_changes(_spec(enabled=True), "app", st).commands == [["chkconfig", "--add", "app"], ["chkconfig", "app", "on"]]
    on = parse_sysv(_sysv("0", tools="service\nchkconfig", chkconfig="app 0:off 1:off 2:on 3:on 4:on 5:on 6:off"), "app")
    assert plan_changes(_spec(enabled=False), "app", on).commands == [["chkconfig", "app", "off"]]
    with pytest.raises(RunbookError, match="exit status 4"):
        parse_sysv(_sysv("4"), "app")
    bare = parse_sysv(_sysv("3", tools="service"), "app")
    with pytest.raises(RunbookError, match="neither update-rc.d nor chkconfig"):
        plan_changes(_spec(enabled=True), "app", bare)


def test_service_plan_of_a_missing_service_reads_this_machine_read_only(tmp_path: Path) -> None:
    name = unique("rbt-nosvc")
    action, env = planned(tmp_path, {"name": "s", "service": {"name": name, "state": "started"}})
    pred = action.plan(env)
    assert pred.kind == PredictionKind.UNKNOWN and name in pred.reason and "earlier step" in pred.reason
    expected = "systemd" if Path("/run/systemd/system").is_dir() else "sysv"
    assert pred.data["backend"] == expected and pred.state


def test_service_rendered_name_is_checked_at_run_time(tmp_path: Path) -> None:
    action, env = planned(tmp_path, {"name": "s", "service": {"name": "{{ svc }}", "state": "started"}},
                          {"svc": "app; reboot"})
    with pytest.raises(RunbookError, match=r"web1: step `s`: service name .* rendered to 'app; reboot'"):
        action.plan(env)


def test_service_command_lines_quote_nothing_into_a_shell() -> None:
    st = parse_systemd("LoadState=loaded\nActiveState=inactive\nUnitFileState=disabled\n")
    for argv in plan_changes(_spec(state="started", enabled=True), "app", st).commands:
        assert shlex.split(shlex.join(argv)) == argv and all(not a.startswith("-") or a == "--" for a in argv[1:])


# --- package --------------------------------------------------------------------------------------------


APT_POLICY = """rbt-a:
  Installed: 1.0
  Candidate: 2.0
  Version table:
     2.0 500
        500 file:/tmp/repo ./ Packages
 *** 1.0 100
        100 /var/lib/dpkg/status
rbt-b:
  Installed: (none)
  Candidate: 3.1-2
rbt-c:
  Installed: (none)
  Candidate: (none)
"""


@pytest.mark.parametrize("name", ["x; rm -rf /", "$(id)", "-y", "--purge", "a b", "pkg=1.0", "a\nb", "../x", "", "p>1"])
def test_package_names_with_metacharacters_or_pins_are_refused_located(tmp_path: Path, name: str) -> None:
    found = problems(tmp_path, {"name": "p", "package": {"name": ["ok-pkg", name]}})
    assert len(found) == 1 and "invalid package name" in found[0] and ":7:7: error: `name`" in found[0], found


def test_package_spec_accepts_one_name_or_a_list() -> None:
    assert PackageSpec.model_validate({"name": "nginx"}).name == ["nginx"]
    assert PackageSpec.model_validate({"name": ["libc6:amd64", "g++", "python3.11"], "state": "latest"}).state == "latest"
    with pytest.raises(ValueError):
        PackageSpec.model_validate({"name": []})
    with pytest.raises(ValueError):
        PackageSpec.model_validate({"name": "nginx", "state": "installed"})


def test_apt_parsing() -> None:
    names = ["rbt-a", "rbt-b", "rbt-c", "rbt-d"]
    installed = "rbt-a\tall\tii \t1.0\nrbt-d\tamd64\trc \t0.5\n"   # rbt-d: removed, config files left
    pk = parse_apt(names, installed, APT_POLICY)
    assert pk.installed == {"rbt-a": "1.0", "rbt-b": None, "rbt-c": None, "rbt-d": None}
    assert pk.candidate == {"rbt-a": "2.0", "rbt-b": "3.1-2", "rbt-c": None, "rbt-d": None}
    assert parse_apt(["libc6:amd64"], "libc6\tamd64\tii \t2.36\n", "").installed == {"libc6:amd64": "2.36"}


def test_package_changes_per_state() -> None:
    pk = Packages("apt", {"a": "1.0", "b": None}, {"a": "2.0", "b": "3.0"})
    present = package_changes("present", pk)
    assert present.steps == [("install", ["b"])] and present.after == {"a": "1.0", "b": "3.0"}
    latest = package_changes("latest", pk)
    assert latest.steps == [("install", ["b"]), ("upgrade", ["a"])] and latest.after == {"a": "2.0", "b": "3.0"}
    absent = package_changes("absent", pk)
    assert absent.steps == [("remove", ["a"])] and absent.after == {"a": None, "b": None}
    assert package_changes("present", Packages("apt", {"a": "1"}, {"a": "2"})).steps == []
    assert package_changes("present", Packages("apt", {"x": None}, {"x": None})).missing == ["x"]
    # Installed and in no list: `latest` leaves it alone.
    assert package_changes("latest", Packages("apt", {"x": "1"}, {"x": None})).steps == []


def test_package_command_lines_per_manager() -> None:
    assert commands("apt", "install", ["a", "b"])[-3:] == ["--", "a", "b"]
    assert commands("apt", "install", ["a"]) == ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y", "-o",
                                                 "DPkg::Lock::Timeout=120", "-o", "Dpkg::Options::=--force-confdef",
                                                 "-o", "Dpkg::Options::=--force-confold", "install", "--", "a"]
    assert commands("apt", "upgrade", ["a"])[-3:] == ["install", "--", "a"]
    assert commands("apt", "remove", ["a"])[-3:] == ["remove", "--", "a"]
    assert commands("apt", "update", []) == ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "update"]
    assert commands("dnf", "install", ["a"]) == ["dnf", "-y", "-q", "install", "--", "a"]
    assert commands("yum", "upgrade", ["a"]) == ["yum", "-y", "-q", "upgrade", "--", "a"]
    assert commands("dnf", "remove", ["a"]) == ["dnf", "-y", "-q", "remove", "--", "a"]
    assert commands("dnf", "update", []) == ["dnf", "-y", "-q", "makecache"]
    assert commands("apk", "install", ["a"]) == ["apk", "add", "a"]
    assert commands("apk", "upgrade", ["a"]) == ["apk", "add", "-u", "a"]
    assert commands("apk", "remove", ["a"]) == ["apk", "del", "a"]
    assert commands("apk", "update", []) == ["apk", "update"]


def test_rpm_and_apk_parsing() -> None:
    pk = parse_rpm("dnf", ["bash", "nginx", "gone"], "bash\tx86_64\tii\t5.1.8-6.el9\n",
                   "bash\t5.1.8-9.el9\nnginx\t1:1.20.1-14.el9\n")
    assert pk.installed == {"bash": "5.1.8-6.el9", "nginx": None, "gone": None}
    assert pk.candidate == {"bash": "5.1.8-9.el9", "nginx": "1:1.20.1-14.el9", "gone": None}
    apk = parse_apk(["busybox", "curl", "py3-foo-bar"],
                    "busybox-1.36.1-r15 x86_64 {busybox} (GPL-2.0-only) [installed]\n",
                    "busybox-1.36.1-r16 x86_64 {busybox} (GPL-2.0-only) [upgradable from: busybox-1.36.1-r15]\n"
                    "curl-8.5.0-r0 x86_64 {curl} (curl)\npy3-foo-bar-2.0-r1 noarch {py3-foo-bar} (MIT)\n")
    assert apk.installed == {"busybox": "1.36.1-r15", "curl": None, "py3-foo-bar": None}
    assert apk.candidate == {"busybox": "1.36.1-r16", "curl": "8.5.0-r0", "py3-foo-bar": "2.0-r1"}


def test_apt_simulation_parsing() -> None:
    text = ("NOTE: This is only a simulation!\nInst libx (1.2 local [all])\nInst app [0.9] (1.0 local [all])\n"
            "Conf libx (1.2 local [all])\nRemv old [3.0]\n")
    assert simulated(text) == {"libx": (None, "1.2"), "app": ("0.9", "1.0"), "old": ("3.0", None)}


@pytest.mark.skipif(shutil.which("dpkg-query") is None or shutil.which("apt-cache") is None, reason="needs apt and dpkg")
def test_package_plans_read_this_machine_without_changing_it(tmp_path: Path) -> None:
    action, env = planned(tmp_path, {"name": "p", "package": {"name": "dpkg", "state": "present"}})
    pred = action.plan(env)
    assert pred.kind == PredictionKind.OK and pred.data["manager"] == "apt" and pred.data["before"]["dpkg"]
    missing = unique("rbt-nopkg")
    action, env = planned(tmp_path, {"name": "p", "package": {"name": missing}})
    pred = action.plan(env)
    assert pred.kind == PredictionKind.UNKNOWN and f"no candidate for {missing}" in pred.reason
    action, env = planned(tmp_path, {"name": "p", "package": {"name": "dpkg", "state": "absent"}})
    pred = action.plan(env)   # simulated only: removing dpkg is never done by a test
    assert pred.kind == PredictionKind.CHANGE and "-dpkg: " in (pred.diff or "") and "+dpkg: absent" in (pred.diff or "")


# --- group and user -------------------------------------------------------------------------------------

def _user(**kw: Any) -> UserSpec:
    return UserSpec.model_validate({"name": "app", **kw})


def _user_state(exists: bool = True, **kw: Any) -> UserState:
    sections = {"passwd": "app:x:1001:1001:App:/home/app:/bin/sh" if exists else "", "groups": "app adm",
                "primary": "app", "known_groups": "adm:4\nwww-data:33\napp:1001", "pgroup": "app:1001"}
    return parse_user({**sections, **kw})


@pytest.mark.parametrize("key,value", [("name", "x;id"), ("name", "-o"), ("name", "a b"), ("name", "x" * 40), ("name", "9x"),
                                       ("groups", ["ok", "$(id)"]), ("group", "a,b"), ("shell", "/bin/sh\n/x"),
                                       ("shell", "bin/sh"), ("home", "/home/a:b"), ("comment", "a\nb"), ("comment", "a:b")])
def test_user_fields_with_metacharacters_are_refused_located(tmp_path: Path, key: str, value: Any) -> None:
    found = problems(tmp_path, {"name": "u", "user": {"name": "app", key: value}} if key != "name" else
                     {"name": "u", "user": {"name": value}})
    assert len(found) == 1 and "invalid" in found[0] and str(tmp_path / "pb.yml") + ":" in found[0], found


def test_password_must_be_a_hash_and_is_never_echoed(tmp_path: Path) -> None:
    found = problems(tmp_path, {"name": "u", "user": {"name": "app", "password": "hunter2-plain"}})
    assert len(found) == 1 and "not a password hash" in found[0] and "hunter2" not in found[0], found
    for good in ("$6$salt$abcdefghijklmnopqrstuvwxyz./0123456789", "$y$j9T$abc$def", "!", "*", "!$6$s$h",
                 "$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaA", "ab01234567890"):
        assert UserSpec.model_validate({"name": "app", "password": good}).password == good
    for bad in ("", " ", "$6$salt$has space", "$6$a$b:c", "abc\n$6$x$y"):
        with pytest.raises(ValueError):
            UserSpec.model_validate({"name": "app", "password": bad})


def test_a_literal_password_hash_gets_a_validate_warning(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "u", "user": {"name": "app", "password": "$6$salt$abcdefgh"}})
    report = validate_playbook(path)
    assert report.errors == [] and [p.code for p in report.problems] == ["secret-in-playbook"]
    assert "$6$salt" not in report.problems[0].render() and report.problems[0].location.line == 6
    templated = validate_playbook(write(tmp_path, {"name": "u", "user": {"name": "app", "password": "{{ app_password }}"}}))
    assert [p.code for p in templated.problems] == ["undefined-variable"]   # the inventory or -e may define it


def test_user_state_parsing() -> None:
    st = _user_state()
    assert st.exists and st.facts == {"uid": "1001", "gid": "1001", "group": "app", "groups": "adm", "comment": "App",
                                      "home": "/home/app", "shell": "/bin/sh"}
    assert st.summary() == {"uid": 1001, "group": "app", "groups": ["adm"], "shell": "/bin/sh", "home": "/home/app",
                            "comment": "App"}
    assert st.known_groups == {"adm": "adm", "4": "adm", "www-data": "www-data", "33": "www-data", "app": "app", "1001": "app"}
    absent = _user_state(exists=False)
    assert not absent.exists and absent.summary() is None and absent.pgroup == ("app", "1001")


def test_user_command_lines() -> None:
    created = user_changes(_user(uid=1500, group="app", groups=["adm", "www-data"], shell="/bin/bash", home="/srv/app",
                                 comment="App user", system=True, password="$6$s$h"), "app", _user_state(exists=False))
    assert created.commands == [["useradd", "-u", "1500", "-s", "/bin/bash", "-d", "/srv/app", "-c", "App user", "-g", "app",
                                 "-G", "adm,www-data", "-r", "-m", "--", "app"], ["chpasswd", "-e"]]
    assert all("$6$" not in word for argv in created.commands for word in argv), "a hash on a command line"
    st = _user_state(password="same")
    assert user_changes(_user(shell="/bin/sh", groups=["adm"], password="$6$s$h"), "app", st).commands == []
    assert user_changes(_user(groups=["www-data"]), "app", st).commands == [["usermod", "-G", "www-data", "--", "app"]]
    assert user_changes(_user(groups=["www-data"], append=True), "app", st).commands == [
        ["usermod", "-a", "-G", "www-data", "--", "app"]]
    assert user_changes(_user(groups=[]), "app", st).commands == [["usermod", "-G", "", "--", "app"]]
    assert user_changes(_user(groups=["33"]), "app", st).commands == [["usermod", "-G", "www-data", "--", "app"]]
    assert user_changes(_user(groups=["33", "adm"]), "app", st).commands == [["usermod", "-G", "adm,www-data", "--", "app"]]
    assert user_changes(_user(password="$6$s$h"), "app", _user_state(password="differs")).commands == [["chpasswd", "-e"]]
    assert user_changes(_user(password="$6$s$h", update_password="on_create"), "app",
                        _user_state(password="differs")).commands == []
    assert user_changes(_user(state="absent", remove=True), "app", st).commands == [["userdel", "-r", "--", "app"]]
    assert user_changes(_user(state="absent"), "app", _user_state(exists=False)).commands == []


def test_user_refusals_and_missing_groups() -> None:
    assert user_changes(_user(groups=["nosuch"]), "app", _user_state()).missing == ["nosuch"]
    assert user_changes(_user(uid=0), "app", _user_state(uid_owner="root")).refusal == "uid 0 belongs to user root"
    assert "readable by root only" in user_changes(_user(password="$6$s$h"), "app", _user_state(password="unreadable")).refusal


def test_group_command_lines_and_parsing() -> None:
    absent = parse_group({"group": "", "gid_owner": ""})
    assert absent.gid is None and absent.lines() == ["absent"]
    assert group_commands(GroupSpec(name="ops", gid=2000, system=True), "ops", absent)[0] == [
        ["groupadd", "-g", "2000", "-r", "--", "ops"]]
    present = parse_group({"group": "ops:x:1500:alice,bob", "gid_owner": ""})
    assert present.gid == 1500
    assert group_commands(GroupSpec(name="ops", gid=2000), "ops", present)[0] == [["groupmod", "-g", "2000", "--", "ops"]]
    assert group_commands(GroupSpec(name="ops"), "ops", present)[0] == []
    assert group_commands(GroupSpec(name="ops", state="absent"), "ops", present)[0] == [["groupdel", "--", "ops"]]
    taken = parse_group({"group": "ops:x:1500:", "gid_owner": "staff"})
    assert group_commands(GroupSpec(name="ops", gid=50), "ops", taken)[2] == "gid 50 belongs to group staff"


@pytest.mark.parametrize("spec", [{"name": "a;b"}, {"name": "ops", "gid": -1}, {"name": "ops", "gid": True},
                                  {"name": "ops", "gid": 2**32}, {"name": "ops", "members": ["x"]}])
def test_group_spec_refuses_bad_input_located(tmp_path: Path, spec: dict[str, Any]) -> None:
    found = problems(tmp_path, {"name": "g", "group": spec})
    assert len(found) == 1 and str(tmp_path / "pb.yml") + ":" in found[0], found


def test_user_and_group_plans_read_this_machine(tmp_path: Path) -> None:
    action, env = planned(tmp_path, {"name": "u", "user": {"name": "root", "uid": 0}})
    assert action.plan(env).kind == PredictionKind.OK
    action, env = planned(tmp_path, {"name": "g", "group": {"name": "root", "gid": 0}})
    assert action.plan(env).kind == PredictionKind.OK
    name = unique("rbtu")
    action, env = planned(tmp_path, {"name": "u", "user": {"name": name, "shell": "/bin/sh"}})
    pred = action.plan(env)
    assert pred.kind == PredictionKind.CHANGE and pred.command == f"useradd -s /bin/sh -m -- {name}"
    assert pred.diff and pred.diff.splitlines()[3:] == ["-absent", "+present", "+shell: /bin/sh"]


# --- cron -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ({"name": "x", "job": "true\n* * * * * rm -rf /"}, "invalid cron job"),
    ({"name": "x", "job": "true\r"}, "invalid cron job"),
    ({"name": "x", "job": "a\x00b"}, "invalid cron job"),
    ({"name": "x", "job": ""}, "invalid cron job"),
    ({"name": "x", "job": "y" * 5000}, "invalid cron job"),
    ({"name": "x\n* * * * * evil", "job": "true"}, "invalid cron entry name"),
    ({"name": "# x", "job": "true"}, "invalid cron entry name"),
    ({"name": "x", "job": "true", "minute": "* * * * *"}, "invalid cron time field"),
    ({"name": "x", "job": "true", "hour": "1;id"}, "invalid cron time field"),
    ({"name": "x", "job": "true", "user": "root;id"}, "invalid user name"),
    ({"name": "x", "job": "true", "minute": 5, "special_time": "daily"}, "exclude each other"),
    ({"name": "x"}, "cron needs `job`"),
    ({"name": "x", "job": "true", "special_time": "often"}, "special_time"),
])
def test_cron_spec_refuses_bad_input_located(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    found = problems(tmp_path, {"name": "c", "cron": spec})
    assert len(found) == 1 and message in found[0] and str(tmp_path / "pb.yml") + ":" in found[0], found


def _cron(**kw: Any) -> CronSpec:
    return CronSpec.model_validate({"name": "backup", "job": "run-backup", **kw})


def test_cron_entry_lines() -> None:
    assert entry_line(_cron(minute=5, hour="2", weekday="mon-fri"), "run-backup") == "5 2 * * mon-fri run-backup"
    assert entry_line(_cron(special_time="reboot"), "run-backup") == "@reboot run-backup"
    assert entry_line(_cron(minute="*/10", disabled=True), "x") == "#*/10 * * * * x"
    assert _cron().state == "present" and _cron(state="absent", job=None).job is None


TABLE = "MAILTO=ops\n# runbook: other\n1 1 * * * other\n0 * * * * unmarked\n"


def test_cron_new_table_edits_only_the_marked_entry() -> None:
    added, current = new_table(TABLE, "backup", "5 2 * * * b")
    assert current is None and added == TABLE + "# runbook: backup\n5 2 * * * b\n"
    same, current = new_table(added, "backup", "5 2 * * * b")
    assert same is added and current == "5 2 * * * b"
    middle = "A=1\n# runbook: backup\n5 2 * * * b\nlast\n"
    assert new_table(middle, "backup", "6 2 * * * b") == ("A=1\n# runbook: backup\n6 2 * * * b\nlast\n", "5 2 * * * b")
    assert new_table(middle, "backup", None) == ("A=1\nlast\n", "5 2 * * * b")
    assert new_table(TABLE, "backup", None) == (TABLE, None)
    assert new_table("", "backup", "@daily b") == ("# runbook: backup\n@daily b\n", None)
    # Duplicated markers (someone copied the entry) become one; a marker without its entry is repaired.
    dup = "# runbook: backup\n1 * * * * b\n# runbook: backup\n2 * * * * b\n"
    assert new_table(dup, "backup", "1 * * * * b") == ("# runbook: backup\n1 * * * * b\n", "1 * * * * b")
    assert new_table("x\n# runbook: backup\n", "backup", "1 * * * * b") == ("x\n# runbook: backup\n1 * * * * b\n", None)
    # A marker of another name that starts the same is not ours.
    assert new_table("# runbook: backup2\n1 * * * * c\n", "backup", None)[1] is None
    # Other lines keep every byte, carriage returns and form feeds included.
    odd = "A=1\r\n0 * * * * x\x0cy\n"
    assert new_table(odd, "backup", "@daily b") == (odd + "# runbook: backup\n@daily b\n", None)
    # A table without a final newline is kept byte for byte when the entry is already right.
    table = "# runbook: backup\n1 * * * * b"
    assert new_table(table, "backup", "1 * * * * b") == (table, "1 * * * * b")


def test_cron_diff_shows_only_changed_lines() -> None:
    new, _ = new_table(TABLE, "other", "2 2 * * * other")
    diff = table_diff(TABLE, new, "crontab of app")
    assert diff.splitlines()[2:] == ["@@ -3 +3 @@", "-1 1 * * * other", "+2 2 * * * other"]
    assert "MAILTO" not in diff and "unmarked" not in diff
    assert table_diff("", "# runbook: x\n@daily x\n", "crontab").splitlines()[2:] == [
        "@@ -0,0 +1,2 @@", "+# runbook: x", "+@daily x"]


# --- one round trip -------------------------------------------------------------------------------------

class Counting(LocalConnection):
    """This machine, counting the commands it is asked to run."""

    def __init__(self) -> None:
        super().__init__("local")
        self.commands: list[Any] = []

    def run(self, command: Any, **kw: Any) -> Any:
        self.commands.append(command)
        return super().run(command, **kw)


@pytest.mark.parametrize("step", [
    {"service": {"name": "rbt-nosvc-x", "state": "started", "enabled": True}},
    {"package": {"name": ["dpkg", "coreutils"], "state": "present"}},   # a predicted apt change adds its simulation
    {"user": {"name": "root", "uid": 0, "groups": [], "shell": "/bin/bash"}},
    {"group": {"name": "root", "gid": 0}},
], ids=["service", "package", "user", "group"])
def test_a_plan_reads_in_one_round_trip(tmp_path: Path, step: dict[str, Any]) -> None:
    if "package" in step and shutil.which("dpkg-query") is None:
        pytest.skip("needs dpkg")
    pb = load_playbook(write(tmp_path, {"name": "s", **step}))
    action = action_for(pb.steps[0])
    conn = Counting()
    pred = action.plan(TaskEnv(step=pb.steps[0], host="web1", conn=ReadOnlyConnection(conn, allow_run=True), vars={}, playbook=pb))
    assert pred.kind in (PredictionKind.OK, PredictionKind.UNKNOWN, PredictionKind.CHANGE) and pred.state
    assert len(conn.commands) == 1 and conn.commands[0][:2] == ["sh", "-c"], conn.commands


def test_planned_changes_are_seen_only_by_later_steps_of_the_same_dry_run(tmp_path: Path) -> None:
    group = unique("rbtg")
    step = {"name": "u", "user": {"name": unique("rbtu"), "groups": [group]}}
    action, env = planned(tmp_path, step, {"run": {"id": "r1", "mode": "plan"}})
    assert action.plan(env).kind == PredictionKind.UNKNOWN
    record_planned(env, "group", group, {"gid": None})
    assert action.plan(env).kind == PredictionKind.CHANGE
    for other in ({"run": {"id": "r2", "mode": "plan"}}, {"run": {"id": "r1", "mode": "apply"}}):
        action, env = planned(tmp_path, step, other)
        assert action.plan(env).kind == PredictionKind.UNKNOWN and planned_state(env, "group", group) is None
    action, env = planned(tmp_path, step, {"run": {"id": "r1", "mode": "plan"}})
    record_planned(env, "group", group, ABSENT)
    assert action.plan(env).kind == PredictionKind.UNKNOWN
