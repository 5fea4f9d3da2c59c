"""The controller's side of a distributed run's facts (runbook/cluster/facts.py): fed by workers, asked of them."""

from __future__ import annotations

from typing import Any

import pytest

from runbook.cluster.facts import RunFacts
from runbook.cluster.wire import Gathered
from runbook.errors import ConnectionFailed
from runbook.facts import Facts, FactsError, FactStore


class Asked:
    """The workers' answers, recorded: what the controller asked of which worker."""

    def __init__(self, reply: Gathered | None = None, error: OSError | None = None):
        self.calls: list[tuple[str, str]] = []
        self.reply = reply
        self.error = error

    def __call__(self, worker: str, host: str) -> Gathered:
        self.calls.append((worker, host))
        if self.error is not None:
            raise self.error
        return self.reply or Gathered(host, Facts(hostname=f"{host}-on-{worker}"))


def facts_of(ask: Asked, where: dict[str, str | None] | None = None) -> tuple[RunFacts, FactStore, list[str]]:
    here: list[str] = []

    def gather_here(host: str, conn: Any) -> Facts:
        here.append(host)
        return Facts(hostname=f"{host}-here")

    store = FactStore(gatherer=gather_here)
    placed = where if where is not None else {"web1": "tcp://w1", "web2": "tcp://w2"}
    return RunFacts(store, lambda host: host in placed, placed.get, ask), store, here


def test_a_remote_hosts_facts_are_gathered_once_on_its_worker_and_local_hosts_here() -> None:
    ask = Asked()
    facts, store, here = facts_of(ask)
    for _ in range(3):
        assert store.get("web1", lambda: None).hostname == "web1-on-tcp://w1"
    assert store.get("ctl", lambda: None).hostname == "ctl-here"
    assert ask.calls == [("tcp://w1", "web1")] and here == ["ctl"]
    assert facts.for_order("tcp://w1", "web1") is None   # its worker gathered them: nothing to send


def test_facts_go_with_the_next_order_to_a_worker_that_lacks_them_once() -> None:
    facts, store, _ = facts_of(Asked())
    facts.received("web1", "tcp://w1", Facts(hostname="web1", cpu_count=2))
    assert facts.for_order("tcp://w1", "web1") is None
    assert facts.for_order("tcp://w3", "web1") == Facts(hostname="web1", cpu_count=2)   # it moved to w3
    assert facts.for_order("tcp://w3", "web1") is None                                  # sent once
    assert facts.for_order("tcp://w3", "web2") is None                                  # none known: none sent


def test_what_a_worker_sends_that_is_not_facts_is_ignored() -> None:
    facts, store, _ = facts_of(Asked())
    facts.received("web1", "tcp://w1", {"hostname": "evil"})
    facts.received("web1", None, Facts(hostname="web1"))
    assert store.known("web1") is None


@pytest.mark.parametrize(("reply", "error", "match"), [
    (Gathered("web1", reason="the gather printed no JSON"), FactsError, "facts of web1: the gather printed no JSON"),
    (Gathered("web1", reason="host key mismatch", failed="connect"), ConnectionFailed, "host key mismatch"),
    (Gathered("web1", reason="Socket is closed", failed="connection"), OSError, "Socket is closed"),
    (Gathered("web1", {"hostname": "forged"}), FactsError, "its cluster worker sent no facts"),   # type: ignore[arg-type]
], ids=["facts", "connect", "connection", "not-facts"])
def test_a_failed_remote_gather_fails_the_task_as_it_would_in_process(reply: Gathered, error: type[Exception],
                                                                     match: str) -> None:
    facts, store, _ = facts_of(Asked(reply))
    with pytest.raises(error, match=match):
        store.get("web1", lambda: None)
    assert store.known("web1") is None and facts.for_order("tcp://w2", "web1") is None


def test_a_host_without_a_worker_left_or_a_worker_gone_mid_request_is_a_connection_failure() -> None:
    _, store, _ = facts_of(Asked(), {"web1": None})
    with pytest.raises(ConnectionFailed, match="no cluster worker is left"):
        store.get("web1", lambda: None)
    ask = Asked(error=ConnectionError("worker tcp://w1 is gone"))
    _, store, _ = facts_of(ask)
    with pytest.raises(OSError, match="is gone"):
        store.get("web1", lambda: None)
    ask.error = None   # not kept as the host's failure: its new worker is asked next time
    assert store.get("web1", lambda: None).hostname == "web1-on-tcp://w1" and len(ask.calls) == 2
