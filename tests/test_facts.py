"""Facts: the gather script on this machine (LocalConnection), defensive parsing of hostile output, the run's store."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.connections.local import LocalConnection
from runbook.engine import ExecOptions, Executor
from runbook.events import EventStream, RunInfo
from runbook.facts import (GATHER_SCRIPT, MAX_MOUNTS, FactStore, Facts, FactsError, FactsView, gather, os_family,
                           os_release, parse_gather, route)
from runbook.inventory import Inventory
from runbook.loader import load_playbook
from runbook.results import RunMode, Status
from tests.helpers import cli


def sections(**raw: str) -> str:
    """A gather output with these raw sections."""
    return json.dumps(raw)


# --- the script, on this machine ---------------------------------------------------------------------


def test_the_gather_reports_this_machine() -> None:
    facts = gather("here", LocalConnection("here"))
    uname = os.uname()
    assert (facts.system, facts.kernel, facts.architecture) == (uname.sysname, uname.release, uname.machine)
    assert facts.hostname == socket.gethostname().split(".")[0] or facts.hostname == socket.gethostname()
    assert facts.cpu_count == len(os.sched_getaffinity(0)) or facts.cpu_count == os.cpu_count()
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert facts.memory_total_bytes == int(meminfo["MemTotal"].split()[0]) * 1024
    assert facts.memory_available_bytes is not None and 0 < facts.memory_available_bytes <= facts.memory_total_bytes
    root = next(m for m in facts.mounts if m.mount == "/")
    vfs = os.statvfs("/")
    assert root.size_bytes == pytest.approx(vfs.f_blocks * vfs.f_frsize, rel=0.01)
    assert root.fstype is not None and root.used_percent is not None
    assert facts.uid == os.getuid() and facts.user is not None
    release = os_release(Path("/etc/os-release").read_text())
    assert facts.distribution == release["ID"] and facts.distribution_version == release.get("VERSION_ID")
    assert facts.package_manager in ("apt", "dnf", "yum", "zypper", "apk", "pacman", None)
    assert isinstance(facts.can_sudo, bool)
    assert json.loads(json.dumps(facts.as_dict()))["mounts"][0]["mount"].startswith("/")


def test_the_script_escapes_whatever_the_host_prints(tmp_path: Path) -> None:
    # Commands the script calls print quotes, backslashes, control characters and fake section markers:
    # the output is still one JSON object, and the affected facts are null instead of wrong.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in {"hostname": 'evil"; rm -rf / #\\\\', "uname": '\\"}], "sudo": "yes\\n@sudo\\n|yes\x01\x1b[2J',
                       "getconf": "@cpus\n|99999"}.items():
        script = fake / name
        script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{text}'\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    conn = LocalConnection("evil")
    result = conn.run(GATHER_SCRIPT, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.rc == 0, result.stderr
    doc = json.loads(result.stdout)     # valid JSON, whatever was printed
    assert doc["hostname"].startswith('evil"')
    facts = parse_gather("evil", result.stdout)
    assert facts.hostname is None and facts.kernel is None and facts.system is None
    assert facts.cpu_count is None      # "@cpus" printed by a command is data, not a section
    assert any(p.startswith("hostname:") for p in facts.problems)


# --- parsing -------------------------------------------------------------------------------------------


def test_os_release_and_families() -> None:
    text = 'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\nPRETTY_NAME="Rocky \\"9\\""\n'
    release = os_release(text)
    assert release["ID"] == "rocky" and release["PRETTY_NAME"] == 'Rocky "9"'
    assert os_family("rocky", "rhel centos fedora", "Linux") == "redhat"
    assert os_family("neon", "ubuntu debian", "Linux") == "debian"
    assert os_family("mystery", None, "Linux") == "mystery"
    assert os_family(None, None, "Darwin") == "darwin"
    assert os_family(None, None, None) is None


def test_routes_are_parsed_and_checked() -> None:
    assert route("1.1.1.1 via 10.0.0.1 dev eth0 src 10.0.0.5 uid 0", 4).__dict__ == {
        "address": "10.0.0.5", "interface": "eth0", "gateway": "10.0.0.1"}
    assert route("1.1.1.1 dev wg0 src 10.9.0.2 uid 0", 4).gateway is None
    assert route("2001:4860:4860::8888 from :: via fe80::1 dev eth0 src 2001:db8::5 metric 1024", 6).address == "2001:db8::5"
    assert route("1.1.1.1 via 10.0.0.1 dev eth0 src 2001:db8::5", 4) is None      # wrong family
    assert route("1.1.1.1 dev $(reboot) src 10.0.0.5", 4).interface is None      # not an interface name
    assert route("", 4) is None


def test_mounts_with_spaces_escapes_and_junk() -> None:
    df = ("Filesystem 1024-blocks Used Available Capacity Mounted on\n"
          "/dev/sda1 1000 250 750 25% /\n"
          "/dev/sdb1 2000 2000 0 100% /mnt/my disk\n"
          "junk line\n"
          "/dev/x 10 notanumber 5 1% /x\n"
          "/dev/y 10 5 5 50% relative\n")
    facts = parse_gather("h", sections(df=df, fstypes="/ ext4\n/mnt/my\\040disk xfs"))
    assert [(m.mount, m.fstype, m.size_bytes, m.used_bytes, m.used_percent) for m in facts.mounts] == [
        ("/", "ext4", 1024000, 256000, 25.0), ("/mnt/my disk", "xfs", 2048000, 2048000, 100.0)]
    many = "header\n" + "".join(f"/dev/d{i} 10 5 5 50% /m{i}\n" for i in range(MAX_MOUNTS + 50))
    assert len(parse_gather("h", sections(df=many)).mounts) == MAX_MOUNTS


def test_memory_cpu_sudo_and_user_are_typed_or_null() -> None:
    facts = parse_gather("h", sections(meminfo="MemTotal: 2048 kB\nMemAvailable: 1024 kB", cpus="4", sudo="yes",
                                       user="deploy", uid="1001", init="systemd", pkg="apt-get"))
    assert (facts.memory_total_bytes, facts.memory_available_bytes, facts.cpu_count) == (2097152, 1048576, 4)
    assert (facts.can_sudo, facts.user, facts.uid, facts.init_system, facts.package_manager) == (
        True, "deploy", 1001, "systemd", "apt")
    odd = parse_gather("h", sections(meminfo="MemTotal: lots", cpus="-3", sudo="maybe", user="a b", uid="9" * 40,
                                     init="Sys V; rm", pkg="rpm-ostree"))
    assert (odd.memory_total_bytes, odd.cpu_count, odd.can_sudo, odd.user, odd.uid, odd.init_system,
            odd.package_manager) == (None, None, None, None, None, None, None)
    empty = parse_gather("h", "{}")
    assert empty == Facts() and empty.as_dict()["mounts"] == []


def test_free_text_loses_control_characters() -> None:
    facts = parse_gather("h", sections(os_release='PRETTY_NAME="Debian\x1b[2J\x07 12"\nID=debian'))
    assert facts.distribution_name == "Debian[2J 12" and facts.os_family == "debian"


@pytest.mark.parametrize("output, why", [
    ("not json at all", "not JSON"),
    ("[1, 2, 3]", "JSON list, not an object"),
    ('"just a string"', "JSON str, not an object"),
    ("[" * 100_000 + "]" * 100_000, "more than 64 KiB"),
    ("[" * 20_000 + "]" * 20_000, "not JSON"),
    ('{"hostname": "' + "x" * 70_000 + '"}', "more than 64 KiB"),
])
def test_hostile_output_is_a_clear_failure(output: str, why: str) -> None:
    with pytest.raises(FactsError) as err:
        parse_gather("web1", output)
    assert err.value.message.startswith("facts of web1: ") and why in err.value.message


def test_truncated_output_is_refused_and_values_of_other_types_are_ignored() -> None:
    with pytest.raises(FactsError, match="more than"):
        parse_gather("h", "{}", truncated=True)
    facts = parse_gather("h", json.dumps({"cpus": 4, "user": ["root"], "kernel": {"x": 1}, "hostname": "ok"}))
    assert (facts.cpu_count, facts.user, facts.kernel, facts.hostname) == (None, None, None, "ok")


def test_a_failing_script_is_reported_with_its_status() -> None:
    class Broken(LocalConnection):
        def run(self, command: Any, **kw: Any) -> Any:
            return super().run("echo 'sh: awk: not found' >&2; exit 127")

    with pytest.raises(FactsError, match=r"the gather script failed \(rc=127\): sh: awk: not found"):
        gather("h", Broken("h"))


# --- the run's store ---------------------------------------------------------------------------------------


def test_the_store_gathers_once_per_host_even_when_asked_at_once() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def slow(host: str, conn: Any) -> Facts:
        calls.append(host)
        gate.wait(1)
        return Facts(hostname=host)

    store = FactStore(gatherer=slow)
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda h=h: got.append(store.get(h, lambda: None).hostname))  # type: ignore[misc]
               for h in ("a", "a", "a", "b", "b")]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert sorted(calls) == ["a", "b"] and sorted(got) == ["a", "a", "a", "b", "b"] and store.gathers == 2


def test_a_failed_gather_is_kept_for_the_run() -> None:
    calls: list[str] = []

    def failing(host: str, conn: Any) -> Facts:
        calls.append(host)
        raise FactsError(host, "boom")

    store = FactStore(gatherer=failing)
    for _ in range(3):
        with pytest.raises(FactsError, match="boom"):
            store.get("a", lambda: None)
    assert calls == ["a"]


def test_the_store_ships_what_it_gathered() -> None:
    store = FactStore({"a": Facts(hostname="a", cpu_count=2)})
    copy = pickle.loads(pickle.dumps(store))
    assert copy.known("a") == Facts(hostname="a", cpu_count=2) and copy.known("b") is None
    assert copy.get("a", lambda: None).cpu_count == 2 and copy.gathers == 0


def test_facts_put_from_another_process_are_used_and_the_first_ones_stay() -> None:
    store = FactStore(gatherer=lambda host, conn: pytest.fail("gathered although known"))
    store.put("a", Facts(hostname="a", cpu_count=2))
    store.put("a", Facts(hostname="a", cpu_count=64))   # a later copy does not replace what tasks already read
    assert store.get("a", lambda: None).cpu_count == 2 and store.values("a")["cpu_count"] == 2 and store.gathers == 0


def test_the_view_gathers_on_first_read_only() -> None:
    store = FactStore(gatherer=lambda host, conn: Facts(hostname=host, kernel="6.1"))
    view = FactsView(store, "a", lambda: None)  # type: ignore[arg-type, return-value]
    assert store.gathers == 0
    assert view["kernel"] == "6.1" and dict(view)["hostname"] == "a" and store.gathers == 1
    assert len(view) == len(Facts().as_dict()) and store.gathers == 1


# --- in runs (local hosts) --------------------------------------------------------------------------------


class CountingGathers(LocalConnection):
    """Counts how often the gather script runs on each host."""

    gathered: dict[str, int] = {}

    def run(self, command: Any, **kw: Any) -> Any:
        if command == GATHER_SCRIPT:
            self.gathered[self.name] = self.gathered.get(self.name, 0) + 1
        return super().run(command, **kw)


def local_run(tmp_path: Path, steps: list[dict[str, Any]], mode: RunMode = RunMode.RUN, **top: Any) -> Any:
    hosts = {n: {"ansible_connection": "local"} for n in ("a", "b")}
    inv_path = tmp_path / "inv.yml"
    inv_path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    pb_path = tmp_path / "pb.yml"
    pb_path.write_text(yaml.safe_dump({"runbook": "t", **top, "steps": steps}, sort_keys=False))
    inv = Inventory.load(str(inv_path))
    book = load_playbook(pb_path)
    selected = inv.select(book.hosts)
    CountingGathers.gathered = {}
    info = RunInfo("t", mode, str(pb_path), "t", "", "", "", [h.name for h in selected], "me", "ctl", "strict")
    options = ExecOptions(mode=mode, connect=lambda h: CountingGathers(h.name), inventory_hosts=dict(inv.hosts))
    return Executor(book, selected, info, EventStream([]), options).execute()


def test_facts_true_gathers_once_per_host_before_the_first_step(tmp_path: Path) -> None:
    steps = [{"name": "one", "shell": "echo {{ facts.kernel }}"},
             {"name": "two", "needs": [], "shell": "echo {{ facts.architecture }}"},
             {"name": "three", "shell": "true"}]
    result = local_run(tmp_path, steps, facts=True)
    assert result.exit_code() == 0, result.as_dict()
    assert CountingGathers.gathered == {"a": 1, "b": 1}
    assert result.get("a", "one").stdout.strip() == os.uname().release
    assert result.get("b", "two").stdout.strip() == os.uname().machine


def test_without_facts_true_the_first_template_reading_facts_gathers(tmp_path: Path) -> None:
    result = local_run(tmp_path, [{"name": "plain", "shell": "true"}])
    assert CountingGathers.gathered == {}     # nothing reads them: no gather at all
    result = local_run(tmp_path, [
        {"name": "plain", "shell": "true"},
        {"name": "when", "when": "facts.system == 'Linux'", "shell": "echo {{ facts | to_json | quote }}"},
        {"name": "again", "print": "{{ facts.hostname }}"},
    ])
    assert result.exit_code() == 0, result.as_dict()
    assert CountingGathers.gathered == {"a": 1, "b": 1}
    assert json.loads(result.get("a", "when").stdout)["kernel"] == os.uname().release


def test_facts_in_a_dry_run(tmp_path: Path) -> None:
    marker = tmp_path / "created"
    result = local_run(tmp_path, [{"name": "on-linux", "when": "facts.system == 'Linux'",
                                   "shell": f"touch {marker}", "creates": str(marker)},
                                  {"name": "say", "print": "{{ facts.system }}"}], mode=RunMode.PLAN)
    assert not marker.exists()
    assert str(result.get("a", "on-linux").prediction) == "change"
    assert result.get("a", "say").message == os.uname().sysname
    assert CountingGathers.gathered == {"a": 1, "b": 1}


def test_a_failed_gather_fails_the_steps_that_need_it_clearly(tmp_path: Path) -> None:
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "t", "facts": True, "steps": [{"name": "x", "shell": "true"}]}))
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"a": {"ansible_connection": "local"}}}}))
    result = run(pb, str(inv), audit_log=str(tmp_path / "a.jsonl"), state_dir=str(tmp_path / "runs"))
    assert result.exit_code() == 0   # the real gather works here; now a host answers it with junk:

    class Hostile(LocalConnection):
        def run(self, command: Any, **kw: Any) -> Any:
            if command == GATHER_SCRIPT:   # a host that answers the gather with something else
                return super().run("printf '{\"hostname\": '; head -c 100000 /dev/zero | tr '\\0' x", **kw)
            return super().run(command, **kw)

    book = load_playbook(pb)
    selected = Inventory.load(str(inv)).select(book.hosts)
    info = RunInfo("t", RunMode.RUN, str(pb), "t", "", "", "", ["a"], "me", "ctl", "strict")
    res = Executor(book, selected, info, EventStream([]),
                   ExecOptions(connect=lambda h: Hostile(h.name))).execute()
    r = res.get("a", "x")
    assert r.status == Status.FAILED and "facts of a: the gather printed more than 64 KiB" in r.message, r.message


def test_facts_is_a_known_name_for_validate(tmp_path: Path) -> None:
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: t\nfacts: true\nsteps:\n  - name: x\n    when: facts.os_family == 'debian'\n    print: hi\n")
    proc = cli("validate", "--strict", str(pb))
    assert proc.returncode == 0, proc.stderr


def test_runbook_facts_on_local_hosts(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"a": {"ansible_connection": "local"}}}}))
    proc = cli("facts", "a", "-i", str(inv))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kernel"] == os.uname().release and set(doc) == set(Facts().as_dict())
    unknown = cli("facts", "b", "-i", str(inv))
    assert unknown.returncode == 4 and "unknown host `b`" in unknown.stderr and "Traceback" not in unknown.stderr
    ctl = cli("facts", "controller")
    assert ctl.returncode == 0 and json.loads(ctl.stdout)["architecture"] == os.uname().machine


def test_a_template_file_reading_facts_gathers_them(tmp_path: Path) -> None:
    (tmp_path / "motd.j2").write_text("kernel {{ facts.kernel }} on {{ facts.architecture }}\n")
    out = tmp_path / "motd-{{ inventory_hostname }}"
    result = local_run(tmp_path, [{"name": "motd", "template": {"src": str(tmp_path / "motd.j2"), "dest": str(out)}}])
    assert result.exit_code() == 0, result.as_dict()
    assert (tmp_path / "motd-a").read_text() == f"kernel {os.uname().release} on {os.uname().machine}\n"
    assert CountingGathers.gathered == {"a": 1, "b": 1}


def test_the_gather_is_one_round_trip(tmp_path: Path) -> None:
    calls: list[Any] = []

    class Recording(LocalConnection):
        def run(self, command: Any, **kw: Any) -> Any:
            calls.append(command)
            return super().run(command, **kw)

        def read(self, path: str) -> Any:
            calls.append(("read", path))
            return super().read(path)

        def stat(self, path: str) -> Any:
            calls.append(("stat", path))
            return super().stat(path)

    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "t", "facts": True, "steps": [
        {"name": "one", "print": "{{ facts.kernel }} {{ facts.mounts | length }} {{ facts.can_sudo }}"},
        {"name": "two", "print": "{{ facts.default_ipv4 }}"}]}))
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"a": {"ansible_connection": "local"}}}}))
    book = load_playbook(pb)
    info = RunInfo("t", RunMode.RUN, str(pb), "t", "", "", "", ["a"], "me", "ctl", "strict")
    result = Executor(book, Inventory.load(str(inv)).select("all"), info, EventStream([]),
                      ExecOptions(connect=lambda h: Recording(h.name))).execute()
    assert result.exit_code() == 0, result.as_dict()
    assert calls == [GATHER_SCRIPT]   # one command for every fact, nothing else touched the host
