"""`local`: run on the control machine with subprocess; same results as every other kind."""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import stat as stat_mod
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any, ClassVar

from runbook.connections.base import (TIMEOUT_RC, CommandResult, ConnectOptions, FileStat, HostLike, command_argv,
                                      save_read, sudo_stdin)
from runbook.connections.output import DEFAULT_OUTPUT_LIMIT, OutputCapture, check_output_limit, command_result
from runbook.errors import RunbookError

#: Seconds a timed-out process group gets after TERM, then after KILL, to exit and close its pipes.
_KILL_GRACE = 2.0


class LocalConnection:
    """Runs on the control machine with subprocess; same interface and results as SSH."""

    kind = "local"
    host_vars: ClassVar[tuple[str, ...]] = ("ansible_become_password", "become_password")

    def __init__(self, name: str = "localhost", sudo_password: str | None = None, *,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.name = name
        self.sudo_password = sudo_password
        self.output_limit = check_output_limit(output_limit)

    def __repr__(self) -> str:
        return f"LocalConnection(name={self.name!r})"

    @classmethod
    def for_host(cls, host: HostLike, options: ConnectOptions) -> LocalConnection:
        """A local connection named after the inventory host."""
        return cls(host.name, sudo_password=options.sudo_password, output_limit=options.output_limit)

    def open(self) -> None:
        """Nothing to connect to locally."""

    def close(self) -> None:
        """Nothing to release locally."""

    def run(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float | None = None, sudo: bool | str = False,
            stdin: str | None = None) -> CommandResult:
        """Run a command in a subprocess of its own session, killing its process group on timeout."""
        with_password = self.sudo_password is not None
        argv = command_argv(command, env, sudo, with_password)
        data = sudo_stdin(sudo, self.sudo_password, stdin)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, so a timeout kills children too
            )
        except OSError as exc:
            # An argv whose program is missing: report it like a shell would (127), not a traceback.
            return CommandResult(127, "", f"{argv[0]}: {exc.strerror}\n", time.monotonic() - started)
        out, err = OutputCapture(self.output_limit), OutputCapture(self.output_limit)
        deadline = None if timeout is None else started + timeout
        pump = _Pump(proc, data, out, err)
        try:
            timed_out = not (pump.until(deadline) and _reaped(proc, deadline))
            if timed_out:
                self._kill(proc, pump)
        finally:
            pump.close()
        duration = time.monotonic() - started
        rc = TIMEOUT_RC if timed_out else proc.returncode
        # A signal death is -N from subprocess; report it the shell way (128+N).
        if rc is not None and rc < 0:
            rc = 128 - rc
        return command_result(rc, out, err, duration, timed_out)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], pump: _Pump) -> None:
        """Stop a timed-out process group: TERM first (sudo relays it), KILL after a short grace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            grace = time.monotonic() + _KILL_GRACE
            if pump.until(grace) and _reaped(proc, grace):
                return
        # A grandchild that left the group still holds the pipes: stop waiting for it.
        pump.close()
        proc.wait()

    def put(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Write atomically: a temp file in the same directory, fsync, chmod, then rename over."""
        target = os.path.abspath(remote_path)
        directory = os.path.dirname(target)
        if mode is None:
            # Keep the mode of the file being replaced; otherwise what a new file would get.
            try:
                mode = stat_mod.S_IMODE(os.stat(target).st_mode)
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".rbtmp", dir=directory)
        except FileNotFoundError as exc:
            raise RunbookError(f"cannot write {remote_path}: directory {directory} does not exist",
                               hint="create the parent directory first (put creates no directories)") from exc
        except PermissionError as exc:
            raise RunbookError(f"cannot write {remote_path}: permission denied in {directory}",
                               hint="use sudo or a writable path") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file to a local path (both are local here)."""
        save_read(self.read(remote_path), remote_path, local_path, "")

    def read(self, remote_path: str) -> bytes | None:
        """Return the file's bytes, or None when it does not exist."""
        try:
            with open(remote_path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except (PermissionError, IsADirectoryError) as exc:
            raise RunbookError(f"cannot read {remote_path}: {exc.strerror}",
                               hint="check the path and its permissions") from exc

    def stat(self, remote_path: str) -> FileStat:
        """Describe the path (following symlinks), hashing regular readable files."""
        try:
            st = os.stat(remote_path)
        except (FileNotFoundError, NotADirectoryError):
            return FileStat(exists=False)
        digest: str | None = None
        if stat_mod.S_ISREG(st.st_mode):
            try:
                digest = _sha256_file(remote_path)
            except PermissionError:
                digest = None
        return FileStat(exists=True, size=st.st_size, mode=stat_mod.S_IMODE(st.st_mode), sha256=digest)


class _Pump:
    """Feeds a process's stdin and reads its stdout and stderr into bounded captures, in one thread.

    Reading as the output arrives (not all of it at the end, as `communicate` does) is what keeps a
    command that prints gigabytes within the captures' bounds.
    """

    def __init__(self, proc: subprocess.Popen[bytes], data: bytes | None, out: OutputCapture, err: OutputCapture) -> None:
        self._selector: selectors.BaseSelector | None = selectors.DefaultSelector()
        self._readers = 0
        for pipe, capture in ((proc.stdout, out), (proc.stderr, err)):
            if pipe is not None:
                self._selector.register(pipe, selectors.EVENT_READ, capture)
                self._readers += 1
        self._stdin: IO[bytes] | None = proc.stdin
        self._pending = memoryview(data or b"")
        if self._stdin is not None and self._pending:
            os.set_blocking(self._stdin.fileno(), False)
            self._selector.register(self._stdin, selectors.EVENT_WRITE, None)
        else:
            self._close_stdin()

    def until(self, deadline: float | None) -> bool:
        """Pump until stdout and stderr are at EOF (True) or the deadline passes (False)."""
        while self._readers and self._selector is not None:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return False
            for key, _events in self._selector.select(wait):
                if key.data is None:
                    self._write()
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.feed(chunk)
                else:
                    self._forget(key.fileobj)
                    self._readers -= 1
        self._close_stdin()  # the command is done with its output; what it did not read is dropped
        return True

    def _write(self) -> None:
        assert self._stdin is not None
        try:
            written = os.write(self._stdin.fileno(), self._pending[:65536])
        except BlockingIOError:
            return
        except BrokenPipeError:
            written = len(self._pending)  # the command stopped reading: drop the rest, as communicate does
        self._pending = self._pending[written:]
        if not self._pending:
            self._close_stdin()

    def _forget(self, pipe: Any) -> None:
        """Stop watching a pipe (a file object of the process) and close it."""
        if self._selector is not None and pipe in {k.fileobj for k in self._selector.get_map().values()}:
            self._selector.unregister(pipe)
        try:
            pipe.close()
        except BrokenPipeError:  # stdin whose reader is gone, with bytes still buffered
            pass

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            self._forget(self._stdin)
            self._stdin = None

    def close(self) -> None:
        """Stop watching the pipes and close them (safe to call twice)."""
        self._close_stdin()
        if self._selector is not None:
            for key in list(self._selector.get_map().values()):
                self._forget(key.fileobj)
            self._selector.close()
            self._selector = None


def _reaped(proc: subprocess.Popen[bytes], deadline: float | None) -> bool:
    """Wait for the process to exit by the deadline; False if it is still running then."""
    try:
        proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    # Read it from /proc: os.umask can only be read by setting it, which races with other threads.
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022

