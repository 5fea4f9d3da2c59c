"""SIGINT and SIGTERM during a run: counted where they land, acted on by the executor between rounds.

Raised where it lands (Python's default for SIGINT), an interrupt could fall between handing a task
to the pool and recording it as running: the task would run unrecorded. Counting it instead leaves
the executor to act at a point of its choosing, within one round (0.25 s at most).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupts:
    """The SIGINT and SIGTERM received while installed; `take` tells how many since it was last asked."""

    def __init__(self) -> None:
        self.received = 0
        self.taken = 0
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Count SIGINT and SIGTERM from now on (main thread only: Python runs handlers there); an ignored SIGINT stays ignored."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig != signal.SIGINT or signal.getsignal(sig) is signal.default_int_handler:
                self._previous[sig] = signal.signal(sig, self._count)

    def restore(self) -> None:
        """Put back the handlers there were before `install`."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def take(self) -> int:
        """How many arrived since the last call."""
        new = self.received - self.taken
        self.taken += new
        return new

    def _count(self, signum: int, frame: Any) -> None:
        self.received += 1
