"""LocalConnection: the same contract the SSH connection keeps, checked on this machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import tracemalloc
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


# --- bounded output ---------------------------------------------------------------------------------

MIB_190 = "\n... [runbook: 190.6 MiB of output omitted; 64 KiB head and tail kept] ...\n"


def test_huge_output_keeps_a_bounded_head_and_tail(local: LocalConnection) -> None:
    """200 MB on stdout: 64 KiB of head and of tail, the exact count, and memory bounded while reading."""
    tracemalloc.start()
    try:
        res = local.run("printf HEAD; head -c 200000000 /dev/zero; printf TAIL; printf 'only this' >&2")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.rc == 0 and res.truncated and not res.timed_out
    assert (res.stdout_bytes, res.stderr_bytes) == (200_000_008, 9)
    assert res.stdout == "HEAD" + "\0" * 65532 + MIB_190 + "\0" * 65532 + "TAIL"
    assert res.stderr == "only this"           # a short stream beside a huge one is kept whole
    assert peak < 8 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_output_up_to_twice_the_limit_is_kept_whole(tmp_path: Path) -> None:
    conn = LocalConnection(output_limit=100)
    whole = conn.run("head -c 200 /dev/zero | tr '\\0' a")
    assert (whole.stdout, whole.stdout_bytes, whole.truncated) == ("a" * 200, 200, False)
    one_more = conn.run("head -c 201 /dev/zero | tr '\\0' a")
    assert one_more.truncated and one_more.stdout_bytes == 201
    assert one_more.stdout == "a" * 100 + "\n... [runbook: 1 bytes of output omitted; 100 bytes head and tail kept] ...\n" + "a" * 100


def test_cut_never_splits_a_character() -> None:
    conn = LocalConnection(output_limit=11)   # an odd limit cuts the 2-byte é in two at both ends
    res = conn.run(["sh", "-c", 'i=0; while [ $i -lt 100 ]; do printf "\\303\\251"; i=$((i+1)); done'])
    assert res.stdout_bytes == 200 and res.truncated
    assert "\ufffd" not in res.stdout
    head, tail = res.stdout.split("\n... [runbook: ")
    assert head == "é" * 5 and tail.endswith("kept] ...\n" + "é" * 5)
    assert "180 bytes of output omitted" in tail    # 200 - 2 x 10 bytes of whole characters kept


def test_endless_output_under_a_timeout_stays_bounded(local: LocalConnection) -> None:
    res = local.run("yes", timeout=1)
    assert res.timed_out and res.rc == TIMEOUT_RC and res.truncated
    assert res.stdout_bytes > 2 * 65536 and len(res.stdout) < 2 * 65536 + 200


def test_large_stdin_while_the_output_is_truncated(local: LocalConnection) -> None:
    data = "".join(f"{i:07d}\n" for i in range(250_000))      # 2 MB in, echoed back while it is still being written
    res = local.run("cat", stdin=data)
    assert res.rc == 0 and res.stdout_bytes == len(data) and res.truncated
    assert res.stdout.startswith("0000000\n0000001\n") and res.stdout.endswith("0249998\n0249999\n")


def test_command_that_stops_reading_its_stdin(local: LocalConnection) -> None:
    res = local.run("head -c 5", stdin="x" * 5_000_000, timeout=30)
    assert (res.rc, res.stdout, res.timed_out) == (0, "xxxxx", False)


def test_output_limit_comes_from_connect_options() -> None:
    from runbook.connections import ConnectOptions, connect

    class Host:
        name, address, port, user, key_file, proxy_jump, vars = "here", "localhost", None, None, None, None, {}

    conn = connect(Host(), "local", ConnectOptions(output_limit=3))
    assert conn.run("printf abcdefgh").stdout == "abc\n... [runbook: 2 bytes of output omitted; 3 bytes head and tail kept] ...\nfgh"
    assert ConnectOptions().output_limit == 65536


@pytest.mark.parametrize("limit", [0, -1, True, "64k", 1.5, None])
def test_invalid_output_limits_are_refused(limit: object) -> None:
    with pytest.raises(RunbookError) as info:
        LocalConnection(output_limit=limit)  # type: ignore[arg-type]
    assert "output limit" in str(info.value) and info.value.hint


def test_size_texts() -> None:
    from runbook.connections.output import size_text

    assert [size_text(n) for n in (0, 1023, 1024, 65536, 1536, 196_083_302, 5 * 2**40)] == [
        "0 bytes", "1023 bytes", "1 KiB", "64 KiB", "1.5 KiB", "187 MiB", "5 TiB"]


def test_results_built_by_other_kinds_count_their_own_bytes() -> None:
    res = CommandResult(0, "café", "", 0.1)
    assert (res.stdout_bytes, res.stderr_bytes, res.truncated) == (5, 0, False)
