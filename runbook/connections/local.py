"""`local`: run on the control machine with subprocess; same results as every other kind."""

from __future__ import annotations

import hashlib
import os
import signal
import stat as stat_mod
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

from runbook.connections.base import (TIMEOUT_RC, CommandResult, ConnectOptions, FileStat, HostLike, command_argv,
                                      decode, save_read, sudo_stdin)
from runbook.errors import RunbookError


class LocalConnection:
    """Runs on the control machine with subprocess; same interface and results as SSH."""

    kind = "local"
    host_vars: ClassVar[tuple[str, ...]] = ("ansible_become_password", "become_password")

    def __init__(self, name: str = "localhost", sudo_password: str | None = None) -> None:
        self.name = name
        self.sudo_password = sudo_password

    def __repr__(self) -> str:
        return f"LocalConnection(name={self.name!r})"

    @classmethod
    def for_host(cls, host: HostLike, options: ConnectOptions) -> LocalConnection:
        """A local connection named after the inventory host."""
        return cls(host.name, sudo_password=options.sudo_password)

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
        timed_out = False
        try:
            out, err = proc.communicate(input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = self._kill(proc)
        duration = time.monotonic() - started
        rc = TIMEOUT_RC if timed_out else proc.returncode
        # A signal death is -N from subprocess; report it the shell way (128+N).
        if rc is not None and rc < 0:
            rc = 128 - rc
        return CommandResult(rc, decode(out), decode(err), duration, timed_out)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
        """Stop a timed-out process group: TERM first (sudo relays it), KILL after a short grace."""
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        # A grandchild that left the group still holds the pipes: stop waiting for it.
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return b"", b""

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

