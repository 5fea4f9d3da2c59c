"""Connections to hosts: one protocol, a local (subprocess) and an SSH (Fabric/paramiko) kind.

Both kinds give the same results for the same call, so actions never care where they run:

- ``run`` takes a shell string (run through ``sh -c``) or an argv list (no shell), an environment,
  a timeout (the command is killed, ``rc=124``, ``timed_out=True``), ``sudo`` (root or a named
  user) and optional stdin. It never raises for a nonzero exit status.
- ``put`` is atomic (a temporary file beside the target, then a rename) and creates no parent
  directories; ``read`` returns None for a missing file; ``stat`` reports existence, size, mode and
  the sha256 of a regular file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import stat as stat_mod
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from runbook.errors import RunbookError

#: Exit status reported for a command killed by its timeout (the same as coreutils `timeout`).
TIMEOUT_RC = 124

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class CommandResult:
    """What a command did: exit status, decoded output, wall time, and whether it timed out."""

    rc: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False


@dataclass
class FileStat:
    """What is at a path: existence, size, permission bits, and the sha256 of a regular file."""

    exists: bool
    size: int = 0
    mode: int | None = None        # permission bits, e.g. 0o644
    sha256: str | None = None      # None for directories / unreadable


@runtime_checkable
class Connection(Protocol):
    """A way to run commands and move files on one host."""

    name: str                      # inventory host name
    kind: str                      # "local" | "ssh"

    def open(self) -> None:
        """Connect once; raise ConnectionFailed / HostKeyError with the reason."""
        ...

    def run(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float | None = None, sudo: bool | str = False,
            stdin: str | None = None) -> CommandResult:
        """Run a command (str through `sh -c`, list as argv) and return its result."""
        ...

    def put(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Write bytes to a path atomically (temp file beside it, then rename)."""
        ...

    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file from the host to a local path."""
        ...

    def read(self, remote_path: str) -> bytes | None:
        """Return a file's bytes, or None when it does not exist."""
        ...

    def stat(self, remote_path: str) -> FileStat:
        """Describe what is at a path."""
        ...

    def close(self) -> None:
        """Release the connection; safe to call twice."""
        ...


# ---------------------------------------------------------------------------------------------
# Shared helpers: both kinds build the same argv so that results agree.


def check_env(env: Mapping[str, str] | None) -> list[str]:
    """Validate environment names and return `NAME=value` words for `env(1)`."""
    words: list[str] = []
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise RunbookError(f"invalid environment variable name {key!r}",
                               hint="names are letters, digits and underscores, not starting with a digit")
        words.append(f"{key}={value}")
    return words


def sudo_words(sudo: bool | str, with_password: bool) -> list[str]:
    """Return the `sudo ... --` prefix for a target user (True means root), or [] for no sudo."""
    if sudo is False or sudo is None or sudo == "":
        return []
    user = "root" if sudo is True else str(sudo)
    # -n never prompts (fails at once instead of hanging); -S reads the password from stdin with
    # an empty prompt so that it never lands in the command's stderr.
    auth = ["-S", "-p", ""] if with_password else ["-n"]
    return ["sudo", *auth, "-u", user, "-H", "--"]


def command_argv(command: str | Sequence[str], env: Mapping[str, str] | None,
                 sudo: bool | str, with_password: bool) -> list[str]:
    """Build the full argv: sudo prefix, then `env NAME=value` (so env survives sudo), then the command."""
    if isinstance(command, str):
        argv = ["sh", "-c", command]
    else:
        argv = [str(word) for word in command]
        if not argv:
            raise RunbookError("empty command", hint="give a shell string or a non-empty argv list")
    env_words = check_env(env)
    if env_words:
        # `env` applies the variables after sudo has reset the environment.
        argv = ["env", *env_words, *argv]
    return [*sudo_words(sudo, with_password), *argv]


def decode(data: bytes) -> str:
    """Decode command output as UTF-8, replacing invalid bytes."""
    return data.decode("utf-8", errors="replace")


def sudo_stdin(sudo: bool | str, sudo_password: str | None, stdin: str | None) -> bytes | None:
    """Return the bytes to feed the command: the sudo password line first when one is used."""
    data = stdin.encode() if stdin is not None else None
    if sudo_words(sudo, False) and sudo_password is not None:
        # sudo -S reads exactly one line; the rest is the command's stdin. With NOPASSWD rules
        # sudo reads nothing, so configure a password only for hosts that ask for one.
        return sudo_password.encode() + b"\n" + (data or b"")
    return data


# ---------------------------------------------------------------------------------------------
# Local


class LocalConnection:
    """Runs on the control machine with subprocess; same interface and results as SSH."""

    kind = "local"

    def __init__(self, name: str = "localhost", sudo_password: str | None = None) -> None:
        self.name = name
        self.sudo_password = sudo_password

    def __repr__(self) -> str:
        return f"LocalConnection(name={self.name!r})"

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
        data = self.read(remote_path)
        if data is None:
            raise RunbookError(f"cannot fetch {remote_path}: no such file", hint="check the path on the host")
        with open(local_path, "wb") as handle:
            handle.write(data)

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
