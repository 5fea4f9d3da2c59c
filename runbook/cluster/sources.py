"""The control-machine files a run's steps send (`upload:`, `template:`, `copy:` sources), shipped to its workers.

A worker may run on another machine than the controller, without the playbook's directory. So the
controller reads every source whose path is not templated once, when the run is set up, and a
step's files travel with the first order of that step to each worker (a worker whose hosts never
run the step never gets them; a host moved after a worker loss brings them to its new worker). The
worker writes them into the run's own directory (0700, removed with the run) and its steps read
those copies: what it sends is exactly what the controller read, at the moment a plan's checksums
are checked. A templated path names a file per host, known only when the task runs: it is still
read where the task runs.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

from runbook.compose import step_sources
from runbook.errors import RunbookError
from runbook.model import Playbook

MAX_SHIPPED = 64 * 1024 * 1024   # bytes of sources one run may send to each worker

SourceKey = tuple[str, str]   # (step id, the source path as the step writes it)


def collect_sources(playbook: Playbook) -> dict[SourceKey, bytes]:
    """Every untemplated source of the playbook's steps, read on the controller (an unreadable one is left out)."""
    out: dict[SourceKey, bytes] = {}
    by_path: dict[Path, bytes] = {}
    total = 0
    for step, src, path in step_sources(playbook):
        if path not in by_path:
            data = _read_at_most(path, MAX_SHIPPED - total + 1)
            if data is None:   # the task reports it where it runs, as in-process (its error names the path)
                continue
            by_path[path] = data
            total += len(data)
            if total > MAX_SHIPPED:
                raise RunbookError(f"the playbook's source files pass {MAX_SHIPPED // 2**20} MiB ({path})",
                                   hint="too much to send to every cluster worker with the run: deploy the "
                                        "playbook directory on the workers and template the path, or run "
                                        "those steps without --cluster")
        out[(step.step_id, src)] = by_path[path]
    return out


def _read_at_most(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of a regular file (a 20 GiB image is not read whole to learn it is too big);
    None when it cannot be read or is not a regular file (a FIFO is not opened for reading, so never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return f.read(limit)
        except OSError:
            return None


class Shipments:
    """The controller's side: which step's sources each worker still needs (each goes once per worker)."""

    def __init__(self, sources: dict[SourceKey, bytes]):
        self._by_step: dict[str, dict[SourceKey, bytes]] = {}
        for key, data in sources.items():
            self._by_step.setdefault(key[0], {})[key] = data
        self._sent: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def take(self, worker: str, step_id: str) -> dict[SourceKey, bytes]:
        """The step's sources for its next order to `worker`: all of them the first time, none after."""
        files = self._by_step.get(step_id)
        if not files:
            return {}
        with self._lock:
            if (worker, step_id) in self._sent:
                return {}
            self._sent.add((worker, step_id))
        return dict(files)


def install_sources(playbook: Playbook, sources: dict[SourceKey, bytes], run_dir: Path) -> None:
    """On a worker: write shipped sources into the run's directory; the playbook's steps then read those."""
    if not sources:
        return
    where = run_dir / "sources"
    where.mkdir(mode=0o700, exist_ok=True)
    for key, data in sources.items():
        # Named by content: no name from the playbook is a path here, and a file several steps send is one copy.
        path = where / hashlib.sha256(data).hexdigest()
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        playbook._shipped[key] = str(path)
