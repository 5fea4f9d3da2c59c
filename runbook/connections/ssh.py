"""`ssh`: one Fabric (paramiko) connection per host, with a strict host-key policy by default."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import select
import shlex
import socket
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import fabric
import paramiko

from runbook.connections.base import (TIMEOUT_RC, CommandResult, ConnectOptions, FileStat, HostLike, command_argv,
                                      save_read, sudo_stdin, sudo_words)
from runbook.connections.hostkeys import HOST_KEY_MODES, HostKeyPolicy, fingerprint, known_hosts_name
from runbook.connections.output import DEFAULT_OUTPUT_LIMIT, OutputCapture, check_output_limit, command_result
from runbook.errors import ConnectionFailed, RunbookError

__all__ = ["HOST_KEY_MODES", "SSHConnection", "fingerprint", "known_hosts_name"]

#: Seconds the client waits past a command's timeout for the remote `timeout` to report, before it
#: gives up on the channel itself (when the host has no `timeout` binary, or it hangs).
_CLIENT_GRACE = 2.0

#: OpenSSH's MaxSessions default is 10 channels per connection; SFTP takes one. Stay below it so
#: concurrent steps on one host wait for a free channel instead of failing to open one.
DEFAULT_MAX_SESSIONS = 8

# paramiko logs transport failures (refused, bad banner) at ERROR with tracebacks; we raise them as
# ConnectionFailed with a reason instead, so keep its records off the console's last-resort handler.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def _no_delay(conn: fabric.Connection | None) -> None:
    """Disable Nagle on the TCP sockets of a connection and its gateways.

    Without it each channel open waits for a delayed ACK (~40 ms a command on Linux); with it a
    command round trip on loopback is a few milliseconds.
    """
    while isinstance(conn, fabric.Connection):
        transport = conn.client.get_transport()
        sock = getattr(transport, "sock", None)
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        conn = conn.gateway


class MissingKeyPolicy(paramiko.MissingHostKeyPolicy):
    """paramiko's hook: its own store is kept empty, so every offered key comes here to be judged."""

    def __init__(self, policy: HostKeyPolicy) -> None:
        self.policy = policy

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Judge the key through the host's policy; raising refuses it."""
        self.policy.check(hostname, key)


class _HandshakeTimeout(TimeoutError):
    """The server accepted TCP but did not finish the SSH key exchange within the connect timeout."""


class _Transport(paramiko.Transport):
    """paramiko's transport, failing clearly when the handshake outlasts its timeout.

    paramiko's `start_client` returns quietly when its timeout passes mid-handshake, and the next
    call fails with "No existing session"; this raises a timeout instead.
    """

    def start_client(self, event: Any = None, timeout: float | None = None) -> None:
        super().start_client(event=event, timeout=timeout)
        if event is None and not self.initial_kex_done:
            raise _HandshakeTimeout("the SSH handshake did not complete")


def _transport_factory(preferred_types: Sequence[str]) -> Callable[..., paramiko.Transport]:
    """Make transports that negotiate the host key types known_hosts lists for the host first, as OpenSSH does.

    Without this a host known by its RSA key that also has an ed25519 key would offer the ed25519
    one, which is not in known_hosts: a false "changed key".
    """

    def make(sock: Any, **kwargs: Any) -> paramiko.Transport:
        transport = _Transport(sock, **kwargs)
        options = transport.get_security_options()
        available = list(options.key_types)
        first: list[str] = []
        for key_type in preferred_types:
            algorithms = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" else [key_type]
            first += [a for a in algorithms if a in available and a not in first]
        if first:
            options.key_types = first + [a for a in available if a not in first]
        return transport

    return make


def connect_error(who: str, exc: Exception, host: str, port: int | None, user: str | None,
                  timeout: float) -> ConnectionFailed:
    """Map paramiko and socket failures while connecting to a short reason and a hint."""
    where = f"{host}:{port}"
    timed_out = f"timed out after {timeout:g}s connecting to {where}"
    if isinstance(exc, _HandshakeTimeout):
        return ConnectionFailed(who, f"{timed_out} (the SSH handshake did not complete)",
                                hint="something accepts TCP on that port but does not answer as an SSH server in time: "
                                     "check the port (ansible_port), the server's load and its logs")
    if isinstance(exc, paramiko.AuthenticationException):
        if "timeout" in str(exc).lower():
            return ConnectionFailed(who, f"{timed_out} (authentication did not complete)",
                                    hint="the server is slow to authenticate (DNS, PAM): check its logs, or raise --connect-timeout")
        return ConnectionFailed(who, f"authentication failed for user {user} at {where}",
                                hint="check the user and private key (ansible_user, ansible_ssh_private_key_file)")
    if isinstance(exc, socket.gaierror):
        return ConnectionFailed(who, f"cannot resolve host {host}", hint="check ansible_host in the inventory, or DNS")
    if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, ConnectionRefusedError)):
        return ConnectionFailed(who, f"connection refused at {where}",
                                hint="is sshd running there, and is the port right (ansible_port)?")
    if isinstance(exc, TimeoutError):   # socket.timeout is TimeoutError: the TCP connect itself
        return ConnectionFailed(who, timed_out, hint="check the address, firewalls, and that the host is up")
    if isinstance(exc, paramiko.SSHException):
        # paramiko raises its banner errors from inside the failed read: the cause says which.
        if isinstance(exc.__context__, TimeoutError):
            return ConnectionFailed(who, f"{timed_out} (the server accepted the connection but sent no SSH banner)",
                                    hint="something accepts TCP on that port but does not speak SSH: check the port "
                                         "(ansible_port), the server's load and its logs")
        if isinstance(exc.__context__, EOFError):
            return ConnectionFailed(who, f"the server at {where} closed the connection before the SSH handshake",
                                    hint="sshd may be refusing connections (MaxStartups, tcp wrappers): check its logs")
        return ConnectionFailed(who, f"SSH error at {where}: {exc}",
                                hint="is this an SSH server? check the port and the server's logs")
    if isinstance(exc, OSError):
        return ConnectionFailed(who, f"cannot connect to {where}: {exc.strerror or exc}",
                                hint="check the address and the network")
    return ConnectionFailed(who, f"cannot connect to {where}: {exc}", hint="check the host's connection settings")


def open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
    """Open a session channel, retrying briefly when sshd refuses it for want of a free session.

    sshd frees a closed session's slot only in a later pass of its loop, so a new session asked for
    right after another one closed can still count against MaxSessions ("Connect failed").
    """
    for delay in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        try:
            return transport.open_session(timeout=timeout)
        except paramiko.ChannelException as exc:
            if exc.code != paramiko.common.OPEN_FAILED_CONNECT_FAILED or not transport.is_active():
                raise
        except paramiko.SSHException as exc:
            # paramiko keeps one refusal per transport: when two sessions are refused at once, the
            # second thread gets "Unable to open channel." without the reason. Same case, same retry.
            if str(exc) != "Unable to open channel." or not transport.is_active():
                raise
        time.sleep(delay)
    return transport.open_session(timeout=timeout)


def _shutdown_write(channel: paramiko.Channel) -> None:
    """Send EOF on a channel unless it is closed already, atomically with paramiko's own close.

    paramiko's `shutdown_write` builds the EOF under the channel lock but sends it after releasing
    it; a fast command's CLOSE handled in between makes the EOF arrive after the close, and OpenSSH
    drops the whole connection ("ieof packet referred to nonexistent channel"), killing every other
    command on it. Sending under the lock orders the two (paramiko sends its CLOSE after the lock).
    """
    with channel.lock:
        if channel.closed or channel.eof_sent:
            return
        message = channel._send_eof()
        if message is not None and channel.transport is not None:
            channel.transport._send_user_message(message)


def _feed_stdin(channel: paramiko.Channel, data: bytes | None) -> None:
    """Send the command's stdin and EOF (large input in a thread, so a command that writes first cannot deadlock us)."""
    if not data:
        _shutdown_write(channel)  # EOF at once: a command reading stdin must not hang
        return
    if len(data) <= 65536:
        channel.sendall(data)
        _shutdown_write(channel)
        return

    def feed() -> None:
        try:
            channel.sendall(data)
            _shutdown_write(channel)
        except (OSError, EOFError, paramiko.SSHException):
            pass
    threading.Thread(target=feed, daemon=True).start()


def collect(channel: paramiko.Channel, data: bytes | None, started: float, timeout: float | None,
            out: OutputCapture, err: OutputCapture) -> tuple[int, bool]:
    """Feed stdin, stream stdout and stderr into the captures until EOF and exit status, or the client deadline.

    Returns (exit status, timed out); -1 when the channel closed without a status.
    """
    _feed_stdin(channel, data)
    deadline = started + timeout + _CLIENT_GRACE if timeout is not None else None
    ready_fd = channel.fileno()  # readable whenever stdout or stderr has data, or at EOF

    def drain() -> None:
        # A bounded number of chunks per pass: a stream that never pauses must not keep the loop
        # from its deadline check (what is left is read on the next pass).
        for _ in range(64):
            if not channel.recv_ready():
                break
            out.feed(channel.recv(65536))
        for _ in range(64):
            if not channel.recv_stderr_ready():
                break
            err.feed(channel.recv_stderr(65536))

    while True:
        drain()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return TIMEOUT_RC, True
        wait = 1.0 if remaining is None else min(remaining, 1.0)
        if channel.eof_received or channel.closed:
            # Output is complete; the exit status may still be on its way.
            if channel.status_event.wait(wait):
                while channel.recv_ready() or channel.recv_stderr_ready():
                    drain()   # everything: the stream is complete
                return channel.recv_exit_status(), False
            continue
        select.select([ready_fd], [], [], wait)


def _signal(channel: paramiko.Channel, name: str) -> None:
    """Send a `signal` channel request (RFC 4254 6.9; OpenSSH 8.1+ delivers it to the session's process)."""
    msg = paramiko.Message()
    msg.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    msg.add_int(channel.remote_chanid)
    msg.add_string("signal")
    msg.add_boolean(False)
    msg.add_string(name)
    channel.transport._send_user_message(msg)


def parse_stat(res: CommandResult, remote_path: str, who: str) -> FileStat:
    """Read the output of SSHConnection.stat's script: `missing`, or `SIZE MODE_HEX` and a sha256sum line."""
    lines = res.stdout.split("\n")
    if res.rc == 0 and lines and lines[0] == "missing":
        return FileStat(exists=False)
    try:
        size_text, mode_hex = lines[0].split()
        raw_mode = int(mode_hex, 16)
        digest = lines[1].split()[0] if len(lines) > 1 and lines[1].strip() else None
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
            digest = None
        return FileStat(exists=True, size=int(size_text), mode=stat_mod.S_IMODE(raw_mode),
                        sha256=digest if stat_mod.S_ISREG(raw_mode) else None)
    except (ValueError, IndexError) as exc:
        raise RunbookError(f"{who}: cannot stat {remote_path}: {res.stderr.strip() or res.stdout.strip()}",
                           hint="the host needs GNU coreutils stat and sha256sum") from exc


class _SFTPFiles:
    """The files side of a connection: one SFTP client, opened on first use, shared behind a lock."""

    def __init__(self, who: str, transport: Callable[[], paramiko.Transport]) -> None:
        self.who = who
        self._transport = transport
        self._sftp: paramiko.SFTPClient | None = None
        # Reentrant: the first file call on an unopened connection opens it, which closes stale clients.
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the SFTP client, if one is open."""
        with self._lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:
                    pass
                self._sftp = None

    def _client(self) -> paramiko.SFTPClient:
        """The one SFTP client (opened on first use); call with the lock held."""
        if self._sftp is None:
            transport = self._transport()
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ConnectionFailed(self.who, f"cannot start SFTP: {exc}",
                                       hint="enable the sftp subsystem in the host's sshd_config") from exc
            if self._sftp is None:
                raise ConnectionFailed(self.who, "cannot start SFTP",
                                       hint="enable the sftp subsystem in the host's sshd_config")
        return self._sftp

    def put(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Upload atomically over SFTP: a temp file beside the target, chmod, then posix-rename."""
        directory, base = posixpath.split(remote_path)
        tmp = posixpath.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.rbtmp")
        with self._lock:
            sftp = self._client()
            try:
                if mode is None:
                    try:
                        current = sftp.stat(remote_path).st_mode
                        mode = stat_mod.S_IMODE(current) if current is not None else None
                    except FileNotFoundError:
                        mode = None  # a new file gets the server's default
                try:
                    with sftp.open(tmp, "wb") as handle:
                        handle.set_pipelined(True)
                        handle.write(data)
                    if mode is not None:
                        sftp.chmod(tmp, mode)
                    sftp.posix_rename(tmp, remote_path)
                except BaseException:
                    try:
                        sftp.remove(tmp)
                    except Exception:
                        pass
                    raise
            except FileNotFoundError as exc:
                raise RunbookError(f"{self.who}: cannot write {remote_path}: directory {directory or '.'} does not exist",
                                   hint="create the parent directory first (put creates no directories)") from exc
            except PermissionError as exc:
                raise RunbookError(f"{self.who}: cannot write {remote_path}: permission denied",
                                   hint="use a path the SSH user may write") from exc
            except OSError as exc:
                raise RunbookError(f"{self.who}: cannot write {remote_path}: {exc}",
                                   hint="check the path on the host") from exc

    def read(self, remote_path: str) -> bytes | None:
        """Return a remote file's bytes over SFTP, or None when it does not exist."""
        with self._lock:
            sftp = self._client()
            try:
                with sftp.open(remote_path, "rb") as handle:
                    handle.prefetch()
                    return handle.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise RunbookError(f"{self.who}: cannot read {remote_path}: {exc}",
                                   hint="check the path and its permissions") from exc


class SSHConnection:
    """One SSH connection (Fabric, paramiko underneath), opened once and shared by every call.

    Concurrent `run` calls from several threads each get their own channel on the one transport
    (no new handshake); file operations share one SFTP client behind a lock (`_SFTPFiles`).

    Command timeouts: the command runs under coreutils `timeout` on the host when it has one (so
    the remote process group is killed there, TERM then KILL a second later), and the client also
    closes the channel a little after the deadline, whichever comes first. A host without
    `timeout` may keep running a timed-out command after its channel is closed.
    """

    kind = "ssh"
    host_vars: ClassVar[tuple[str, ...]] = (
        "ansible_host", "ansible_port", "ansible_user", "ansible_ssh_private_key_file", "ansible_ssh_common_args",
        "ansible_become_password", "host", "port", "user", "ssh_private_key_file", "become_password")

    def __init__(self, name: str, host: str, port: int | None = 22, user: str | None = None,
                 key_filename: str | Sequence[str] | None = None, *,
                 host_key_checking: str = "strict", known_hosts: str | os.PathLike[str] | None = None,
                 connect_timeout: float = 10.0, keepalive: int = 15,
                 sudo_password: str | None = None, proxy_jump: str | None = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, output_limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.user = user
        self.key_filename = key_filename
        self.host_key_checking = host_key_checking
        self.known_hosts = Path(known_hosts).expanduser() if known_hosts else Path("~/.ssh/known_hosts").expanduser()
        self.host_keys = HostKeyPolicy(name, host_key_checking, self.known_hosts)   # validates the mode
        self.output_limit = check_output_limit(output_limit)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.sudo_password = sudo_password
        self.proxy_jump = proxy_jump
        self._fabric: fabric.Connection | None = None
        self._transport: paramiko.Transport | None = None
        self._open_lock = threading.Lock()
        self._files = _SFTPFiles(name, self._active_transport)
        self._sessions = threading.BoundedSemaphore(max(1, max_sessions))
        self._channels: set[paramiko.Channel] = set()   # commands running now (stopped on close)
        self._channels_lock = threading.Lock()

    @classmethod
    def for_host(cls, host: HostLike, options: ConnectOptions) -> SSHConnection:
        """An unopened connection to the host's resolved address, port, user, key and jump host."""
        return cls(host.name, host.address, port=host.port, user=host.user, key_filename=host.key_file,
                   host_key_checking=options.host_key_checking, known_hosts=options.known_hosts,
                   connect_timeout=options.connect_timeout, sudo_password=options.sudo_password,
                   proxy_jump=host.proxy_jump, output_limit=options.output_limit)

    def __repr__(self) -> str:
        return f"SSHConnection(name={self.name!r}, host={self.host!r}, port={self.port!r}, user={self.user!r})"

    def __enter__(self) -> SSHConnection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connecting ----------------------------------------------------------------------------

    def open(self) -> None:
        """Connect and authenticate once; later calls reuse the connection."""
        with self._open_lock:
            if self._transport is not None and self._transport.is_active():
                return
            self._close_quietly()
            connect_kwargs: dict[str, object] = {
                "banner_timeout": self.connect_timeout,
                "auth_timeout": self.connect_timeout,
            }
            if self.key_filename:
                connect_kwargs["key_filename"] = ([str(self.key_filename)] if isinstance(self.key_filename, (str, os.PathLike))
                                                  else [str(k) for k in self.key_filename])
            try:
                gateway = self._jump_host(connect_kwargs) if self.proxy_jump else None
                # fabric.Config loads ~/.ssh/config and /etc/ssh/ssh_config, so Host aliases,
                # HostName, User, Port, IdentityFile and ProxyJump work as with `ssh`.
                conn = fabric.Connection(self.host, user=self.user, port=self.port, config=fabric.Config(),
                                         gateway=gateway, connect_kwargs=connect_kwargs)
            except RunbookError:
                raise
            except Exception as exc:  # a malformed ssh_config or host string
                raise ConnectionFailed(self.name, f"invalid SSH settings: {exc}",
                                       hint="check ~/.ssh/config and the host's inventory variables") from exc
            # Fabric truncates its connect_timeout to an int (0.5 would mean "none"): set it as given.
            conn.connect_timeout = self.connect_timeout
            self._arm(conn)
            self._fabric = conn
            try:
                conn.open()
            except BaseException as exc:
                self._close_quietly()
                if isinstance(exc, RunbookError):
                    raise
                if isinstance(exc, Exception):
                    raise connect_error(self.name, exc, conn.host, conn.port, conn.user, self.connect_timeout) from exc
                raise
            transport = conn.client.get_transport()
            assert transport is not None
            if self.keepalive:
                transport.set_keepalive(int(self.keepalive))
            _no_delay(conn)
            self._transport = transport

    def _jump_host(self, key_kwargs: dict[str, object]) -> fabric.Connection:
        """A Fabric connection to the ProxyJump host `[user@]host[:port]`, with the same key."""
        jump = fabric.Connection(str(self.proxy_jump), config=fabric.Config(), connect_kwargs=dict(key_kwargs))
        jump.connect_timeout = self.connect_timeout
        return jump

    def _arm(self, conn: fabric.Connection) -> None:
        """Put this host's key policy on a connection and its gateways, in place of Fabric's accept-everything one.

        paramiko's own key store stays empty, so it hands every offered key to the policy (revoked,
        changed and certificate lines are beyond what paramiko checks).
        """
        client = conn.client
        client.get_host_keys().clear()
        system = getattr(client, "_system_host_keys", None)
        if isinstance(system, paramiko.HostKeys):   # loaded keys would be checked by paramiko, not us
            system.clear()
        client.set_missing_host_key_policy(MissingKeyPolicy(self.host_keys))
        name = known_hosts_name(conn.host, conn.port)
        conn.connect_kwargs["transport_factory"] = _transport_factory(self.host_keys.preferred_types(name))
        if isinstance(conn.gateway, fabric.Connection):
            self._arm(conn.gateway)

    def _active_transport(self) -> paramiko.Transport:
        transport = self._transport
        if transport is None:
            self.open()
            transport = self._transport
        assert transport is not None
        if not transport.is_active():
            raise ConnectionFailed(self.name, "the SSH connection was lost",
                                   hint="the host went away or closed the connection; check it and retry")
        return transport

    def close(self) -> None:
        """Stop commands still running, close the SFTP client and the SSH connection; safe to call twice."""
        self._stop_running()
        with self._open_lock:
            self._close_quietly()

    def _stop_running(self) -> None:
        """Ask sshd to TERM the process group of every command still running (an aborted run).

        Without a pty, closing a channel or the connection leaves the remote command running; the
        `signal` channel request (OpenSSH 8.1+) reaches the session's process. A command under a step
        `timeout` is exec'd by coreutils timeout, which passes the signal on to it.
        """
        with self._channels_lock:
            channels = list(self._channels)
        for channel in channels:
            try:
                if not (channel.closed or channel.exit_status_ready()):
                    _signal(channel, "TERM")
            except Exception:  # best effort: the connection may already be gone
                pass

    def _close_quietly(self) -> None:
        self._files.close()
        conn, self._fabric, self._transport = self._fabric, None, None
        # Fabric closes only a connection whose connect() returned (not one refused mid-handshake), and
        # never its gateway: close every client here, or their transports hold the TCP session until
        # the server gives up (LoginGraceTime), counting against its MaxStartups meanwhile.
        while isinstance(conn, fabric.Connection):
            for close in (conn.close, conn.client.close):
                try:
                    close()
                except Exception:
                    pass
            conn = conn.gateway

    # -- commands ------------------------------------------------------------------------------

    def command_line(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                     timeout: float | None = None, sudo: bool | str = False) -> str:
        """Return the remote shell line `run` sends: argv words are shlex-quoted, never re-split."""
        body = command_argv(command, env, False, False)
        prefix = sudo_words(sudo, self.sudo_password is not None)
        plain = shlex.join([*prefix, *body])
        if timeout is None:
            return plain
        # `exec` so that `timeout` *is* the session's process: an aborted run's TERM (sent to the
        # session by sshd) reaches it, and it passes the signal on to the command in its own process
        # group. The price: a command under a timeout that dies by a signal reports 255 (no exit
        # status) instead of 128+N. Without `timeout` on the host, the shell stays as before.
        limited = shlex.join([*prefix, "timeout", "-k", "1", f"{timeout:g}s", *body])
        return f"if command -v timeout >/dev/null 2>&1; then exec {limited}; else {plain}; fi"

    def run(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float | None = None, sudo: bool | str = False,
            stdin: str | None = None) -> CommandResult:
        """Run a command on its own channel of the shared connection and collect its result."""
        line = self.command_line(command, env=env, timeout=timeout, sudo=sudo)
        data = sudo_stdin(sudo, self.sudo_password, stdin)
        transport = self._active_transport()
        with self._sessions:
            started = time.monotonic()
            try:
                channel = open_session(transport, self.connect_timeout)
                with self._channels_lock:
                    self._channels.add(channel)
                channel.exec_command(line)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if not transport.is_active():
                    raise ConnectionFailed(self.name, "the SSH connection was lost",
                                           hint="the host went away or closed the connection; check it and retry") from exc
                raise ConnectionFailed(self.name, f"cannot start a command: {exc}",
                                       hint="the server refused a new session (MaxSessions?)") from exc
            out, err = OutputCapture(self.output_limit), OutputCapture(self.output_limit)
            try:
                rc, timed_out = collect(channel, data, started, timeout, out, err)
            finally:
                with self._channels_lock:
                    self._channels.discard(channel)
                channel.close()
        duration = time.monotonic() - started
        if rc == -1 and not transport.is_active():
            raise ConnectionFailed(self.name, "the SSH connection was lost during a command",
                                   hint="the host went away or closed the connection; check it and retry")
        if rc == -1:
            # The channel closed without an exit status (the login shell itself died by a signal,
            # reported as exit-signal, which paramiko ignores): 255, as the ssh client reports it.
            rc = 255
        if timeout is not None and rc == TIMEOUT_RC and duration >= timeout:
            timed_out = True
        return command_result(TIMEOUT_RC if timed_out else rc, out, err, duration, timed_out)

    # -- files ---------------------------------------------------------------------------------

    def put(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Upload atomically over SFTP: a temp file beside the target, chmod, then posix-rename."""
        self._files.put(data, remote_path, mode)

    def get(self, remote_path: str, local_path: str) -> None:
        """Download a file over SFTP to a local path."""
        save_read(self.read(remote_path), remote_path, local_path, f"{self.name}: ")

    def read(self, remote_path: str) -> bytes | None:
        """Return a remote file's bytes over SFTP, or None when it does not exist."""
        return self._files.read(remote_path)

    def stat(self, remote_path: str) -> FileStat:
        """Describe a remote path in one round trip: GNU stat for size/mode, sha256sum for content."""
        quoted = shlex.quote(remote_path)
        script = (f"p={quoted}; if [ -e \"$p\" ]; then stat -L -c '%s %f' -- \"$p\" || exit 3; "
                  "if [ -f \"$p\" ] && [ -r \"$p\" ]; then sha256sum < \"$p\" 2>/dev/null || true; fi; "
                  "else echo missing; fi")
        return parse_stat(self.run(script), remote_path, self.name)
