"""RunConnections: a run's host connections opened and closed by host, the controller's own, delegates opened on first use."""

from __future__ import annotations

from typing import Any

import pytest

from runbook.connections.local import LocalConnection
from runbook.engine.connections import RunConnections
from runbook.errors import RunbookError
from runbook.inventory import Host
from runbook.model import CONTROLLER


class Recorded(LocalConnection):
    """A real local connection that remembers being opened and closed."""

    log: list[tuple[str, str]] = []

    def open(self) -> None:
        Recorded.log.append(("open", self.name))
        super().open()

    def close(self) -> None:
        Recorded.log.append(("close", self.name))
        super().close()


def _conns(**delegates: Any) -> RunConnections:
    Recorded.log = []
    hosts = {n: Host(n, "127.0.0.1") for n in ("web1", "web2")}
    return RunConnections(hosts, lambda h: Recorded(h.name), {**hosts, **delegates})


def test_a_host_is_open_from_its_connect_to_its_close() -> None:
    conns = _conns()
    assert not conns.is_open("web1")
    conns.open("web1")
    assert conns.is_open("web1") and conns.for_task("web1").name == "web1"
    assert conns.for_task("web1").run("echo hi").stdout == "hi\n"
    conns.close("web1")
    assert not conns.is_open("web1")
    assert Recorded.log == [("open", "web1"), ("close", "web1")]
    conns.close("web1")   # a second close is nothing
    assert Recorded.log == [("open", "web1"), ("close", "web1")]


def test_the_controller_and_delegates() -> None:
    conns = _conns(db=Host("db", "127.0.0.1"))
    conns.open("web1")
    assert conns.for_task("web1", None, CONTROLLER).name == CONTROLLER
    db = conns.for_task("web1", None, "db")
    assert db.name == "db" and conns.for_task("web2", None, "db") is db   # one per delegate for the run
    with pytest.raises(RunbookError, match="not a host of the inventory"):
        conns.for_task("web1", None, "nowhere")


def test_close_all_closes_hosts_and_delegates_but_tasks_still_find_theirs() -> None:
    conns = _conns(db=Host("db", "127.0.0.1"))
    conns.open("web1")
    conns.for_task("web1", None, "db")
    conns.close_all()   # an abort: running commands end, a task asking for its connection gets it, closed
    assert ("close", "web1") in Recorded.log and ("close", "db") in Recorded.log
    assert conns.for_task("web1").name == "web1"
    with pytest.raises(RunbookError, match="stopping"):
        conns.for_task("web1", None, "db")
