"""SSHConnection against real OpenSSH servers on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from runbook.connections import TIMEOUT_RC, CommandResult, Connection, FileStat
from runbook.connections.ssh import SSHConnection, fingerprint
from runbook.errors import ConnectionFailed, HostKeyError, RunbookError
from tests.sshd import SSHHost, _children, _terminate, _wait_listening, find_sshd, free_port, write_known_hosts

pytestmark = pytest.mark.ssh


def connect(host: SSHHost, known_hosts: Path, **kwargs: object) -> SSHConnection:
    """Open a connection to a test host, trusting the given known_hosts file."""
    conn = SSHConnection(host.name, host.address, host.port, host.user, str(host.key_file),
                         known_hosts=str(known_hosts), connect_timeout=5.0, **kwargs)  # type: ignore[arg-type]
    conn.open()
    return conn


@pytest.fixture
def conn(ssh_host: SSHHost, known_hosts: Path) -> Iterator[SSHConnection]:
    c = connect(ssh_host, known_hosts)
    yield c
    c.close()


def host_fingerprint(host: SSHHost) -> str:
    key = paramiko.Ed25519Key(filename=str(host.host_key_file))
    return fingerprint(key)


def test_run_as_the_host_user_in_its_home(conn: SSHConnection, ssh_host: SSHHost) -> None:
    assert isinstance(conn, Connection) and conn.kind == "ssh"
    res = conn.run("id -un; pwd; echo err >&2; exit 3")
    assert isinstance(res, CommandResult)
    assert res.rc == 3
    user, login_dir = res.stdout.splitlines()
    assert user == ssh_host.user
    if os.geteuid() == 0:  # per-host users: each host logs in to its own home
        assert login_dir == str(ssh_host.home)
    assert res.stderr == "err\n"
    assert res.timed_out is False


def test_argv_words_are_never_resplit(conn: SSHConnection) -> None:
    words = ["a b", "$HOME", "*", "it's", 'say "hi"', "; rm -rf x", "", "\\n"]
    res = conn.run(["printf", "<%s>", *words])
    assert res.rc == 0, res.stderr
    assert res.stdout == "".join(f"<{w}>" for w in words)


def test_env_applies_and_output_decodes_with_replacement(conn: SSHConnection) -> None:
    res = conn.run('printf "%s|%s" "$ONE" "$TWO"', env={"ONE": "x y", "TWO": "$(id) 'q'"})
    assert res.stdout == "x y|$(id) 'q'"
    assert conn.run(["printf", "caf\\303\\251 \\377"]).stdout == "café \ufffd"


def test_stdin_and_eof(conn: SSHConnection) -> None:
    assert conn.run("wc -l", stdin="a\nb\nc\n").stdout.strip() == "3"
    big = "x" * 200_000 + "\n"
    assert conn.run("wc -c", stdin=big).stdout.strip() == str(len(big))
    # No stdin: the command sees EOF instead of hanging.
    assert conn.run("cat", timeout=10).stdout == ""


def test_large_output_on_both_streams(ssh_host: SSHHost, known_hosts: Path) -> None:
    both = "head -c 3000000 /dev/zero | tr '\\0' o; head -c 3000000 /dev/zero | tr '\\0' e >&2"
    # Under a limit that holds it, every byte of both streams arrives (no deadlock, no loss).
    with connect(ssh_host, known_hosts, output_limit=1_500_000) as roomy:
        res = roomy.run(both)
    assert res.rc == 0 and not res.truncated
    assert len(res.stdout) == 3_000_000 and set(res.stdout) == {"o"}
    assert len(res.stderr) == 3_000_000 and set(res.stderr) == {"e"}
    assert (res.stdout_bytes, res.stderr_bytes) == (3_000_000, 3_000_000)


MIB_190 = "\n... [runbook: 190.6 MiB of output omitted; 64 KiB head and tail kept] ...\n"
MIB_2_7 = "\n... [runbook: 2.7 MiB of output omitted; 64 KiB head and tail kept] ...\n"


def test_huge_output_keeps_a_bounded_head_and_tail(conn: SSHConnection) -> None:
    """200 MB on stdout, 3 MB on stderr: 64 KiB of head and tail each, exact counts, memory bounded while reading."""
    tracemalloc.start()
    try:
        res = conn.run("printf HEAD; head -c 200000000 /dev/zero; printf TAIL; "
                       "head -c 3000000 /dev/zero | tr '\\0' e >&2")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.rc == 0 and res.truncated and not res.timed_out
    assert (res.stdout_bytes, res.stderr_bytes) == (200_000_008, 3_000_000)
    assert res.stdout == "HEAD" + "\0" * 65532 + MIB_190 + "\0" * 65532 + "TAIL"
    assert res.stderr == "e" * 65536 + MIB_2_7 + "e" * 65536
    # Streamed away while reading: the controller never held more than a few channel windows.
    assert peak < 24 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_endless_output_under_a_timeout_stays_bounded(conn: SSHConnection) -> None:
    res = conn.run("yes", timeout=1)
    assert res.timed_out and res.rc == TIMEOUT_RC and res.truncated
    assert res.stdout_bytes > 2 * 65536
    assert len(res.stdout) < 2 * 65536 + 200
    assert res.stdout.startswith("y\ny\n") and res.stdout.endswith("y\n")
    assert conn.run("echo ok").stdout == "ok\n"


def test_output_limit_comes_from_connect_options(ssh_host: SSHHost, known_hosts: Path) -> None:
    from runbook.connections import ConnectOptions, connect as make

    class Host:
        name, address, port, user = ssh_host.name, ssh_host.address, ssh_host.port, ssh_host.user
        key_file, proxy_jump, vars = str(ssh_host.key_file), None, {}

    c = make(Host(), "ssh", ConnectOptions(known_hosts=str(known_hosts), output_limit=10))
    try:
        res = c.run("printf 0123456789; printf abcdefghijklmnopqrstuvwxyz; printf 9876543210")
    finally:
        c.close()
    assert res.stdout == "0123456789\n... [runbook: 26 bytes of output omitted; 10 bytes head and tail kept] ...\n9876543210"
    assert res.stdout_bytes == 46 and res.truncated


def test_signal_death_reports_128_plus_signal(conn: SSHConnection) -> None:
    assert conn.run("kill -KILL $$").rc == 128 + 9


def test_timeout_kills_the_remote_command(conn: SSHConnection, ssh_host: SSHHost) -> None:
    marker = ssh_host.home / "survived"
    res = conn.run(f"echo started; (sleep 2; touch {marker}) & sleep 30", timeout=0.5)
    assert res.timed_out is True
    assert res.rc == TIMEOUT_RC
    assert res.stdout == "started\n"
    # The whole remote process group is gone: nothing of it is left to create the marker.
    # ("[t]ouch" so that the probe's own command line does not match itself.)
    probe = conn.run(["pgrep", "-f", f"[t]ouch {marker}"])
    assert probe.rc == 1, probe.stdout
    # The connection is still usable after a timeout.
    assert conn.run("echo ok").stdout == "ok\n"


def test_concurrent_runs_share_one_connection(conn: SSHConnection) -> None:
    transport = conn._transport
    results: dict[int, CommandResult] = {}
    lock = threading.Lock()

    def work(i: int) -> None:
        res = conn.run(f"sleep 0.2; echo {i}")
        with lock:
            results[i] = res

    # More threads than sshd's MaxSessions (10): the connection queues them instead of failing.
    threads = [threading.Thread(target=work, args=(i,)) for i in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: (r.rc, r.stdout) for i, r in results.items()} == {i: (0, f"{i}\n") for i in range(14)}
    assert conn._transport is transport  # no reconnect, no new handshake


def test_fast_commands_in_parallel_never_drop_the_connection(conn: SSHConnection) -> None:
    """A command that ends before its EOF is sent must not make sshd drop the connection.

    paramiko sends a channel's EOF after releasing the channel lock; when the server's CLOSE of a
    fast command was handled in between, OpenSSH saw an EOF for a closed channel and disconnected
    ("ieof packet referred to nonexistent channel"), failing every command on the connection.
    """
    transport = conn._transport
    failures: list[str] = []

    def work() -> None:
        for _ in range(80):
            try:
                res = conn.run("true")
            except Exception as exc:   # recorded: a thread's exception must fail the test, not vanish
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if res.rc != 0:
                failures.append(res.stderr)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and conn._transport is transport and transport is not None and transport.is_active()


@contextmanager
def variant_sshd(host: SSHHost, directory: Path, *extra: str) -> Iterator[SSHHost]:
    """The test host's sshd configuration again, on a new port, with extra sshd_config lines (stopped on exit)."""
    config = (host.host_key_file.parent / "sshd_config").read_text()
    port = free_port()
    config = config.replace(f"Port {host.port}\n", f"Port {port}\n")
    config = config.replace(f"PidFile {host.host_key_file.parent / 'sshd.pid'}", f"PidFile {directory / 'sshd.pid'}")
    (directory / "sshd_config").write_text(config + "".join(line + "\n" for line in extra))
    proc = subprocess.Popen([find_sshd() or "sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if not _wait_listening(port, proc, 10.0):
            pytest.fail("the variant sshd did not start")
        yield SSHHost(name=f"{host.name}-variant", address=host.address, port=port, user=host.user, home=host.home,
                      key_file=host.key_file, host_public_key=host.host_public_key.replace(f":{host.port} ", f":{port} "),
                      host_key_file=host.host_key_file, process=proc)
    finally:
        _terminate(proc)


def test_a_session_freed_a_moment_ago_is_waited_for(ssh_host: SSHHost, tmp_path: Path) -> None:
    """sshd frees a closed session's slot a loop pass later: back-to-back commands at MaxSessions must not fail."""
    with variant_sshd(ssh_host, tmp_path, "MaxSessions 1") as tight:
        kh = write_known_hosts(tmp_path / "known_hosts", [tight])
        with connect(tight, kh, max_sessions=1) as c:
            results = [c.run("true").rc for _ in range(50)]   # without waiting, about half are refused here
    assert results == [0] * 50


def test_put_get_read_stat(conn: SSHConnection, ssh_host: SSHHost, tmp_path: Path) -> None:
    path = f"{ssh_host.home}/conf.txt"
    data = b"hello \x00\xff world\n"
    conn.put(data, path, mode=0o640)
    assert conn.read(path) == data
    st = conn.stat(path)
    assert st == FileStat(True, len(data), 0o640, hashlib.sha256(data).hexdigest())
    # Replace: atomic rename, previous mode kept, no temp file left behind.
    conn.put(b"v2\n", path)
    assert conn.read(path) == b"v2\n"
    assert conn.stat(path).mode == 0o640
    assert conn.run(["ls", "-A", str(ssh_host.home)]).stdout == "conf.txt\n"
    local = tmp_path / "fetched"
    conn.get(path, str(local))
    assert local.read_bytes() == b"v2\n"
    # Relative paths are relative to the login directory, for run and put alike.
    conn.put(b"rel\n", "rel.txt")
    assert conn.run("cat rel.txt").stdout == "rel\n"


def test_missing_paths(conn: SSHConnection, ssh_host: SSHHost, tmp_path: Path) -> None:
    missing = f"{ssh_host.home}/nope"
    assert conn.read(missing) is None
    assert conn.stat(missing) == FileStat(exists=False)
    assert conn.stat("/tmp/it's a \"strange\" name") == FileStat(exists=False)
    with pytest.raises(RunbookError):
        conn.get(missing, str(tmp_path / "x"))
    with pytest.raises(RunbookError) as info:
        conn.put(b"x", f"{ssh_host.home}/no/dir/file")
    assert "does not exist" in str(info.value)
    assert conn.run(["test", "-e", f"{ssh_host.home}/no"]).rc == 1


def test_stat_directory(conn: SSHConnection, ssh_host: SSHHost) -> None:
    conn.run(["mkdir", "-m", "750", f"{ssh_host.home}/d"])
    st = conn.stat(f"{ssh_host.home}/d")
    assert (st.exists, st.mode, st.sha256) == (True, 0o750, None)


def test_unknown_host_key_is_rejected_by_default(ssh_host: SSHHost, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError) as info:
        connect(ssh_host, empty)
    message = str(info.value)
    assert "unknown host key" in message
    assert host_fingerprint(ssh_host) in message
    assert info.value.hint
    assert not empty.exists()  # strict never writes


def test_accept_new_records_the_key_then_strict_trusts_it(ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    # Several hosts at once, as a parallel run would: every key is recorded, none lost.
    conns: list[SSHConnection] = []
    errors: list[BaseException] = []

    def first(host: SSHHost) -> None:
        try:
            conns.append(connect(host, kh, host_key_checking="accept-new"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first, args=(h,)) for h in ssh_hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c in conns:
        c.close()
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    lines = kh.read_text().splitlines()
    assert sorted(lines) == sorted(h.host_public_key for h in ssh_hosts)
    # OpenSSH agrees with what was written.
    for h in ssh_hosts:
        found = subprocess.run(["ssh-keygen", "-F", h.known_hosts_name, "-f", str(kh)], capture_output=True)
        assert found.returncode == 0
    again = connect(ssh_hosts[0], kh)  # strict now succeeds
    assert again.run("echo ok").stdout == "ok\n"
    again.close()
    assert len(kh.read_text().splitlines()) == len(ssh_hosts)  # nothing appended twice


@pytest.mark.parametrize("mode", ["strict", "accept-new"])
def test_changed_host_key_is_refused_with_both_fingerprints(ssh_host: SSHHost, tmp_path: Path, mode: str) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = other.with_suffix(".pub").read_text().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{ssh_host.known_hosts_name} {pub[0]} {pub[1]}\n")
    before = kh.read_text()
    with pytest.raises(HostKeyError) as info:
        connect(ssh_host, kh, host_key_checking=mode)
    message = str(info.value)
    assert "CHANGED" in message and ssh_host.known_hosts_name in message
    assert fingerprint(paramiko.Ed25519Key(filename=str(other))) in message   # the known one
    assert host_fingerprint(ssh_host) in message                              # the offered one
    assert kh.read_text() == before  # accept-new never overwrites a changed key


def test_off_accepts_any_key_and_writes_nothing(ssh_host: SSHHost, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    c = connect(ssh_host, kh, host_key_checking="off")
    assert c.run("echo ok").stdout == "ok\n"
    c.close()
    assert not kh.exists()


def test_invalid_host_key_mode() -> None:
    with pytest.raises(RunbookError) as info:
        SSHConnection("x", "127.0.0.1", host_key_checking="yes-please")
    assert "accept-new" in (info.value.hint or "")


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that is bound but not listening refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        c = SSHConnection("dead", "127.0.0.1", port, "nobody", known_hosts=str(tmp_path / "kh"), connect_timeout=3)
        with pytest.raises(ConnectionFailed) as info:
            c.open()
    assert not isinstance(info.value, HostKeyError)
    assert info.value.host == "dead"
    assert "refused" in info.value.reason
    assert info.value.hint


class SilentServer:
    """A loopback TCP server whose thread accepts connections and holds them, never speaking SSH (or only its banner)."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.banner:
                client.sendall(self.banner)
            self.accepted.append(client)   # and sleep on it: never another byte

    def client_hung_up(self, within: float = 10.0) -> bool:
        """Whether the first client closed its end (read to EOF past its own banner)."""
        client = self.accepted[0]
        client.settimeout(within)
        try:
            while client.recv(65536):
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        for s in [self.sock, *self.accepted]:
            s.close()


@pytest.mark.parametrize("banner", [b"", b"SSH-2.0-OpenSSH_9.6\r\n"], ids=["silent", "banner-then-silence"])
def test_server_that_never_completes_ssh_times_out_clearly(tmp_path: Path, banner: bytes) -> None:
    server = SilentServer(banner)
    try:
        c = SSHConnection("mute", "127.0.0.1", server.port, "nobody", known_hosts=str(tmp_path / "kh"), connect_timeout=0.5)
        with pytest.raises(ConnectionFailed) as info:
            c.open()
        assert not isinstance(info.value, HostKeyError)
        assert info.value.host == "mute"
        assert info.value.reason.startswith(f"timed out after 0.5s connecting to 127.0.0.1:{server.port} ("), info.value.reason
        assert "No existing session" not in str(info.value)
        assert info.value.hint and "ansible_port" in info.value.hint
        assert server.client_hung_up()   # nothing left holding the connection open
    finally:
        server.close()


def wait_for(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Poll a condition until it holds or `within` seconds pass (waits on the condition, asserts no time)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sessions(host: SSHHost) -> int:
    """sshd's per-connection processes for this host: one per TCP connection it still serves."""
    assert host.process is not None
    return len(_children(host.process.pid))


def test_refused_connections_are_closed_at_once(ssh_hosts: list[SSHHost], known_hosts: Path, tmp_path: Path) -> None:
    host = ssh_hosts[0]
    assert wait_for(lambda: sessions(host) == 0)
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    for _ in range(3):   # refused mid-handshake: paramiko's client would keep each TCP session open
        with pytest.raises(HostKeyError):
            connect(host, tmp_path / "empty_known_hosts")
    with pytest.raises(ConnectionFailed):
        SSHConnection(host.name, host.address, host.port, host.user, str(wrong), known_hosts=str(known_hosts),
                      connect_timeout=5).open()
    assert wait_for(lambda: sessions(host) == 0), f"{sessions(host)} connections left open on {host.name}"
    if len(ssh_hosts) > 1:   # a jump host's connection is closed with the target's
        target, jump = ssh_hosts[0], ssh_hosts[1]
        assert wait_for(lambda: sessions(jump) == 0)
        c = connect(target, known_hosts, proxy_jump=f"{jump.user}@{jump.address}:{jump.port}")
        assert c.run("true").rc == 0 and sessions(jump) == 1
        c.close()
        assert wait_for(lambda: sessions(jump) == 0), "the jump host's connection was left open"


def test_unresolvable_host(tmp_path: Path) -> None:
    c = SSHConnection("ghost", "no-such-host.invalid", 22, "nobody", known_hosts=str(tmp_path / "kh"), connect_timeout=3)
    with pytest.raises(ConnectionFailed) as info:
        c.open()
    assert "resolve" in info.value.reason


def test_authentication_failure(ssh_host: SSHHost, known_hosts: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    c = SSHConnection(ssh_host.name, ssh_host.address, ssh_host.port, ssh_host.user, str(wrong),
                      known_hosts=str(known_hosts), connect_timeout=5)
    with pytest.raises(ConnectionFailed) as info:
        c.open()
    assert not isinstance(info.value, HostKeyError)
    assert "authentication failed" in info.value.reason and ssh_host.user in info.value.reason
    assert info.value.hint


def test_connection_lost_is_reported(ssh_host: SSHHost, known_hosts: Path) -> None:
    c = connect(ssh_host, known_hosts)
    c._transport.close()  # the peer going away looks the same from here
    with pytest.raises(ConnectionFailed):
        c.run("true")
    c.close()
    c.close()  # twice is fine


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo is not installed on this machine")
def test_sudo_to_another_test_user(conn: SSHConnection, ssh_hosts: list[SSHHost]) -> None:
    if os.geteuid() != 0 or len(ssh_hosts) < 2:
        pytest.skip("per-host users (and the sudoers rule between them) need root and two hosts")
    other = ssh_hosts[1].user
    res = conn.run('echo "$(whoami) $HOME $X"', sudo=other, env={"X": "kept"})
    assert res.rc == 0, res.stderr
    assert res.stdout == f"{other} {ssh_hosts[1].home} kept\n"
    argv = conn.run(["whoami"], sudo=other, timeout=10)
    assert argv.stdout == f"{other}\n"
    # Never to root: the rule names the test users only, and -n fails instead of prompting.
    denied = conn.run("whoami", sudo=True)
    assert denied.rc != 0 and "root" not in denied.stdout


def test_proxy_jump_through_another_test_host(ssh_hosts: list[SSHHost], known_hosts: Path, tmp_path: Path) -> None:
    if len(ssh_hosts) < 2:
        pytest.skip("needs two test hosts")
    target, jump = ssh_hosts[0], ssh_hosts[1]
    spec = f"{jump.user}@{jump.address}:{jump.port}"
    c = connect(target, known_hosts, proxy_jump=spec)
    assert c.run("id -un").stdout == f"{target.user}\n"
    c.close()
    # The jump host's key is checked too: trusting only the target is not enough.
    only_target = write_known_hosts(tmp_path / "only_target", [target])
    with pytest.raises(HostKeyError) as info:
        connect(target, only_target, proxy_jump=spec)
    assert jump.known_hosts_name in str(info.value)


def test_output_benchmark_measures_one_bounded_run(ssh_hosts: list[SSHHost], known_hosts: Path) -> None:
    """benchmarks/output_bench.py's measuring path, at a tiny size, on the session's hosts (figures are not asserted)."""
    from benchmarks.output_bench import measure

    hosts = [{"name": h.name, "address": h.address, "port": h.port, "user": h.user, "key_file": str(h.key_file)}
             for h in ssh_hosts[:2]]
    run = measure({"kind": "ssh", "limit": 1000, "bytes": 1_000_000, "hosts": hosts, "known_hosts": str(known_hosts)})
    assert run["all_counted"] and run["truncated"] and run["hosts"] == len(hosts)
    assert run["kept_chars_per_host"] < 2 * 1000 + 200
    assert run["peak_rss_mib"] >= run["rss_before_commands_mib"] > 0
