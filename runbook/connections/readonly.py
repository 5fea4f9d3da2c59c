"""The dry run's connection: wraps any kind; reads pass, every mutating call raises ReadOnlyViolation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from runbook.connections.base import CommandResult, Connection, FileStat
from runbook.errors import ReadOnlyViolation


class ReadOnlyConnection:
    """Wraps a connection for the dry run: reads pass, every mutating call raises ReadOnlyViolation.

    `allow_run` is granted only for work that is read-only by contract (guards, `read_only` steps
    and actions that declare their probes read-only); `put` is never allowed.
    """

    def __init__(self, inner: Connection, *, allow_run: bool = False):
        self._inner = inner
        self.allow_run = allow_run
        self.name = inner.name
        self.kind = inner.kind

    def open(self) -> None:
        """Open the wrapped connection."""
        self._inner.open()

    def close(self) -> None:
        """Close the wrapped connection."""
        self._inner.close()

    def run(self, command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float | None = None, sudo: bool | str = False, stdin: str | None = None) -> CommandResult:
        """Run only when this wrapper was granted read-only command execution."""
        if not self.allow_run:
            raise ReadOnlyViolation(f"{self.name}: a dry run may not run `{command}`",
                                    hint="only guards and read_only steps run in a dry run")
        return self._inner.run(command, env=env, timeout=timeout, sudo=sudo, stdin=stdin)

    def put(self, data: bytes, remote_path: str, mode: int | None = None) -> None:
        """Never allowed in a dry run."""
        raise ReadOnlyViolation(f"{self.name}: a dry run may not write {remote_path}")

    def get(self, remote_path: str, local_path: str) -> None:
        """Copying from the host changes nothing on it; allowed for read_only steps."""
        if not self.allow_run:
            raise ReadOnlyViolation(f"{self.name}: a dry run may only fetch in read_only steps")
        self._inner.get(remote_path, local_path)

    def read(self, remote_path: str) -> bytes | None:
        """Read a file through the wrapped connection."""
        return self._inner.read(remote_path)

    def stat(self, remote_path: str) -> FileStat:
        """Stat a path through the wrapped connection."""
        return self._inner.stat(remote_path)
