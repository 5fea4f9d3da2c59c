"""The control-machine files a run's steps send (`upload:`, `template:`, `copy:` sources), shipped to its workers.

A worker may run on another machine than the controller, without the playbook's directory. So the
controller reads every source whose path is not templated once, when the run is set up, and each
worker gets their bytes with the session; a worker writes them into the run's own directory (0700,
removed with the run) and its steps read those copies. What a worker sends is then exactly what the
controller would have sent, read at the same moment a plan's checksums are checked. A templated
path names a file per host, known only when the task runs: it is still read where the task runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from runbook.actions import action_for
from runbook.compose import resolve_source
from runbook.errors import RunbookError
from runbook.model import Playbook

MAX_SHIPPED = 64 * 1024 * 1024   # bytes of sources one run may send to each worker

SourceKey = tuple[str, str]   # (step id, the source path as the step writes it)


def collect_sources(playbook: Playbook) -> dict[SourceKey, bytes]:
    """Every untemplated source of the playbook's steps, read on the controller (an unreadable one is left out)."""
    out: dict[SourceKey, bytes] = {}
    by_path: dict[Path, bytes] = {}
    total = 0
    for step in playbook.all_steps():
        for src in action_for(step).local_sources():
            path = resolve_source(playbook, step, src)
            if path not in by_path:
                try:
                    by_path[path] = path.read_bytes()
                except OSError:   # the task reports it where it runs, as in-process (its error names the path)
                    continue
                total += len(by_path[path])
                if total > MAX_SHIPPED:
                    raise RunbookError(f"the playbook's source files pass {MAX_SHIPPED // 2**20} MiB ({path})",
                                       hint="too much to send to every cluster worker with the run: deploy the "
                                            "playbook directory on the workers and template the path, or run "
                                            "those steps without --cluster")
            out[(step.step_id, src)] = by_path[path]
    return out


def install_sources(playbook: Playbook, sources: dict[SourceKey, bytes], run_dir: Path) -> None:
    """On a worker: write the shipped sources into the run's directory; the playbook's steps then read those."""
    if not sources:
        return
    where = run_dir / "sources"
    where.mkdir(mode=0o700)
    written: dict[bytes, Path] = {}
    for n, (key, data) in enumerate(sorted(sources.items())):
        path = written.get(data)
        if path is None:   # the same file for several steps: one copy (names are numbers: nothing to traverse)
            path = written[data] = where / str(n)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        playbook._shipped[key] = str(path)
