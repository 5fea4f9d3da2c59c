"""The control-machine files a run's steps send (`upload:`, `template:`, `copy:` sources), shipped to its workers.

A worker may run on another machine than the controller, without the playbook's directory. So the
controller reads every source whose path is not templated once, when the run is set up, and a
step's files travel with the first order of that step to each worker (a worker whose hosts never
run the step never gets them; a host moved after a worker loss brings them to its new worker). The
worker writes them into the run's own directory (0700, removed with the run) and its steps read
those copies: what it sends is exactly what the controller read, at the moment a plan's checksums
are checked. A templated path names a file per task: the controller renders it with that task's
variables when it sends the task (each loop item's too), and the file goes with the order, once per
worker. A path that does not render there (it reads facts not gathered yet, or a register a dry run
cannot know) is left to the worker, which reads it from its own disk.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

from typing import TYPE_CHECKING, Any

from runbook.actions import action_for
from runbook.compose import confined_source, step_sources
from runbook.errors import RunbookError
from runbook.graph import TaskKey
from runbook.model import Playbook, Step
from runbook.template import render

if TYPE_CHECKING:
    from runbook.engine.task import TaskRunner

MAX_SHIPPED = 64 * 1024 * 1024   # bytes of sources one run may send to each worker

SourceKey = tuple[str, str]   # (step id, the source path as the step writes it, or as its task rendered it)
MAX_RENDERED_ITEMS = 256       # loop items whose source paths the controller renders; past it, the worker's disk


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


def step_templates(playbook: Playbook) -> dict[str, list[str]]:
    """Each step's templated source paths (step id -> its templates), for the steps that have any."""
    out = {step.step_id: action_for(step).source_templates() for step in playbook.all_steps()}
    return {step_id: templates for step_id, templates in out.items() if templates}


def rendered_sources(runner: TaskRunner, key: TaskKey, step: Step, templates: list[str]) -> dict[SourceKey, Path]:
    """The files a task's templated source paths name, rendered on the controller as its worker will render them."""
    if runner.facts.known(key.host) is None and runner.reads_facts(step):
        return {}   # it needs facts its worker has not gathered yet: never gathered for this
    try:
        rendered = {render(t, ctx): t for ctx in _task_contexts(runner, key.host, step) for t in templates}
    except Exception:   # it does not render here: the worker renders it, and reports what fails
        return {}
    out = {}
    for src, template in sorted(rendered.items()):
        try:
            out[(step.step_id, src)] = confined_source(runner.playbook, step, template, src)
        except RunbookError:
            continue   # outside the playbook's tree: not read here; the worker refuses it as an in-process run does
    return out


def _task_contexts(runner: TaskRunner, host: str, step: Step) -> list[dict[str, Any]]:
    """The task's variables, or each of its loop items' (the loop's items made as the worker will make them)."""
    from runbook.engine.loops import loop_context, loop_item_context, loop_values

    if step.loop is None:
        return [runner.context(host, step=step)]
    base = loop_context(runner, host, step)
    values = loop_values(step, base)
    if len(values) > MAX_RENDERED_ITEMS:
        raise ValueError("too many items to render on the controller")
    return [loop_item_context(runner, host, step, base, i, v) for i, v in enumerate(values)]


class Shipments:
    """The controller's side: which step's sources each worker still needs (each goes once per worker)."""

    def __init__(self, sources: dict[SourceKey, bytes], templates: dict[str, list[str]] | None = None):
        self._templates = templates or {}   # step id -> its templated source paths (see step_templates)
        self._by_step: dict[str, dict[SourceKey, bytes]] = {}
        for key, data in sources.items():
            self._by_step.setdefault(key[0], {})[key] = data
        self._sent: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._rendered: dict[Path, bytes | None] = {}           # templated paths' files, read once each
        self._rendered_sent: set[tuple[str, SourceKey]] = set()
        self._room = MAX_SHIPPED - sum(len(d) for d in sources.values())

    def for_order(self, worker: str, runner: TaskRunner, key: TaskKey, step: Step) -> dict[SourceKey, bytes]:
        """The files a task's order to `worker` carries: its step's sources the first time, its rendered ones."""
        out = self.take(worker, key.step_id)
        templates = self._templates.get(key.step_id)
        if templates:
            out.update(self.rendered(worker, rendered_sources(runner, key, step, templates)))
        return out

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

    def rendered(self, worker: str, files: dict[SourceKey, Path]) -> dict[SourceKey, bytes]:
        """A task's rendered source files that `worker` has not got; each file is read once, within MAX_SHIPPED."""
        out: dict[SourceKey, bytes] = {}
        with self._lock:
            for key, path in files.items():
                if (worker, key) in self._rendered_sent:
                    continue
                if path not in self._rendered:
                    data = _read_at_most(path, self._room + 1) if self._room > 0 else None
                    if data is not None and len(data) > self._room:
                        data = None   # past the run's budget: this one is read on the worker
                    self._room -= len(data) if data is not None else 0
                    self._rendered[path] = data
                data = self._rendered[path]
                if data is not None:   # missing or unreadable here: the task reports it where it runs
                    self._rendered_sent.add((worker, key))
                    out[key] = data
        return out


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
