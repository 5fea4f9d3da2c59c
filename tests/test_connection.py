"""LocalConnection: the same contract the SSH connection keeps, checked on this machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from runbook.connections import TIMEOUT_RC, CommandResult, Connection, FileStat
from runbook.connections.base import command_argv
from runbook.connections.local import LocalConnection
from runbook.errors import RunbookError


@pytest.fixture
def local() -> LocalConnection:
    conn = LocalConnection()
    conn.open()
    yield conn
    conn.close()


def test_is_a_connection(local: LocalConnection) -> None:
    assert isinstance(local, Connection)
    assert local.kind == "local"
    assert local.name == "localhost"


def test_run_shell_string_goes_through_sh(local: LocalConnection) -> None:
    res = local.run("echo out; echo err >&2; exit 3")
    assert isinstance(res, CommandResult)
    assert (res.rc, res.stdout, res.stderr, res.timed_out) == (3, "out\n", "err\n", False)
    assert res.duration >= 0


def test_run_argv_is_not_split_or_expanded(local: LocalConnection) -> None:
    res = local.run(["printf", "%s|", "a b", "$HOME", "*", "it's"])
    assert res.rc == 0
    assert res.stdout == "a b|$HOME|*|it's|"


def test_run_missing_program_is_rc_127_not_a_traceback(local: LocalConnection) -> None:
    res = local.run(["/nonexistent/program-rbt"])
    assert res.rc == 127
    assert "program-rbt" in res.stderr


def test_empty_argv_is_an_error(local: LocalConnection) -> None:
    with pytest.raises(RunbookError):
        local.run([])


def test_env_is_applied_and_names_are_checked(local: LocalConnection) -> None:
    res = local.run('printf "%s" "$GREETING"', env={"GREETING": "hello world; $(id)"})
    assert res.stdout == "hello world; $(id)"
    with pytest.raises(RunbookError) as info:
        local.run("true", env={"BAD NAME": "x"})
    assert info.value.hint


def test_stdin_is_fed_and_absent_stdin_is_eof(local: LocalConnection) -> None:
    assert local.run("cat", stdin="line1\nline2\n").stdout == "line1\nline2\n"
    # Without stdin the command sees EOF at once instead of hanging on a terminal.
    assert local.run("cat", timeout=10).stdout == ""


def test_output_is_decoded_with_replacement(local: LocalConnection) -> None:
    res = local.run(["printf", "caf\\303\\251 \\377"])
    assert res.stdout == "café \ufffd"


def test_timeout_kills_the_whole_process_group(local: LocalConnection, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    # The background child would write the marker after the timeout if it survived.
    res = local.run(f"(sleep 2; echo alive > {marker}) & echo started; sleep 30", timeout=0.5)
    assert res.timed_out is True
    assert res.rc == TIMEOUT_RC
    assert res.stdout == "started\n"
    # Wait on the child's lifetime, not the clock: once its group is gone, pgrep finds nothing.
    probe = local.run(["pgrep", "-f", f"echo alive > {marker}"])
    assert probe.rc == 1, probe.stdout
    assert not marker.exists()


def test_nonzero_rc_and_signal_death_do_not_raise(local: LocalConnection) -> None:
    assert local.run("exit 42").rc == 42
    assert local.run("kill -KILL $$").rc == 128 + 9


def test_concurrent_runs(local: LocalConnection) -> None:
    results: list[CommandResult] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        res = local.run(f"echo {i}")
        with lock:
            results.append(res)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r.stdout) for r in results) == list(range(8))


def test_sudo_argv_shapes() -> None:
    assert command_argv("id", None, False, False) == ["sh", "-c", "id"]
    assert command_argv(["id"], {"A": "1"}, True, False) == [
        "sudo", "-n", "-u", "root", "-H", "--", "env", "A=1", "id"]
    assert command_argv(["id"], None, "app", True) == [
        "sudo", "-S", "-p", "", "-u", "app", "-H", "--", "id"]


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="sudo to root without a password needs root here")
def test_sudo_to_root_keeps_env(local: LocalConnection) -> None:
    res = local.run('echo "$(id -un) $X"', sudo=True, env={"X": "kept"})
    assert res.rc == 0, res.stderr
    assert res.stdout == "root kept\n"


def test_put_is_atomic_and_sets_mode(local: LocalConnection, tmp_path: Path) -> None:
    target = tmp_path / "conf"
    local.put(b"one\n", str(target), mode=0o640)
    assert target.read_bytes() == b"one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    inode = target.stat().st_ino
    local.put(b"two\n", str(target))
    assert target.read_bytes() == b"two\n"
    # Replaced by rename (a new inode), and the previous mode was kept.
    assert target.stat().st_ino != inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    # No temporary file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


def test_put_creates_no_parent_directories(local: LocalConnection, tmp_path: Path) -> None:
    with pytest.raises(RunbookError) as info:
        local.put(b"x", str(tmp_path / "missing" / "file"))
    assert "does not exist" in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_read_get_and_missing(local: LocalConnection, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"\x00binary\xff")
    assert local.read(str(src)) == b"\x00binary\xff"
    assert local.read(str(tmp_path / "nope")) is None
    dest = tmp_path / "dest"
    local.get(str(src), str(dest))
    assert dest.read_bytes() == b"\x00binary\xff"
    with pytest.raises(RunbookError):
        local.get(str(tmp_path / "nope"), str(dest))


def test_stat(local: LocalConnection, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    f.chmod(0o604)
    assert local.stat(str(f)) == FileStat(True, 5, 0o604, hashlib.sha256(b"hello").hexdigest())
    d = local.stat(str(tmp_path))
    assert d.exists and d.sha256 is None and d.mode == stat.S_IMODE(tmp_path.stat().st_mode)
    assert local.stat(str(tmp_path / "nope")) == FileStat(exists=False)
    assert local.stat(str(f / "under-a-file")) == FileStat(exists=False)


def test_sudo_password_is_the_first_stdin_line_only_with_sudo() -> None:
    from runbook.connections.base import sudo_stdin

    assert sudo_stdin("app", "s3cret", "data\n") == b"s3cret\ndata\n"
    assert sudo_stdin(True, "s3cret", None) == b"s3cret\n"
    assert sudo_stdin(False, "s3cret", "data\n") == b"data\n"   # never leaked without sudo
    assert sudo_stdin("app", None, None) is None
