"""The resource actions (file, copy, line, block, sysctl) on the local machine: real files, modes, owners, commands.

Each action is driven two ways: directly (plan through the dry run's read-only connection, apply
through the real one) and through the CLI (`plan` → `apply`, `run` twice), so that exact
predictions, idempotence, drift refusal and the dry run's chaining are all checked on disk.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.actions import Action, TaskEnv, action_for
from runbook.actions._resource import CHUNK_SCRIPT, INLINE_LIMIT, STATE_SCRIPT
from runbook.cli import main
from runbook.connections import CommandResult, ReadOnlyConnection
from runbook.connections.local import LocalConnection
from runbook.errors import RunbookError
from runbook.loader import load_playbook

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="owner changes and sudo to another user need root")
NOBODY = "nobody"
NOGROUP = grp.getgrgid(pwd.getpwnam(NOBODY).pw_gid).gr_name if ROOT else "nogroup"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


class Recording(LocalConnection):
    """A local connection that records every command it runs (to prove what a plan ran)."""

    def __init__(self) -> None:
        super().__init__("local")
        self.commands: list[list[str]] = []

    def run(self, command: str | Sequence[str], **kw: Any) -> CommandResult:
        self.commands.append([command] if isinstance(command, str) else list(command))
        return super().run(command, **kw)


def step_env(tmp_path: Path, step: dict[str, Any], vars: dict[str, Any] | None = None,
             conn: LocalConnection | None = None) -> tuple[Action, TaskEnv, TaskEnv]:
    """The action of a one-step playbook, an env for plan() (read-only, probes allowed) and one for apply()."""
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [{"name": "s", **step}]}, sort_keys=False))
    pb = load_playbook(path)
    real = conn or LocalConnection("local")
    ctx = {"dir": str(tmp_path), "inventory_hostname": "web1", "run": {"id": "t", "mode": "run"}, **(vars or {})}
    planning = ReadOnlyConnection(real, allow_run=True)
    return (action_for(pb.steps[0]),
            TaskEnv(step=pb.steps[0], host="web1", conn=planning, vars=ctx, playbook=pb),
            TaskEnv(step=pb.steps[0], host="web1", conn=real, vars=ctx, playbook=pb))


def both(tmp_path: Path, step: dict[str, Any], vars: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Plan then apply one step: (prediction, outcome)."""
    action, plan_env, apply_env = step_env(tmp_path, step, vars)
    return action.plan(plan_env), action.apply(apply_env)


def converge(tmp_path: Path, step: dict[str, Any], vars: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Plan and apply (which must match), then check the second apply and the next plan change nothing."""
    pred, out = both(tmp_path, step, vars)
    assert not out.failed, out.message
    assert pred.kind == ("change" if out.changed else "ok"), (pred.reason, out.message)
    again_pred, again = both(tmp_path, step, vars)
    assert not again.changed and not again.failed, again.message
    assert again_pred.kind == "ok", again_pred.reason
    return pred, out


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root: (mode, uid, size, mtime, bytes or link target)."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        out[str(p)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, body)
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, dict[str, Any], str]:
    """`runbook ARGS --output json` in process: (exit code, JSON, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args] + ["--output", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def by_step(doc: dict[str, Any], key: str = "results") -> dict[str, dict[str, Any]]:
    return {r["step_id"]: r for r in doc[key]}


@pytest.fixture(autouse=True)
def _audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path sits below a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="runbook-files-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- file ------------------------------------------------------------------------------------------


def test_file_directory_created_with_parents_and_mode_then_ok(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b" / "c"
    pred, out = converge(tmp_path, {"file": {"path": str(d), "state": "directory", "mode": "0750"}})
    assert pred.kind == "change" and "create directory" in pred.reason and "missing parents" in pred.reason
    assert "-state: absent\n+state: directory\n+mode: 0750\n" in pred.diff
    assert d.is_dir() and mode(d) == 0o750
    assert out.data["before"] == {"state": "absent"} and out.data["after"]["mode"] == "0750"
    # Only the difference is applied: a mode change is a chmod, reported before -> after.
    d.chmod(0o700)
    pred, out = converge(tmp_path, {"file": {"path": str(d), "state": "directory", "mode": "0750"}})
    assert pred.reason == f"{d}: mode 0700 -> 0750" and out.data["before"] == {"mode": "0700"}
    assert mode(d) == 0o750


def test_file_state_file_never_creates_and_fails_clearly(tmp_path: Path) -> None:
    pred, out = both(tmp_path, {"file": {"path": str(tmp_path / "nope"), "state": "file", "mode": "0600"}})
    assert pred.kind == "fail" and "does not exist" in pred.reason and "touch" in pred.reason
    assert out.failed and out.message.startswith("web1: ") and str(tmp_path / "nope") in out.message
    assert not (tmp_path / "nope").exists()
    (tmp_path / "d").mkdir()
    pred, out = both(tmp_path, {"file": {"path": str(tmp_path / "d"), "state": "file"}})
    assert pred.kind == "fail" and "is a directory, not a regular file" in pred.reason and out.failed


def test_file_touch_creates_once_and_never_bumps_times(tmp_path: Path) -> None:
    f = tmp_path / "t"
    converge(tmp_path, {"file": {"path": str(f), "state": "touch", "mode": "0604"}})
    assert f.read_bytes() == b"" and mode(f) == 0o604
    f.write_text("kept")
    os.utime(f, (1_000_000_000, 1_000_000_000))
    converge(tmp_path, {"file": {"path": str(f), "state": "touch", "mode": "0604"}})
    assert f.read_text() == "kept" and f.stat().st_mtime == 1_000_000_000
    pred, _ = both(tmp_path, {"file": {"path": str(tmp_path / "no" / "t"), "state": "touch"}})
    assert pred.kind == "fail" and "does not exist" in pred.reason


def test_file_link_created_retargeted_forced_and_refused(tmp_path: Path) -> None:
    link = tmp_path / "current"
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    pred, _ = converge(tmp_path, {"file": {"path": str(link), "state": "link", "src": "v1"}})
    assert pred.reason == f"create symlink {link} -> v1" and os.readlink(link) == "v1"
    pred, out = converge(tmp_path, {"file": {"path": str(link), "state": "link", "src": "v2"}})
    assert "-src: v1\n+src: v2\n" in pred.diff and os.readlink(link) == "v2"
    assert out.data["before"]["src"] == "v1" and out.data["after"]["src"] == "v2"
    # A symlink to nowhere is allowed (the target may come later); a file is replaced only with force.
    converge(tmp_path, {"file": {"path": str(tmp_path / "dangling"), "state": "link", "src": "/nowhere/at/all"}})
    (tmp_path / "plain").write_text("x")
    pred, out = both(tmp_path, {"file": {"path": str(tmp_path / "plain"), "state": "link", "src": "v1"}})
    assert pred.kind == "fail" and "force: true" in pred.reason and out.failed
    converge(tmp_path, {"file": {"path": str(tmp_path / "plain"), "state": "link", "src": "v1", "force": True}})
    assert os.readlink(tmp_path / "plain") == "v1"
    pred, out = both(tmp_path, {"file": {"path": str(tmp_path / "v2"), "state": "link", "src": "v1", "force": True}})
    assert pred.kind == "fail" and "directory" in pred.reason and (tmp_path / "v2").is_dir()


def test_file_absent_removes_a_tree_and_counts_it(tmp_path: Path) -> None:
    d = tmp_path / "old"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    (d / "g").write_text("y")
    (tmp_path / "keep").symlink_to(d / "g")
    pred, _ = converge(tmp_path, {"file": {"path": str(d), "state": "absent"}})
    assert pred.reason == f"remove directory {d} and the 3 entries below it"
    assert not d.exists() and (tmp_path / "keep").is_symlink()
    # A symlink is removed itself, never what it points to.
    (tmp_path / "target").write_text("stays")
    (tmp_path / "l").symlink_to(tmp_path / "target")
    pred, _ = converge(tmp_path, {"file": {"path": str(tmp_path / "l"), "state": "absent"}})
    assert pred.reason == f"remove link {tmp_path / 'l'}" and (tmp_path / "target").read_text() == "stays"
    with pytest.raises(RunbookError, match="refusing state: absent on /"):
        both(tmp_path, {"file": {"path": "/", "state": "absent"}})


@needs_root
def test_file_owner_and_group_by_name_or_number(tmp_path: Path) -> None:
    f = tmp_path / "owned"
    f.write_text("x")
    nobody = pwd.getpwnam(NOBODY)
    pred, out = converge(tmp_path, {"file": {"path": str(f), "owner": NOBODY, "group": NOGROUP}})
    assert pred.kind == "change" and "owner root -> nobody" in pred.reason
    assert (f.stat().st_uid, f.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert out.data["before"]["owner"] == "root" and out.data["after"]["owner"] == NOBODY
    # The same owner as a number is already true; an unknown name fails before anything runs.
    converge(tmp_path, {"file": {"path": str(f), "owner": str(nobody.pw_uid)}})
    pred, out = both(tmp_path, {"file": {"path": str(f), "owner": "no-such-user-rb"}})
    assert pred.kind == "fail" and "user 'no-such-user-rb': no such user" in pred.reason and out.failed


@needs_root
def test_file_recurse_sets_modes_and_owners_below(tmp_path: Path) -> None:
    d = tmp_path / "tree"
    (d / "a").mkdir(parents=True)
    (d / "a" / "f").write_text("x")
    (d / "link").symlink_to("/etc/passwd")
    etc_mode = mode(Path("/etc/passwd"))
    pred, _ = converge(tmp_path, {"file": {"path": str(d), "state": "directory", "recurse": True, "mode": "0750",
                                           "owner": NOBODY}})
    assert "2 entries below" in pred.reason and "differ in mode" in pred.reason
    assert all(mode(p) == 0o750 for p in (d, d / "a", d / "a" / "f"))
    assert (d / "a" / "f").stat().st_uid == pwd.getpwnam(NOBODY).pw_uid
    assert os.lstat(d / "link").st_uid == pwd.getpwnam(NOBODY).pw_uid      # the link itself (chown -h)
    assert mode(Path("/etc/passwd")) == etc_mode and Path("/etc/passwd").stat().st_uid == 0   # never through it


@needs_root
def test_file_without_root_predicts_the_failure_it_would_meet(open_dir: Path) -> None:
    tmp_path = open_dir
    # Run as nobody (sudo from root): changing the owner needs root, and a 0700 directory hides its entries.
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub").chmod(0o777)
    f = tmp_path / "pub" / "f"
    converge(tmp_path, {"sudo": NOBODY, "file": {"path": str(f), "state": "touch"}})
    assert f.stat().st_uid == pwd.getpwnam(NOBODY).pw_uid
    pred, out = both(tmp_path, {"sudo": NOBODY, "file": {"path": str(f), "owner": "root"}})
    assert pred.kind == "fail" and "needs root" in pred.reason and out.failed
    (tmp_path / "locked").mkdir(mode=0o700)
    pred, out = both(tmp_path, {"sudo": NOBODY, "file": {"path": str(tmp_path / "locked" / "x"), "state": "absent"}})
    assert pred.kind == "fail" and "may not be searched by user nobody" in pred.reason and "use sudo" in pred.reason
    assert out.failed and "web1" in out.message


@needs_root
def test_permission_failures_are_predicted_not_met(open_dir: Path) -> None:
    # As nobody in root's 0755 directory: no file may be created, replaced or removed there, and a
    # mode change needs the owner; each is a `fail` prediction, and the run fails the same way.
    (open_dir / "roots").write_text("root's\n")
    for step, words in (
            ({"copy": {"dest": str(open_dir / "new"), "content": "x"}}, "is not writable by user nobody (use sudo)"),
            ({"line": {"path": str(open_dir / "roots"), "line": "more"}}, "is not writable by user nobody"),
            ({"file": {"path": str(open_dir / "roots"), "state": "absent"}}, "is not writable by user nobody"),
            ({"file": {"path": str(open_dir / "d"), "state": "directory"}}, "is not writable by user nobody"),
            ({"file": {"path": str(open_dir / "roots"), "mode": "0600"}}, "needs its owner (root) or root")):
        pred, out = both(open_dir, {"sudo": NOBODY, **step})
        assert pred.kind == "fail" and words in pred.reason, (step, pred.reason)
        assert out.failed and str(open_dir) in out.message
    assert sorted(p.name for p in open_dir.iterdir()) == ["pb.yml", "roots"]
    assert (open_dir / "roots").read_text() == "root's\n" and mode(open_dir / "roots") == 0o644


def test_file_plan_runs_only_the_state_read(tmp_path: Path) -> None:
    conn = Recording()
    action, plan_env, _ = step_env(tmp_path, {"file": {"path": str(tmp_path / "x"), "state": "directory"}}, conn=conn)
    assert action.plan(plan_env).kind == "change"
    assert [c[2] for c in conn.commands] == [STATE_SCRIPT] and not (tmp_path / "x").exists()


@pytest.mark.parametrize("step", [
    {"copy": {"dest": "{{ dir }}/f", "content": "new\n", "mode": "0600"}},
    {"line": {"path": "{{ dir }}/f", "line": "x", "regexp": "^o"}},
    {"block": {"path": "{{ dir }}/f", "block": "x"}},
    {"sysctl": {"name": "vm.swappiness", "value": 1, "persist": "{{ dir }}/f"}},
    {"file": {"path": "{{ dir }}/f", "mode": "0600", "owner": "root"}},
], ids=lambda s: next(iter(s)))
def test_one_command_to_plan_two_to_apply(tmp_path: Path, step: dict[str, Any]) -> None:
    (tmp_path / "f").write_text("old\n")
    conn = Recording()
    action, plan_env, apply_env = step_env(tmp_path, step, conn=conn)
    assert action.plan(plan_env).kind in ("change", "fail")
    assert [c[2] for c in conn.commands] == [STATE_SCRIPT]
    conn.commands.clear()
    if action.apply(apply_env).changed:
        assert len(conn.commands) <= 2 + (next(iter(step)) == "sysctl"), conn.commands


# --- copy ------------------------------------------------------------------------------------------


def test_copy_content_diff_backup_and_attributes(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    step = {"copy": {"dest": str(dest), "content": "workers = {{ n }}\n", "mode": "0640", "backup": True}}
    pred, out = converge(tmp_path, step, {"n": 4})
    assert pred.reason == f"create {dest} (mode 0640)" and "+workers = 4\n" in pred.diff
    assert dest.read_text() == "workers = 4\n" and mode(dest) == 0o640
    pred, out = converge(tmp_path, step, {"n": 8})
    assert "-workers = 4\n+workers = 8\n" in pred.diff and out.diff == pred.diff
    backup = Path(out.data["backup"])
    assert backup.read_text() == "workers = 4\n" and backup.name.startswith("app.conf.") and backup.suffix == ".bak"
    assert out.data["before"]["sha256"] != out.data["after"]["sha256"]
    # Same content, other mode: a chmod, with an attribute diff and no rewrite.
    ino = dest.stat().st_ino
    pred, _ = converge(tmp_path, {"copy": {**step["copy"], "mode": "0600"}}, {"n": 8})
    assert pred.diff == f"--- {dest} (on host)\n+++ {dest} (after)\n-mode: 0640\n+mode: 0600\n"
    assert dest.stat().st_ino == ino and mode(dest) == 0o600
    assert not list(tmp_path.glob(".runbook-*")), "a temp file was left"


def test_copy_keeps_the_owner_and_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "kept"
    dest.write_text("old\n")
    dest.chmod(0o604)
    converge(tmp_path, {"copy": {"dest": str(dest), "content": "new\n"}})
    assert dest.read_text() == "new\n" and mode(dest) == 0o604


def test_copy_src_is_read_on_the_controller_and_declared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    step = {"copy": {"src": "files/blob.bin", "dest": str(tmp_path / "blob.bin")}}
    action, _, _ = step_env(tmp_path, step)
    assert action.local_sources() == ["files/blob.bin"]
    pred, _ = converge(tmp_path, step)
    assert "binary or large file" in pred.diff and (tmp_path / "blob.bin").read_bytes() == bytes(range(256)) * 4
    (tmp_path / "pb.yml").write_text(yaml.safe_dump({"runbook": "t", "steps": [
        {"name": "s", "copy": {"src": "files/missing", "dest": "/tmp/x"}}]}))
    code = main(["validate", str(tmp_path / "pb.yml")])
    assert code != 0 and "copy source `files/missing` is not a file" in "".join(capsys.readouterr())


@pytest.mark.parametrize("action", ["upload", "template", "copy"])
def test_a_value_cannot_walk_a_source_path_out_of_its_directory(tmp_path: Path, action: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`-e`, inventory values and alert labels are untrusted: `files/{{ name }}` picks a file below files/,
    never the control machine's keys; a path that starts with the value is the author's choice."""
    (tmp_path / "files" / "sub").mkdir(parents=True)
    (tmp_path / "files" / "sub" / "app.conf").write_text("port = 80\n")
    (tmp_path / "controller.key").write_text("PRIVATE\n")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "pb.yml").write_text(yaml.safe_dump({"runbook": "t", "steps": [
        {"name": "pick", action: {"src": "files/{{ name }}", "dest": str(out / "picked")}},
        {"name": "whole", "needs": [], action: {"src": "{{ where }}/app.conf", "dest": str(out / "whole")}}]}))
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    localhost: {ansible_connection: local}\n")

    def run(name: str) -> int:
        return main(["run", str(tmp_path / "pb.yml"), "-i", str(tmp_path / "inv.yml"), "--audit-log",
                     str(tmp_path / "audit.jsonl"), "-e", f"name={name}", "-e", f"where={tmp_path / 'files' / 'sub'}"])

    assert run("sub/app.conf") == 0
    assert (out / "picked").read_text() == (out / "whole").read_text() == "port = 80\n"
    capsys.readouterr()
    for hostile in ("../controller.key", "sub/../../controller.key", f"../../../../../..{tmp_path}/controller.key"):
        (out / "picked").unlink(missing_ok=True)
        assert run(hostile) == 2
        err = capsys.readouterr().err
        assert "is outside" in err and "Traceback" not in err, err
        assert not (out / "picked").exists()
    assert "PRIVATE" not in (tmp_path / "audit.jsonl").read_text()


def test_apply_refuses_a_copy_source_changed_after_the_review(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "app.conf").write_text("workers = 8\n")
    pb = tmp_path / "copy.yml"
    pb.write_text(yaml.safe_dump({"runbook": "c", "steps": [
        {"name": "conf", "copy": {"src": "app.conf", "dest": str(tmp_path / "out.conf")}}]}))
    code, plan, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0 and "+workers = 8\n" in plan["predictions"][0]["diff"], err
    (tmp_path / "app.conf").write_text("workers = 666\n")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 4 and "app.conf changed since the plan" in err and not (tmp_path / "out.conf").exists()


def test_copy_validate_failure_keeps_the_original(tmp_path: Path) -> None:
    conf = tmp_path / "sshd_config"
    good = f"HostKey {tmp_path}/hostkey\nPermitRootLogin no\n"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path}/hostkey >/dev/null")
    conf.write_text(good)
    pred, out = both(tmp_path, {"copy": {"dest": str(conf), "content": good + "NoSuchOption yes\n",
                                         "validate": f"{SSHD} -t -f %s"}})
    assert pred.kind == "change"                       # validation runs in apply only
    assert out.failed and "rejected the candidate" in out.message and "Bad configuration option" in out.message
    assert out.message.startswith(f"web1: {conf}: ") and "is untouched" in out.message
    assert conf.read_text() == good and not list(tmp_path.glob(".runbook-*"))
    _, out = both(tmp_path, {"copy": {"dest": str(conf), "content": good + "MaxAuthTries 3\n",
                                      "validate": f"{SSHD} -t -f %s"}})
    assert out.changed and not out.failed and conf.read_text().endswith("MaxAuthTries 3\n")


def test_copy_refuses_a_file_changed_between_read_and_write(tmp_path: Path) -> None:
    dest = tmp_path / "raced"
    dest.write_text("v1\n")
    action, _, apply_env = step_env(tmp_path, {"copy": {"dest": str(dest), "content": "v2\n"}})
    change = action.compute(apply_env)         # read: v1
    dest.write_text("someone else\n")          # changed before the write
    with pytest.raises(RunbookError, match="changed after it was read"):
        change.ops[0]()
    assert dest.read_text() == "someone else\n"


def test_copy_symlink_dest_replaced_or_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("real\n")
    (tmp_path / "via").symlink_to("real")
    pred, _ = converge(tmp_path, {"copy": {"dest": str(tmp_path / "via"), "content": "followed\n", "follow": True}})
    assert f"{tmp_path / 'real'}: content differs" in pred.reason
    assert (tmp_path / "via").is_symlink() and (tmp_path / "real").read_text() == "followed\n"
    pred, _ = converge(tmp_path, {"copy": {"dest": str(tmp_path / "via"), "content": "own file\n"}})
    assert pred.reason.startswith(f"replace symlink {tmp_path / 'via'} -> real with a file")
    assert not (tmp_path / "via").is_symlink() and (tmp_path / "real").read_text() == "followed\n"


def test_copy_large_files_are_read_in_pieces(tmp_path: Path) -> None:
    dest = tmp_path / "big.txt"
    old = "".join(f"line {i}\n" for i in range(20000))       # ~190 KiB: beyond one read, within the diff limit
    assert len(old) > INLINE_LIMIT
    dest.write_text(old)
    conn = Recording()
    new = old.replace("line 12345\n", "line 12345 changed\n")
    action, plan_env, _ = step_env(tmp_path, {"copy": {"dest": str(dest), "content": new}}, conn=conn)
    pred = action.plan(plan_env)
    assert "-line 12345\n+line 12345 changed\n" in pred.diff
    assert [c[2] for c in conn.commands].count(CHUNK_SCRIPT) >= 8
    converge(tmp_path, {"copy": {"dest": str(dest), "content": new}})
    assert dest.read_text() == new


@needs_root
def test_copy_owner_and_an_unreadable_file(open_dir: Path) -> None:
    tmp_path = open_dir
    dest = tmp_path / "secret.conf"
    converge(tmp_path, {"copy": {"dest": str(dest), "content": "k = v\n", "mode": "0600", "owner": NOBODY}})
    assert dest.stat().st_uid == pwd.getpwnam(NOBODY).pw_uid
    root_only = tmp_path / "root-only"
    root_only.write_text("x")
    root_only.chmod(0o600)
    pred, out = both(tmp_path, {"sudo": NOBODY, "copy": {"dest": str(root_only), "content": "y"}})
    assert pred.kind == "fail" and "cannot read" in pred.reason and "use sudo" in pred.reason and out.failed
    assert root_only.read_text() == "x"


# --- line ------------------------------------------------------------------------------------------

SSHD_CONFIG = "Port 22\n#PermitRootLogin prohibit-password\nPasswordAuthentication yes\nX11Forwarding yes\n"


@pytest.mark.parametrize("spec, expected, reason", [
    ({"regexp": "^#?PermitRootLogin", "line": "PermitRootLogin no"},
     SSHD_CONFIG.replace("#PermitRootLogin prohibit-password", "PermitRootLogin no"), "replace line 2"),
    ({"line": "MaxAuthTries 4"}, SSHD_CONFIG + "MaxAuthTries 4\n", "append the line"),
    ({"line": "MaxAuthTries 4", "insertafter": "^Port"}, SSHD_CONFIG.replace("Port 22\n", "Port 22\nMaxAuthTries 4\n"),
     "insert the line at line 2"),
    ({"line": "MaxAuthTries 4", "insertbefore": "BOF"}, "MaxAuthTries 4\n" + SSHD_CONFIG, "insert the line at line 1"),
    ({"line": "MaxAuthTries 4", "insertbefore": "^X11"}, SSHD_CONFIG.replace("X11", "MaxAuthTries 4\nX11"),
     "insert the line at line 4"),
    ({"line": "MaxAuthTries 4", "insertafter": "^NoMatch"}, SSHD_CONFIG + "MaxAuthTries 4\n", "append the line"),
    ({"regexp": "^(PasswordAuthentication) yes$", "line": r"\1 no", "backrefs": True},
     SSHD_CONFIG.replace("PasswordAuthentication yes", "PasswordAuthentication no"), "replace line 3"),
    ({"regexp": "^X11", "state": "absent"}, SSHD_CONFIG.replace("X11Forwarding yes\n", ""), "remove 1 line"),
    ({"line": "Port 22", "state": "absent"}, SSHD_CONFIG.replace("Port 22\n", ""), "remove 1 line"),
])
def test_line_edits_as_lineinfile_does(tmp_path: Path, spec: dict[str, Any], expected: str, reason: str) -> None:
    conf = tmp_path / "sshd_config"
    conf.write_text(SSHD_CONFIG)
    pred, out = converge(tmp_path, {"line": {"path": str(conf), **spec}})
    assert conf.read_text() == expected
    assert pred.reason == f"{conf}: {reason}" and out.diff == pred.diff


def test_line_no_match_cases_change_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "c"
    conf.write_text("PermitRootLogin no\nlast line without newline")
    for spec in ({"regexp": "^Nothing", "line": "x", "backrefs": True}, {"regexp": "^Nothing", "state": "absent"},
                 {"regexp": "^#PermitRootLogin", "line": "PermitRootLogin no"}):
        pred, out = both(tmp_path, {"line": {"path": str(conf), **spec}})
        assert pred.kind == "ok" and not out.changed, (spec, pred.reason)
    # Appending after a last line without a newline ends that line first.
    converge(tmp_path, {"line": {"path": str(conf), "line": "added"}})
    assert conf.read_text() == "PermitRootLogin no\nlast line without newline\nadded\n"


def test_line_create_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "new" / "dir" / "app.conf"
    pred, out = both(tmp_path, {"line": {"path": str(f), "line": "a = 1"}})
    assert pred.kind == "fail" and "create: true" in pred.reason and out.failed
    pred, _ = converge(tmp_path, {"line": {"path": str(f), "line": "a = 1", "create": True, "mode": "0600"}})
    assert pred.reason == f"create {f} (mode 0600): append the line" and f.read_text() == "a = 1\n" and mode(f) == 0o600
    converge(tmp_path, {"line": {"path": str(tmp_path / "absent.conf"), "regexp": "x", "state": "absent"}})
    assert not (tmp_path / "absent.conf").exists()


def test_line_validate_with_sshd_leaves_the_original_on_failure(tmp_path: Path) -> None:
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path}/hostkey >/dev/null")
    conf = tmp_path / "sshd config"           # a space in the name reaches sshd as one argument
    conf.write_text(f"HostKey {tmp_path}/hostkey\nPermitRootLogin yes\n")
    before = conf.read_bytes()
    pred, out = both(tmp_path, {"line": {"path": str(conf), "line": "PermitRootLogin maybe",
                                         "regexp": "^PermitRootLogin", "validate": f"{SSHD} -t -f %s"}})
    assert pred.kind == "change" and out.failed
    assert f"`{SSHD} -t -f %s` rejected the candidate" in out.message and 'unsupported option "maybe"' in out.message
    assert conf.read_bytes() == before and not list(tmp_path.glob(".runbook-*"))
    converge(tmp_path, {"line": {"path": str(conf), "line": "PermitRootLogin no", "regexp": "^PermitRootLogin",
                                 "validate": f"{SSHD} -t -f %s", "backup": True}})
    assert conf.read_text().endswith("PermitRootLogin no\n") and len(list(tmp_path.glob("sshd config.*.bak"))) == 1


def test_line_spec_errors_are_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spec, message in (({"path": "/x", "regexp": "(unclosed", "line": "a"}, "not a valid regular expression"),
                          ({"path": "/x"}, "state: present needs `line`"),
                          ({"path": "/x", "line": "a", "validate": "sshd -t"}, "needs %s"),
                          ({"path": "/x", "line": "a\nb"}, "manage several lines with `block`"),
                          ({"path": "/x", "line": "a", "insertafter": "x", "insertbefore": "y"}, "at most one")):
        (tmp_path / "pb.yml").write_text(yaml.safe_dump({"runbook": "t", "steps": [{"name": "s", "line": spec}]}))
        assert main(["validate", str(tmp_path / "pb.yml")]) == 4
        out = "".join(capsys.readouterr())
        assert message in out and "pb.yml:" in out, out


# --- block -----------------------------------------------------------------------------------------


def test_block_inserted_replaced_and_removed(tmp_path: Path) -> None:
    conf = tmp_path / "c"
    conf.write_text("a\nb\nc\n")
    step = {"block": {"path": str(conf), "block": "x = {{ x }}\ny = 2\n", "insertafter": "^a$"}}
    pred, _ = converge(tmp_path, step, {"x": 1})
    assert pred.reason == f"{conf}: insert the block at line 2 (2 lines)"
    assert conf.read_text() == "a\n# BEGIN MANAGED BY RUNBOOK\nx = 1\ny = 2\n# END MANAGED BY RUNBOOK\nb\nc\n"
    pred, _ = converge(tmp_path, step, {"x": 9})
    assert pred.reason == f"{conf}: replace the block (lines 2-5)" and "-x = 1\n+x = 9\n" in pred.diff
    # A second block with its own marker lives beside the first.
    converge(tmp_path, {"block": {"path": str(conf), "block": "z", "marker": "## {mark} z", "insertbefore": "BOF"}})
    assert conf.read_text().startswith("## BEGIN z\nz\n## END z\na\n")
    pred, _ = converge(tmp_path, {"block": {"path": str(conf), "state": "absent"}})
    assert pred.reason == f"{conf}: remove the block (lines 5-8)"
    assert conf.read_text() == "## BEGIN z\nz\n## END z\na\nb\nc\n"
    converge(tmp_path, {"block": {"path": str(conf), "marker": "## {mark} z", "block": ""}})   # empty block = absent
    assert conf.read_text() == "a\nb\nc\n"


def test_block_with_unpaired_markers_is_an_error_not_a_guess(tmp_path: Path) -> None:
    conf = tmp_path / "c"
    conf.write_text("# BEGIN MANAGED BY RUNBOOK\nhalf a block\n")
    action, plan_env, _ = step_env(tmp_path, {"block": {"path": str(conf), "block": "x"}})
    with pytest.raises(RunbookError, match="not one pair"):
        action.plan(plan_env)
    assert conf.read_text() == "# BEGIN MANAGED BY RUNBOOK\nhalf a block\n"
    action, plan_env, _ = step_env(tmp_path, {"block": {"path": str(tmp_path / "other"), "create": True,
                                                        "block": "a\n# END MANAGED BY RUNBOOK\nb"}})
    with pytest.raises(RunbookError, match="holds its own marker line"):
        action.plan(plan_env)


# --- sysctl ----------------------------------------------------------------------------------------


def test_sysctl_persist_file_only(tmp_path: Path) -> None:
    conf = tmp_path / "sysctl.d" / "60-test.conf"
    step = {"sysctl": {"name": "vm.swappiness", "value": 10, "persist": str(conf), "reload": False}}
    pred, _ = converge(tmp_path, step)
    assert pred.reason == f"create {conf}: add vm.swappiness = 10" and conf.read_text() == "vm.swappiness = 10\n"
    # Duplicates go (the last one would win at boot); spacing variants are already true.
    conf.write_text("# keep\nvm.swappiness=60\nvm/swappiness = 5\n")
    converge(tmp_path, step)
    assert conf.read_text() == "# keep\nvm.swappiness = 10\n"
    conf.write_text("vm.swappiness=10\n")
    pred, _ = both(tmp_path, step)
    assert pred.kind == "ok"
    converge(tmp_path, {"sysctl": {"name": "vm.swappiness", "state": "absent", "persist": str(conf)}})
    assert conf.read_text() == ""


def test_sysctl_names_cannot_leave_proc_sys(tmp_path: Path) -> None:
    for name in ("a.//.b", "../etc/passwd", "net.ipv4.$(id)", "-x", "a..b"):
        action, plan_env, _ = step_env(tmp_path, {"sysctl": {"name": name, "value": 1, "persist": False}})
        with pytest.raises(RunbookError, match="is not a sysctl name"):
            action.plan(plan_env)
    pred, out = both(tmp_path, {"sysctl": {"name": "net.no.such.key", "value": 1, "persist": False}})
    assert pred.kind == "fail" and "/proc/sys/net/no/such/key" in pred.reason and out.failed


def test_sysctl_running_value_compared_as_the_kernel_prints_it(tmp_path: Path) -> None:
    live = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    pred, _ = both(tmp_path, {"sysctl": {"name": "net.ipv4.ip_local_port_range", "value": " ".join(live.split()),
                                         "persist": False}})
    assert pred.kind == "ok" and "\t" in live


@pytest.mark.skipif(not (ROOT and os.access("/proc/sys/net/ipv4/tcp_keepalive_probes", os.W_OK)),
                    reason="needs a writable /proc/sys (root, not a read-only container)")
def test_sysctl_sets_the_running_value_and_persists_it(tmp_path: Path) -> None:
    proc = Path("/proc/sys/net/ipv4/tcp_keepalive_probes")
    original = proc.read_text().strip()
    other = "7" if original != "7" else "8"
    conf = tmp_path / "99-test.conf"
    try:
        pred, out = converge(tmp_path, {"sysctl": {"name": "net.ipv4.tcp_keepalive_probes", "value": other,
                                                   "persist": str(conf)}})
        assert pred.reason.startswith(f"net.ipv4.tcp_keepalive_probes: {original} -> {other} (running kernel); create")
        assert proc.read_text().strip() == other and conf.read_text() == f"net.ipv4.tcp_keepalive_probes = {other}\n"
        assert out.data["before"]["live"] == original and out.data["after"]["live"] == other
        # A value the kernel refuses fails the step, and the file is left as it was.
        _, out = both(tmp_path, {"sysctl": {"name": "net.ipv4.tcp_keepalive_probes", "value": "-5", "persist": str(conf)}})
        assert out.failed and "tcp_keepalive_probes" in out.message
        assert conf.read_text() == f"net.ipv4.tcp_keepalive_probes = {other}\n"
    finally:
        proc.write_text(original + "\n")


# --- the dry run through the CLI: chained predictions, plan -> apply, drift ----------------------------


def test_plan_chains_predictions_and_apply_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "srv" / "app"
    pb = tmp_path / "chain.yml"
    pb.write_text(yaml.safe_dump({"runbook": "chain", "steps": [
        {"name": "dir", "file": {"path": str(app / "conf.d"), "state": "directory", "mode": "0750"}},
        # force: false — created once, then edited below (a copy that rewrote it would undo the edits).
        {"name": "conf", "copy": {"dest": str(app / "conf.d" / "app.conf"), "content": "a = 1\nb = 2\n", "force": False}},
        {"name": "edit", "line": {"path": str(app / "conf.d" / "app.conf"), "regexp": "^b =", "line": "b = 3"}},
        {"name": "block", "block": {"path": str(app / "conf.d" / "app.conf"), "block": "c = 4"}},
        {"name": "link", "file": {"path": str(app / "current.conf"), "state": "link", "src": "conf.d/app.conf"}},
        {"name": "tidy", "file": {"path": str(app), "state": "directory", "recurse": True, "mode": "0750"}},
    ]}))
    before = tree(tmp_path)
    code, plan, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert {k: v for k, v in tree(tmp_path).items() if k in before or "srv" in k} == before, "the dry run wrote"
    assert code == 0, err
    preds = by_step(plan, "predictions")
    assert {k: p["prediction"] for k, p in preds.items()} == {k: "change" for k in preds}
    assert "-b = 2\n+b = 3\n" in preds["edit"]["diff"] and "+c = 4\n" in preds["block"]["diff"]
    assert "differ in mode" in preds["tidy"]["reason"]
    code, result, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert {k: r["status"] for k, r in by_step(result).items()} == {k: "changed" for k in preds}
    assert (app / "conf.d" / "app.conf").read_text() == (
        "a = 1\nb = 3\n# BEGIN MANAGED BY RUNBOOK\nc = 4\n# END MANAGED BY RUNBOOK\n")
    code, plan, _ = cli(capsys, "plan", pb)
    assert {p["prediction"] for p in plan["predictions"]} == {"ok"}
    code, result, _ = cli(capsys, "run", pb)
    assert code == 0 and {r["status"] for r in result["results"]} == {"ok"}


def test_apply_refuses_a_file_that_drifted_after_the_review(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "app.conf"
    conf.write_text("workers = 4\n")
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "d", "steps": [
        {"name": "workers", "line": {"path": str(conf), "regexp": "^workers", "line": "workers = 8"}}]}))
    code, _, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0, err
    conf.write_text("workers = 4\n# edited by hand\n")
    code, result, _ = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code != 0 and by_step(result)["workers"]["status"] == "drift"
    assert conf.read_text() == "workers = 4\n# edited by hand\n"


# --- attacks: hostile names, contents, owners and targets never reach a shell as code --------------------

HOSTILE = ["sp ace", "quo'te", 'dq"uote', "new\nline", "$(touch PWNED)", "`touch PWNED`", "semi;touch PWNED",
           "-rf", "star*", "back\\slash", "tab\tname", "ünï", "trailing-newline\n"]


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_names_and_contents_are_data(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = tmp_path / name
    f = d / name
    converge(tmp_path, {"file": {"path": str(d), "state": "directory", "mode": "0755"}})
    converge(tmp_path, {"copy": {"dest": str(f), "content": f"{name} $(touch PWNED) `id`\n", "backup": True,
                                 "validate": "grep -q PWNED %s"}})
    line = "x=" + name.replace("\n", " ")           # one line, whatever the name holds
    converge(tmp_path, {"line": {"path": str(f), "line": line, "insertbefore": "BOF"}})
    converge(tmp_path, {"block": {"path": str(f), "block": f"'{name}'\n\"$HOME\"", "marker": f"# {{mark}} {name!r}"}})
    converge(tmp_path, {"file": {"path": str(tmp_path / ("l" + name)), "state": "link", "src": name}})
    assert os.readlink(tmp_path / ("l" + name)) == name
    assert f.read_text().startswith(f"{line}\n{name} $(touch PWNED) `id`\n# BEGIN {name!r}\n'{name}'\n\"$HOME\"\n")
    converge(tmp_path, {"file": {"path": str(d), "state": "absent"}})
    assert not d.exists() and not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def test_hostile_owners_groups_and_modes_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    for owner in ("root:root", "-R", "$(id)", "a b", "x" * 40, ""):
        action, plan_env, _ = step_env(tmp_path, {"file": {"path": str(f), "owner": owner}})
        with pytest.raises(RunbookError, match="is not a valid user name"):
            action.plan(plan_env)
    action, plan_env, _ = step_env(tmp_path, {"copy": {"dest": str(f), "content": "x", "group": "g;id"}})
    with pytest.raises(RunbookError, match="is not a valid group name"):
        action.plan(plan_env)
    for path in ("relative/path", "", "-rf", "~other/x"):
        action, plan_env, _ = step_env(tmp_path, {"file": {"path": path or "{{ empty }}", "state": "touch"}}, {"empty": ""})
        with pytest.raises(RunbookError, match="path"):
            action.plan(plan_env)
    (tmp_path / "pb.yml").write_text(yaml.safe_dump({"runbook": "t", "steps": [
        {"name": "s", "file": {"path": "/x", "mode": "0644; rm -rf /"}}]}))
    assert main(["validate", str(tmp_path / "pb.yml")]) == 4 and "invalid mode" in "".join(capsys.readouterr())


def test_tilde_paths_are_the_home_of_the_user_the_step_runs_as(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    converge(tmp_path, {"copy": {"dest": "~/in-home.txt", "content": "home\n"}})
    assert (tmp_path / "in-home.txt").read_text() == "home\n"
    pred, _ = both(tmp_path, {"file": {"path": "~/in-home.txt", "mode": "0600"}})
    assert pred.reason == f"{tmp_path}/in-home.txt: mode 0644 -> 0600" or pred.reason.endswith("-> 0600")
