"""Setting up a run on its cluster workers (runbook/cluster/remote.py, ClusterRun.start): a failure is a located error."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from runbook.cluster.remote import ClusterRun
from runbook.errors import RunbookError


class Done:
    """A Dask future (or actor call) that has its answer, or its error."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Session:
    def __init__(self, error: BaseException | None):
        self.error = error

    def setup(self, setup: Any, token: str) -> Done:
        return Done("worker-name", self.error)


class Router:
    def __init__(self, workers: list[str]):
        self.workers = workers

    def eligible(self) -> list[str]:
        return self.workers


class Client:
    """What ClusterRun.start asks of a distributed.Client before any channel opens."""

    def __init__(self, failing: str):
        self.failing = failing
        self.cancelled: list[Any] = []
        self.loop = SimpleNamespace(asyncio_loop=None)   # no channel opens: the setup fails first

    def submit(self, cls: Any, *, workers: list[str], **kw: Any) -> Done:
        return Done(Session(OSError("no route to host") if workers == [self.failing] else None))

    def cancel(self, futures: list[Any]) -> None:
        self.cancelled += futures


class Setup:
    class info:   # the attribute ClusterRun.start reads
        run_id = "20261201T000000Z-abcdef"


def test_a_worker_the_controller_cannot_set_up_is_named_in_a_clear_error() -> None:
    client = Client(failing="tcp://10.0.0.9:40001")
    with pytest.raises(RunbookError) as caught:
        ClusterRun.start(client, Router(["tcp://10.0.0.8:40000", "tcp://10.0.0.9:40001"]),  # type: ignore[arg-type]
                         Setup, None, None, None, None)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "cannot set up the run on cluster worker tcp://10.0.0.9:40001" in message
    assert "OSError: no route to host" in message
    assert "reach every worker directly" in (caught.value.hint or "")
    assert len(client.cancelled) == 2   # the run's sessions are let go: nothing of it stays on the workers
