"""Host keys for workers: the controller's known_hosts content goes out; keys first seen there come back checked."""

from __future__ import annotations

import fcntl
import os
import re
import threading
from pathlib import Path

from runbook.connections.hostkeys import SYSTEM_KNOWN_HOSTS, known_hosts_name

_KEY_LINE = re.compile(r"(?P<name>\S+) (?P<type>[a-z0-9@.-]{3,64}) (?P<key>[A-Za-z0-9+/]{16,16384}={0,3})")


class KnownHostsSink:
    """The controller's known_hosts: its text for workers, and the lines they learned (accept-new) appended to it.

    A worker may only add a line for a host routed to it, under that host's own known_hosts name: a
    worker cannot make the controller trust another host.
    """

    def __init__(self, path: str | os.PathLike[str] | None, hosts: dict[str, tuple[str, int | None]],
                 system: Path = SYSTEM_KNOWN_HOSTS):
        self.path = Path(path).expanduser() if path else Path("~/.ssh/known_hosts").expanduser()
        self.system = system
        self.names = {h: known_hosts_name(address, port) for h, (address, port) in hosts.items()}
        self._lock = threading.Lock()

    def text(self) -> str:
        """What a worker checks host keys against: the controller's file, then its system file."""
        out = []
        for path in (self.path, self.system):
            try:
                out.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        return "".join(t if t.endswith("\n") else t + "\n" for t in out if t)

    def record(self, host: str, lines: list[str]) -> list[str]:
        """Append the lines a worker recorded for `host` that are well-formed and name it; returns those kept."""
        expected = self.names.get(host)
        kept = [line for line in lines if expected and (m := _KEY_LINE.fullmatch(line)) and m.group("name") == expected]
        if not kept:
            return []
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+", encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                content = handle.read()
                present = set(content.splitlines())
                new = [line for line in kept if line not in present]
                if new:   # never glue a new line onto a last line without its newline
                    lead = "\n" if content and not content.endswith("\n") else ""
                    handle.write(lead + "".join(line + "\n" for line in new))
        return kept
