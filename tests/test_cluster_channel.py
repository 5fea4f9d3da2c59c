"""The run channel (runbook/cluster/channel.py) between a real Dask worker and the controller's end.

A scheduler and a worker run in this process (real Dask servers and comms on loopback); the worker's
run session is a stand-in that records what the channel hands it, so what is checked is the channel
itself: orders, connects and closes reach the session in order, events come back in order, and only
the holder of the session's one-time token gets a channel (a wrong or replayed token gets none).
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import secrets
from typing import Any

import pytest

from runbook.cluster import channel as channel_mod
from runbook.cluster.channel import Channel
from runbook.cluster.wire import Connected, ConnectReply, Gathered, TaskOrder, WireEvent
from runbook.facts import Facts
from runbook.graph import TaskKey


class FakeSession:
    """What the channel needs of a RunSession: somewhere to put what arrives, a queue of events to send."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, ...]] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def run_later(self, orders: list[TaskOrder]) -> None:
        self.got.append(("run", [o.key for o in orders]))

    def connect_later(self, host: str, sudo_password: str | None) -> None:
        self.got.append(("connect", host, sudo_password))
        if host != "never":   # a connect that hangs (its worker goes away before answering)
            self.queue.put_nowait(Connected(host, ConnectReply(learned=[f"{host} ssh-ed25519 AAAA"])))

    def close_later(self, host: str) -> None:
        self.got.append(("close", host))

    def gather_later(self, host: str) -> None:
        self.got.append(("facts", host))
        if host != "never":
            self.queue.put_nowait(Gathered("stranger", Facts(hostname="stranger")))   # nobody asked: dropped
            self.queue.put_nowait(Gathered(host, Facts(hostname=host, cpu_count=4)))

    async def events(self, wait: float = 1.0) -> list[Any]:
        try:
            first = await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return []
        out = [first]
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


async def _with_worker(body: Any) -> Any:
    from distributed import Scheduler, Worker

    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
        async with Worker(scheduler.address, nthreads=1) as worker:
            channel_mod.install(worker)
            return await body(worker)


async def _open(worker: Any, session: FakeSession) -> Channel:
    """The controller's channel to a session offered on the worker under a fresh token."""
    token = secrets.token_urlsafe(32)
    channel_mod.offer(token, session)   # type: ignore[arg-type]
    return await Channel.open(worker.address, {}, token)


def run(body: Any) -> Any:
    return asyncio.run(asyncio.wait_for(_with_worker(body), 60))


def order(task_id: int, step: str, host: str) -> TaskOrder:
    return TaskOrder(task_id, TaskKey(step, host), False, {})


def test_orders_connects_and_closes_reach_the_session_in_order_and_events_come_back() -> None:
    session = FakeSession()

    async def body(worker: Any) -> tuple[ConnectReply, list[Any]]:
        chan = await _open(worker, session)
        events: list[Any] = []
        reader = asyncio.ensure_future(_read_into(chan, events))
        answer = await chan.connect("h1", None)   # answered among the events, taken out of them
        await chan.send([order(1, "one", "h1"), order(2, "two", "h1")])
        await chan.close_host("h1")
        for seq in range(3):
            session.queue.put_nowait(WireEvent(1, seq, "notice", ("info", f"n{seq}")))
        while len(events) < 3:
            await asyncio.sleep(0.01)
        reader.cancel()
        await chan.close()
        return answer, events

    answer, events = run(body)
    assert answer == ConnectReply(learned=["h1 ssh-ed25519 AAAA"])
    assert session.got == [("connect", "h1", None), ("run", [TaskKey("one", "h1"), TaskKey("two", "h1")]),
                           ("close", "h1")]
    assert [e.seq for e in events] == [0, 1, 2] and events[0].args == ("info", "n0")


@pytest.mark.parametrize("ask", ["connect", "facts"])
def test_a_connect_or_facts_request_waiting_when_its_worker_goes_away_fails_with_oserror(ask: str) -> None:
    session = FakeSession()

    async def body(worker: Any) -> None:
        chan = await _open(worker, session)
        reader = asyncio.ensure_future(_read_into(chan, []))
        waiting = asyncio.ensure_future(chan.connect("never", None) if ask == "connect" else chan.gather("never"))
        while not session.got:
            await asyncio.sleep(0.01)
        await worker.close()   # the worker is gone before it answers
        with pytest.raises(OSError):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(OSError):
            await reader

    run(body)
    assert session.got == ([("connect", "never", None)] if ask == "connect" else [("facts", "never")])


def test_a_facts_request_reaches_the_session_and_its_answer_comes_back_to_the_caller_not_the_events() -> None:
    session = FakeSession()

    async def body(worker: Any) -> tuple[Gathered, list[Any]]:
        chan = await _open(worker, session)
        events: list[Any] = []
        reader = asyncio.ensure_future(_read_into(chan, events))
        answer = await asyncio.wait_for(chan.gather("h1"), 10)
        session.queue.put_nowait(WireEvent(None, 0, "notice", ("info", "after")))
        while not events:
            await asyncio.sleep(0.01)
        reader.cancel()
        await chan.close()
        return answer, events

    answer, events = run(body)
    assert session.got == [("facts", "h1")]
    assert answer == Gathered("h1", Facts(hostname="h1", cpu_count=4))
    assert [e.args for e in events] == [("info", "after")]   # neither answer is delivered as a run event


async def _read_into(chan: Channel, events: list[Any]) -> None:
    while True:
        events += await chan.receive()


@pytest.mark.parametrize("presented", ["wrong", "replayed"])
def test_a_wrong_or_replayed_token_gets_no_channel(presented: str) -> None:
    session = FakeSession()

    async def body(worker: Any) -> None:
        token = secrets.token_urlsafe(32)
        channel_mod.offer(token, session)   # type: ignore[arg-type]
        if presented == "replayed":   # the controller's own channel claims the session first
            first = await Channel.open(worker.address, {}, token)
        intruder = await Channel.open(worker.address, {}, token if presented == "replayed" else "x" * 43)
        with contextlib.suppress(OSError):   # the worker may have closed it already
            await intruder.send([order(9, "evil", "h1")])
        with pytest.raises(OSError):   # the worker closed it without reading an order
            await asyncio.wait_for(intruder.receive(), 10)
        if presented == "replayed":
            await first.close()

    run(body)
    assert session.got == []   # no order of the intruder's reached the session


def test_a_withdrawn_session_gets_no_channel() -> None:
    session = FakeSession()

    async def body(worker: Any) -> None:
        token = secrets.token_urlsafe(32)
        channel_mod.offer(token, session)   # type: ignore[arg-type]
        channel_mod.withdraw(token)         # the run ended before its controller opened the channel
        late = await Channel.open(worker.address, {}, token)
        with pytest.raises(OSError):
            await asyncio.wait_for(late.receive(), 10)

    run(body)
    assert session.got == []


class GarblingSession(FakeSession):
    """A session (or a worker) whose batch is not a list of run events."""

    def __init__(self, batch: Any) -> None:
        super().__init__()
        self.batch = batch

    async def events(self, wait: float = 1.0) -> Any:
        await asyncio.sleep(0.05)
        return self.batch


@pytest.mark.parametrize("batch", [["rm -rf /"], [WireEvent(1, 0, "notice", ("info", "ok")), 42], ("not", "a list")],
                         ids=["a-string", "an-int-among-events", "a-tuple"])
def test_a_worker_batch_that_is_not_run_events_ends_the_channel_as_a_lost_worker(batch: Any) -> None:
    """Nothing of it is delivered; the connect waiting on that worker fails with OSError, as for a worker gone."""
    session = GarblingSession(batch)

    async def body(worker: Any) -> tuple[list[Any], BaseException | None]:
        chan = await _open(worker, session)
        waiting = asyncio.ensure_future(chan.connect("never", None))
        events: list[Any] = []
        with pytest.raises(OSError, match="not a batch of run events"):
            await asyncio.wait_for(_read_into(chan, events), 10)
        error = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 10)
        await chan.close()
        return events, error[0]

    events, error = run(body)
    assert events == []
    assert isinstance(error, OSError)


@pytest.mark.parametrize("data", [b"\x80\x05garbage", b"", pickle.dumps(["x"] * 3)[:-4]], ids=["bytes", "empty", "cut"])
def test_an_unreadable_worker_message_is_an_oserror(data: bytes) -> None:
    with pytest.raises(OSError, match="unreadable message"):
        channel_mod._batch(data)


@pytest.mark.parametrize("message", [b"not a pickle", ("run", "not a list of orders"), ("run", [("evil",)]),
                                     ("connect", "h1"), ("close", 7), ("facts", ["h1"]), ("facts",),
                                     ("shell", "rm -rf /"), ["run", []], 42],
                         ids=["bytes", "run-str", "run-tuples", "connect-short", "close-int", "facts-list", "facts-short",
                              "unknown", "list", "int"])
def test_a_message_that_is_not_an_order_ends_the_channel_and_reaches_no_session(message: Any) -> None:
    """The worker closes the channel (the controller then counts its tasks lost); the session is never called."""
    session = FakeSession()

    async def body(worker: Any) -> None:
        chan = await _open(worker, session)
        data = message if isinstance(message, bytes) else pickle.dumps(message)
        await chan.comm.write(data)
        with contextlib.suppress(OSError):   # the worker may have closed it already
            await chan.send([order(9, "after", "h1")])
        with pytest.raises(OSError):
            await asyncio.wait_for(chan.receive(), 10)

    run(body)
    assert session.got == []
