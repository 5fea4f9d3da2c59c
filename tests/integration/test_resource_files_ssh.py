"""file, copy, line, block and sysctl against real sshd hosts: plan ↔ outcome, idempotence, sudo, validate, attacks.

Each host logs in as its own test user (see tests/sshd.py); the harness lets a test user sudo to
the other test users (never to root), so `sudo: OTHER_USER` writes as that user here. Changing an
owner needs root, which no test user has over SSH: those changes are checked for the failure they
would meet (predicted and real), and the owner changes themselves in tests/test_actions_files.py
(local, as root). Likewise the running kernel value of a sysctl can only be set by root: over SSH
the running value is read and compared, and the persist file is written in the user's home.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.cli import main
from tests.sshd import SSHHost, write_inventory

pytestmark = pytest.mark.ssh

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, dict[str, Any], str]:
    """`runbook ARGS --output json` in process: (exit code, JSON document, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args] + ["--output", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def kinds(doc: dict[str, Any], key: str) -> dict[tuple[str, str], str]:
    field = "prediction" if key == "predictions" else "status"
    return {(r["host"], r["step_id"]): r[field] for r in doc[key]}


def by_key(doc: dict[str, Any], key: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["host"], r["step_id"]): r for r in doc[key]}


MATCH = {"change": "changed", "ok": "ok", "fail": "failed", "skip": "skipped"}


def assert_outcomes_match(plan: dict[str, Any], result: dict[str, Any]) -> None:
    """Every prediction came true, task for task; none was unknown."""
    got = kinds(result, "results")
    wrong = [f"{k}: predicted {v}, got {got.get(k)}" for k, v in kinds(plan, "predictions").items()
             if MATCH.get(v) != got.get(k)]
    assert not wrong, "\n".join(wrong)


def give(host: SSHHost, *paths: Path) -> None:
    """Hand files the test (root) wrote to the host's user."""
    pw = pwd.getpwnam(host.user)
    for p in paths:
        for dirpath, dirnames, filenames in os.walk(p) if p.is_dir() else [(str(p.parent), [], [p.name])]:
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                if name.startswith(str(host.home)):
                    os.lchown(name, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known_hosts: Path) -> Path:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.chdir(tmp_path)
    return known_hosts


def inventory(tmp_path: Path, hosts: list[SSHHost], extra: dict[str, dict] | None = None) -> Path:
    return write_inventory(tmp_path / "inventory.yml", hosts,
                           {h.name: {"home": str(h.home), **(extra or {}).get(h.name, {})} for h in hosts})


def playbook(tmp_path: Path, steps: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "resources", **top, "steps": steps}, sort_keys=False))
    return path


def converge(capsys: pytest.CaptureFixture[str], pb: Path, inv: Path, known: Path) -> tuple[dict, dict]:
    """plan → apply (outcomes as predicted) → run again (nothing changes) → plan (all ok)."""
    code, plan, err = cli(capsys, "plan", pb, "-i", inv, "--known-hosts", known, "--out", pb.with_suffix(".plan.json"))
    assert code in (0, 2), err
    code, result, err = cli(capsys, "apply", pb.with_suffix(".plan.json"), "--known-hosts", known, "-y")
    assert result, err
    assert_outcomes_match(plan, result)
    first = kinds(plan, "predictions")
    code, again, err = cli(capsys, "run", pb, "-i", inv, "--known-hosts", known)
    changed = {k: (r["status"], r["message"]) for k, r in by_key(again, "results").items()
               if first[k] != "fail" and r["status"] != "ok"}
    assert not changed, changed
    _, replan, _ = cli(capsys, "plan", pb, "-i", inv, "--known-hosts", known)
    assert {p for k, p in kinds(replan, "predictions").items() if first[k] != "fail"} <= {"ok"}
    return plan, result


# --- the happy path on three hosts at once ------------------------------------------------------------------


STEPS: list[dict[str, Any]] = [
    {"name": "conf dir", "id": "dir", "file": {"path": "{{ home }}/app/conf.d", "state": "directory", "mode": "0750"}},
    {"name": "app conf", "id": "conf", "copy": {"dest": "~/app/conf.d/app.conf", "mode": "0640", "backup": True,
                                                  "content": "name = {{ inventory_hostname }}\nworkers = {{ workers }}\n"}},
    {"name": "listen", "id": "listen", "line": {"path": "{{ home }}/app/conf.d/env", "regexp": "^LISTEN=",
                                                "line": "LISTEN=127.0.0.1:{{ port }}", "create": True}},
    {"name": "limits", "id": "limits", "block": {"path": "~/app/conf.d/env", "block": "MAX=10\nMIN=1",
                                                 "insertbefore": "^LISTEN="}},
    {"name": "current", "id": "link", "file": {"path": "~/app/current.conf", "state": "link", "src": "conf.d/app.conf"}},
    {"name": "stamp", "id": "stamp", "file": {"path": "~/app/stamp", "state": "touch", "mode": "0600"}},
    {"name": "old cache", "id": "cache", "file": {"path": "~/app/cache", "state": "absent"}},
    {"name": "kernel", "id": "sysctl", "sysctl": {"name": "net.ipv4.tcp_keepalive_time", "value": "{{ ka }}",
                                                  "persist": "~/sysctl.d/60-app.conf", "reload": False}},
]


def test_resources_converge_on_three_hosts(capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost],
                                           tmp_path: Path, env: Path) -> None:
    hosts = clean_ssh_hosts[:3]
    h0, h1, h2 = hosts
    # h1 already has an older config and a cache; h2 already has everything but one value.
    (h1.home / "app/conf.d").mkdir(parents=True)
    (h1.home / "app/conf.d/app.conf").write_text("name = h1\nworkers = 2\n")
    (h1.home / "app/cache/x").mkdir(parents=True)
    give(h1, h1.home / "app")
    inv = inventory(tmp_path, hosts, {h.name: {"port": 8000 + i} for i, h in enumerate(hosts)})
    pb = playbook(tmp_path, STEPS, vars={"workers": 4, "ka": 600})
    plan, result = converge(capsys, pb, inv, env)
    preds = kinds(plan, "predictions")
    assert set(preds.values()) == {"change", "ok"} and preds[(h0.name, "cache")] == "ok"
    assert preds[(h1.name, "cache")] == "change"
    diff = by_key(plan, "predictions")[(h1.name, "conf")]["diff"]
    assert "-workers = 2\n+workers = 4\n" in diff
    for i, h in enumerate(hosts):
        conf = h.home / "app/conf.d/app.conf"
        assert conf.read_text() == f"name = {h.name}\nworkers = 4\n"
        assert (h.home / "app/conf.d/env").read_text() == (
            f"# BEGIN MANAGED BY RUNBOOK\nMAX=10\nMIN=1\n# END MANAGED BY RUNBOOK\nLISTEN=127.0.0.1:{8000 + i}\n")
        assert stat.S_IMODE(conf.stat().st_mode) == 0o640 and conf.stat().st_uid == pwd.getpwnam(h.user).pw_uid
        assert stat.S_IMODE((h.home / "app/conf.d").stat().st_mode) == 0o750
        assert os.readlink(h.home / "app/current.conf") == "conf.d/app.conf"
        assert (h.home / "sysctl.d/60-app.conf").read_text() == "net.ipv4.tcp_keepalive_time = 600\n"
        assert not (h.home / "app/cache").exists()
    assert len(list((h1.home / "app/conf.d").glob("app.conf.*.bak"))) == 1   # only h1 had a file to keep
    # The results say what changed: attributes before/after, content as a diff.
    res = by_key(result, "results")
    assert res[(h0.name, "dir")]["data"]["after"] == {"state": "directory", "mode": "0750"}
    assert "+LISTEN=127.0.0.1:8000\n" in res[(h0.name, "listen")]["diff"]


def test_drift_between_review_and_apply_is_refused(capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost],
                                                   tmp_path: Path, env: Path) -> None:
    h0, h1 = clean_ssh_hosts[:2]
    for h in (h0, h1):
        (h.home / "motd").write_text("hello\n")
        give(h, h.home / "motd")
    inv = inventory(tmp_path, [h0, h1])
    pb = playbook(tmp_path, [{"name": "motd", "line": {"path": "~/motd", "line": "managed"}},
                             {"name": "mode", "file": {"path": "~/motd", "mode": "0600"}}])
    code, _, err = cli(capsys, "plan", pb, "-i", inv, "--known-hosts", env, "--out", tmp_path / "plan.json")
    assert code == 0, err
    (h1.home / "motd").write_text("hello\nedited after the review\n")
    code, result, _ = cli(capsys, "apply", tmp_path / "plan.json", "--known-hosts", env, "-y")
    got = kinds(result, "results")
    assert got[(h0.name, "motd")] == "changed" and got[(h1.name, "motd")] == "drift"
    assert (h1.home / "motd").read_text() == "hello\nedited after the review\n"
    assert (h0.home / "motd").read_text() == "hello\nmanaged\n"


# --- sudo, owners, unreadable state ---------------------------------------------------------------------------


@pytest.fixture
def shared(ssh_hosts: list[SSHHost]) -> Iterator[Path]:
    """A sticky world-writable directory both test users reach (like /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="runbook-shared-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_sudo_to_another_user_reads_and_writes_as_that_user(capsys: pytest.CaptureFixture[str],
                                                            clean_ssh_hosts: list[SSHHost], tmp_path: Path,
                                                            env: Path, shared: Path) -> None:
    h0, h1 = clean_ssh_hosts[:2]
    other = h1.user
    private = h1.home / "private"
    private.mkdir(mode=0o700)
    (private / "token").write_text("old\n")
    give(h1, private)
    (private / "token").chmod(0o600)
    inv = inventory(tmp_path, [h0])
    pb = playbook(tmp_path, [
        # As h0's own user, h1's private directory cannot be read: the plan says so, and so does the run.
        {"name": "peek", "copy": {"dest": str(private / "token"), "content": "new\n"}},
        # As h1's user (sudo), it is read and rewritten exactly.
        {"name": "as other", "needs": [], "sudo": other, "copy": {"dest": str(private / "token"), "content": "new\n"}},
        {"name": "shared file", "needs": [], "sudo": other,
         "copy": {"dest": str(shared / "by-other"), "content": "x\n", "mode": "0604"}},
        # Giving a file away needs root, which the test users do not have: predicted and real failure.
        {"name": "give away", "needs": ["shared-file"], "file": {"path": str(shared / "by-other"), "owner": h0.user}},
        {"name": "keep owner", "needs": ["shared-file"], "sudo": other,
         "file": {"path": str(shared / "by-other"), "owner": other, "mode": "0644"}},
    ])
    code, plan, err = cli(capsys, "plan", pb, "-i", inv, "--known-hosts", env, "--out", tmp_path / "plan.json")
    preds = by_key(plan, "predictions")
    assert preds[(h0.name, "peek")]["prediction"] == "fail"
    assert f"{private} may not be searched by the login user; use sudo" in preds[(h0.name, "peek")]["reason"]
    assert preds[(h0.name, "as-other")]["prediction"] == "change" and "-old\n+new\n" in preds[(h0.name, "as-other")]["diff"]
    assert preds[(h0.name, "give-away")]["prediction"] == "fail" and "needs root" in preds[(h0.name, "give-away")]["reason"]
    code, result, _ = cli(capsys, "apply", tmp_path / "plan.json", "--known-hosts", env, "-y")
    assert_outcomes_match(plan, result)
    assert (private / "token").read_text() == "new\n" and (private / "token").stat().st_uid == pwd.getpwnam(other).pw_uid
    assert (shared / "by-other").stat().st_uid == pwd.getpwnam(other).pw_uid
    assert stat.S_IMODE((shared / "by-other").stat().st_mode) == 0o644
    failed = by_key(result, "results")[(h0.name, "give-away")]["message"]
    assert failed.startswith(f"{h0.name}: ") and str(shared / "by-other") in failed


# --- validate runs on the host, before the original is replaced ----------------------------------------------------


def test_validate_with_sshd_on_the_host(capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost],
                                        tmp_path: Path, env: Path) -> None:
    h0 = clean_ssh_hosts[0]
    cfg = h0.home / "sshd" / "sshd_config"
    cfg.parent.mkdir()
    shutil.copyfile(h0.host_key_file, cfg.parent / "hostkey")
    original = f"HostKey {cfg.parent}/hostkey\nPermitRootLogin yes\n"
    cfg.write_text(original)
    give(h0, cfg.parent)
    (cfg.parent / "hostkey").chmod(0o600)
    inv = inventory(tmp_path, [h0])
    bad = playbook(tmp_path, [{"name": "bad", "block": {"path": str(cfg), "block": "NoSuchOption yes",
                                                        "validate": f"{SSHD} -t -f %s"}}])
    code, plan, _ = cli(capsys, "plan", bad, "-i", inv, "--known-hosts", env)
    assert kinds(plan, "predictions")[(h0.name, "bad")] == "change"
    code, result, _ = cli(capsys, "run", bad, "-i", inv, "--known-hosts", env)
    res = by_key(result, "results")[(h0.name, "bad")]
    assert code == 2 and res["status"] == "failed"
    assert f"{h0.name}: {cfg}: `{SSHD} -t -f %s` rejected the candidate" in res["message"]
    assert "Bad configuration option: NoSuchOption" in res["message"] and "is untouched" in res["message"]
    assert cfg.read_text() == original and sorted(p.name for p in cfg.parent.iterdir()) == ["hostkey", "sshd_config"]
    good = playbook(tmp_path, [{"name": "good", "line": {"path": str(cfg), "regexp": "^PermitRootLogin",
                                                         "line": "PermitRootLogin no", "validate": f"{SSHD} -t -f %s"}}])
    converge(capsys, good, inv, env)
    assert cfg.read_text() == f"HostKey {cfg.parent}/hostkey\nPermitRootLogin no\n"


# --- sysctl: the running value is read over SSH; only root may set it ------------------------------------------


def test_sysctl_running_value_over_ssh(capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost],
                                       tmp_path: Path, env: Path) -> None:
    h0 = clean_ssh_hosts[0]
    now = " ".join(Path("/proc/sys/net/ipv4/tcp_keepalive_probes").read_text().split())
    inv = inventory(tmp_path, [h0])
    pb = playbook(tmp_path, [
        {"name": "same", "sysctl": {"name": "net.ipv4.tcp_keepalive_probes", "value": now, "persist": "~/s.conf"}},
        {"name": "other", "sysctl": {"name": "net.ipv4.tcp_keepalive_probes", "value": str(int(now) + 1),
                                     "persist": False}},
        {"name": "missing", "needs": [], "sysctl": {"name": "net.ipv4.no_such_key", "value": 1, "persist": False}},
    ])
    code, plan, _ = cli(capsys, "plan", pb, "-i", inv, "--known-hosts", env, "--out", tmp_path / "plan.json")
    preds = by_key(plan, "predictions")
    assert preds[(h0.name, "same")]["prediction"] == "change"           # the running value is right; the file is new
    assert preds[(h0.name, "same")]["reason"].startswith(f"create {h0.home}/s.conf")
    assert preds[(h0.name, "other")]["prediction"] == "fail"
    assert "not writable by the login user: use sudo: true" in preds[(h0.name, "other")]["reason"]
    assert preds[(h0.name, "missing")]["prediction"] == "fail" and "/proc/sys/net/ipv4/no_such_key" in preds[
        (h0.name, "missing")]["reason"]
    code, result, _ = cli(capsys, "apply", tmp_path / "plan.json", "--known-hosts", env, "-y")
    assert_outcomes_match(plan, result)
    assert (h0.home / "s.conf").read_text() == f"net.ipv4.tcp_keepalive_probes = {now}\n"
    assert " ".join(Path("/proc/sys/net/ipv4/tcp_keepalive_probes").read_text().split()) == now


# --- attacks: hostile paths, contents and link targets over SSH ------------------------------------------------

HOSTILE = ["sp ace", "q'uote", 'd"q', "nl\nname", "$(touch PWNED)", "`touch PWNED`", "a;touch PWNED", "-n", "*",
           "back\\slash", "trail\n"]


def test_hostile_names_over_ssh(capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost],
                                tmp_path: Path, env: Path) -> None:
    h0 = clean_ssh_hosts[0]
    inv = inventory(tmp_path, [h0])
    steps: list[dict[str, Any]] = []
    for i, name in enumerate(HOSTILE):
        d = f"~/{name}"
        steps += [
            {"name": f"dir {i}", "file": {"path": d, "state": "directory", "mode": "0700"}},
            {"name": f"copy {i}", "copy": {"dest": f"{d}/{name}", "content": f"{name} $(touch PWNED) `id` ${{HOME}}\n",
                                           "validate": "test -s %s"}},
            {"name": f"line {i}", "line": {"path": f"{d}/e{name}", "line": "k=" + name.replace("\n", " "),
                                           "create": True}},
            {"name": f"block {i}", "block": {"path": f"{d}/e{name}", "block": f"'{name}'", "marker": f"# {{mark}} {i}",
                                             "insertbefore": "BOF"}},
            {"name": f"link {i}", "file": {"path": f"~/link{i}", "state": "link", "src": f"{name}/../{name}"}},
        ]
    pb = playbook(tmp_path, steps)
    converge(capsys, pb, inv, env)
    for i, name in enumerate(HOSTILE):
        assert (h0.home / name / name).read_text() == f"{name} $(touch PWNED) `id` ${{HOME}}\n"
        assert (h0.home / name / f"e{name}").read_text() == (
            f"# BEGIN {i}\n'{name}'\n# END {i}\nk={name.replace(chr(10), ' ')}\n")
        assert os.readlink(h0.home / f"link{i}") == f"{name}/../{name}"
    assert not list(h0.home.rglob("PWNED")) and not Path("/PWNED").exists()
    assert subprocess.run(["find", str(h0.home), "-name", ".runbook-*"], capture_output=True, text=True).stdout == ""


# --- the shipped ssh-hardening playbook: its `line` step adds a missing Include, checked by sshd -t ---------------

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
ROLE = "ssh-hardening/"   # the playbook runs the role roles/ssh-hardening: its step ids are namespaced


def _sshd_home(h: SSHHost, settings: str) -> Path:
    """An sshd config in the host's home that does not include the drop-in directory."""
    d = h.home / "sshd"
    (d / "conf.d").mkdir(parents=True)
    shutil.copyfile(h.host_key_file, d / "hostkey")
    (d / "sshd_config").write_text(f"HostKey {d}/hostkey\n{settings}")
    give(h, d)
    (d / "hostkey").chmod(0o600)
    return d


def test_ssh_hardening_enforce_adds_the_include_and_sshd_rejects_a_broken_one(
        capsys: pytest.CaptureFixture[str], clean_ssh_hosts: list[SSHHost], tmp_path: Path, env: Path) -> None:
    h0, h1 = clean_ssh_hosts[:2]
    d0 = _sshd_home(h0, "PermitRootLogin yes\n")
    d1 = _sshd_home(h1, "PermitRootLogin yes\n")
    (d1 / "conf.d" / "99-broken.conf").write_text("ThisIsNotAnOption yes\n")
    give(h1, d1 / "conf.d")
    originals = {h.name: (d / "sshd_config").read_text() for h, d in ((h0, d0), (h1, d1))}
    inv = inventory(tmp_path, [h0, h1], {h.name: {"dropin_path": f"{d}/conf.d/50-runbook-hardening.conf",
                                                  "reload_command": f"echo reload >> {d}/reloads.log"}
                                         for h, d in ((h0, d0), (h1, d1))})
    code, plan, err = cli(capsys, "plan", PLAYBOOKS / "ssh-hardening.yml", "-i", inv, "--known-hosts", env,
                          "-e", "mode=enforce", "-e", "sshd_config=~/sshd/sshd_config", "--out", tmp_path / "plan.json")
    include = {h: p for (h, s), p in by_key(plan, "predictions").items() if s == "ssh-hardening/include"}
    for h, d in ((h0, d0), (h1, d1)):
        assert include[h.name]["prediction"] == "change", include[h.name]
        assert f"+Include {d}/conf.d/*.conf\n" in include[h.name]["diff"]
    code, result, _ = cli(capsys, "apply", tmp_path / "plan.json", "--known-hosts", env, "-y")
    got = by_key(result, "results")
    # h0: the Include went in first, sshd -t accepted the whole candidate, and the controls now hold.
    assert got[(h0.name, ROLE + "include")]["status"] == "changed" and got[(h0.name, ROLE + "verify")]["status"] == "ok"
    assert (d0 / "sshd_config").read_text() == f"Include {d0}/conf.d/*.conf\n" + originals[h0.name]
    # h1: the broken drop-in it would include made sshd -t reject the candidate: sshd_config is as it
    # was, and the run rolled back the drop-in it had installed.
    assert got[(h1.name, ROLE + "include")]["status"] == "failed"
    message = got[(h1.name, ROLE + "include")]["message"]
    assert message.startswith(f"{h1.name}: {d1}/sshd_config: ") and "rejected the candidate" in message
    assert "Bad configuration option: ThisIsNotAnOption" in message and "is untouched" in message
    assert (d1 / "sshd_config").read_text() == originals[h1.name]
    assert got[(h1.name, ROLE + "rollback")]["status"] == "changed"   # the block's rescue
    assert got[(h1.name, ROLE + "enforce-failed")]["status"] == "failed"   # and the host stays failed
    assert not (d1 / "conf.d" / "50-runbook-hardening.conf").exists()
    assert not [p for p in d1.iterdir() if p.name.startswith(".runbook-")]
    # The reload handler ran where the new config held (h0), not on the host that failed (h1).
    assert (d0 / "reloads.log").read_text() == "reload\n" and not (d1 / "reloads.log").exists()
    # Planned again on h0: nothing left to do.
    _, again, _ = cli(capsys, "plan", PLAYBOOKS / "ssh-hardening.yml", "-i", inv, "--known-hosts", env, "-l", h0.name,
                      "-e", "mode=enforce", "-e", "sshd_config=~/sshd/sshd_config")
    assert by_key(again, "predictions")[(h0.name, ROLE + "include")]["prediction"] == "ok"
    assert by_key(again, "predictions")[(h0.name, ROLE + "install")]["prediction"] == "ok"
    assert by_key(again, "predictions")[(h0.name, "handler:" + ROLE + "reload")]["prediction"] == "skip"
