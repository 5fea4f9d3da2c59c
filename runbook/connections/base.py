"""The connection contract: one protocol every kind implements, its result types, and helpers shared by kinds.

Both kinds give the same results for the same call, so actions never care where they run:

- ``run`` takes a shell string (run through ``sh -c``) or an argv list (no shell), an environment,
  a timeout (the command is killed, ``rc=124``, ``timed_out=True``), ``sudo`` (root or a named
  user) and optional stdin. It never raises for a nonzero exit status.
- ``put`` is atomic (a temporary file beside the target, then a rename) and creates no parent
  directories; ``read`` returns None for a missing file; ``stat`` reports existence, size, mode and
  the sha256 of a regular file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from runbook.errors import RunbookError

if TYPE_CHECKING:
    from typing import Self

#: Exit status reported for a command killed by its timeout (the same as coreutils `timeout`).
TIMEOUT_RC = 124

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class CommandResult:
    """What a command did: exit status, decoded output, wall time, whether it timed out or lost output.

    `stdout` and `stderr` keep at most a head and a tail of `ConnectOptions.output_limit` bytes each,
    with a marker line where the middle was left out (`truncated`); the byte counts are of everything
    the command wrote.
    """

    rc: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    stdout_bytes: int = -1         # -1: not counted by the kind, taken from `stdout`
    stderr_bytes: int = -1
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.stdout_bytes < 0:
            self.stdout_bytes = len(self.stdout.encode("utf-8", errors="replace"))
        if self.stderr_bytes < 0:
            self.stderr_bytes = len(self.stderr.encode("utf-8", errors="replace"))


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
    kind: str                      # the registry name: "local", "ssh", or a plugin's

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


def quiet_close(conn: Connection) -> None:
    """Close `conn`, ignoring its errors: closing is best effort once a run's outcome is decided."""
    try:
        conn.close()
    except Exception:  # a connection that fails to close has nothing more to tell the run
        pass


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


def save_read(data: bytes | None, remote_path: str, local_path: str, who: str) -> None:
    """Write what `read` returned to a local file (both kinds' `get`); a missing file is an error."""
    if data is None:
        raise RunbookError(f"{who}cannot fetch {remote_path}: no such file", hint="check the path on the host")
    with open(local_path, "wb") as handle:
        handle.write(data)


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



@dataclass(frozen=True)
class ConnectOptions:
    """Run-wide connection settings: host-key policy, known_hosts file, timeouts, sudo password, output limit."""

    host_key_checking: str = "strict"
    known_hosts: str | None = None
    connect_timeout: float = 10.0
    sudo_password: str | None = None
    #: Bytes of head and of tail kept of each command's stdout and stderr; the middle is counted and dropped.
    output_limit: int = 65536


class HostLike(Protocol):
    """What a connection kind may read of an inventory host: its name, resolved address and variables."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def key_file(self) -> str | None: ...
    @property
    def proxy_jump(self) -> str | None: ...
    @property
    def vars(self) -> dict[str, Any]: ...


class ConnectionKind(Connection, Protocol):
    """A connection class as the registry sees it: its name, the host variables it reads, a factory."""

    kind: str
    #: Inventory variables this kind reads (documented by `runbook inventory --host`, checked by tests).
    host_vars: ClassVar[tuple[str, ...]]

    @classmethod
    def for_host(cls, host: HostLike, options: ConnectOptions) -> Self:
        """Build an unopened connection to `host`."""
        ...
