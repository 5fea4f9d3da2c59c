"""A `runbook worker` asked to stop ends, even when Dask's own close does not.

Dask's worker close can hang for good on one of its tasks that never finishes its cancellation
(seen here when the worker's SIGTERM and its scheduler's close cross: about one stop in eight of a
worker and its scheduler stopped together). A service manager then waits for its stop timeout and
SIGKILLs the worker. So once a worker has begun to close, `runbook worker` gives Dask a grace
period, then waits only for the run tasks still running on this process, then exits.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping

GRACE_VAR = "RUNBOOK_WORKER_EXIT_GRACE"   # seconds; `runbook worker` sets it for the process it becomes
DEFAULT_GRACE = 10.0
POLL = 0.2   # seconds between looks at the running tasks, once the grace period is over


class RunningTasks:
    """How many run tasks this process is running now (they finish before it exits)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Count one task while the block runs."""
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    def count(self) -> int:
        """Tasks running now."""
        with self._lock:
            return self._count


RUNNING = RunningTasks()


def grace_from(env: Mapping[str, str]) -> float | None:
    """The grace period `runbook worker` set, in seconds; None when unset, unreadable or not positive."""
    try:
        grace = float(env.get(GRACE_VAR, ""))
    except ValueError:
        return None
    return grace if math.isfinite(grace) and grace > 0 else None


def arm(env: Mapping[str, str], running: RunningTasks = RUNNING, sleep: Callable[[float], None] = time.sleep,
        exit_now: Callable[[int], None] = os._exit) -> threading.Thread | None:
    """The worker began to close: under `runbook worker`, this process ends after the grace period at the latest."""
    grace = grace_from(env)
    if grace is None:   # a plain `dask worker`, or a local:N worker inside the controller's own cluster
        return None
    watch = threading.Thread(target=exit_after, args=(grace, running, sleep, exit_now), daemon=True,
                             name="runbook-exit-grace")
    watch.start()
    return watch


def exit_after(grace: float, running: RunningTasks, sleep: Callable[[float], None],
               exit_now: Callable[[int], None]) -> None:
    """Sleep out the grace period, wait for the running tasks, then end the process (as a clean stop: 0)."""
    sleep(grace)
    while running.count():
        sleep(POLL)
    sys.stderr.write(f"runbook worker: Dask's close did not end within {grace:g}s; exiting\n")
    sys.stderr.flush()
    exit_now(0)
