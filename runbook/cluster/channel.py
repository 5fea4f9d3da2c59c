"""One comm per worker and run, kept open for the run: task orders go out on it, events come back.

The task traffic is the distributed path's hot loop. An actor call per batch of orders and another
per batch of events cost the controller and the worker about a millisecond each in Dask's RPC layer
(the actor lookup, the reply, Dask's per-object serialization), as much as the task's own SSH work.
So once a run's session is set up (an actor call), the controller opens one comm to the worker's
own address (the worker's listener and its TLS settings; no port of runbook's own), asks for the
`runbook_channel` handler with the session's one-time token, and both sides keep that comm: order
batches, connects, facts requests, closes and a first interrupt one way; batches of events and the
answers to connects and facts requests the other; each message one pickle (the trust Dask's own
messages already need: the cluster's members run each other's code).
"""

from __future__ import annotations

import asyncio
import pickle
from typing import TYPE_CHECKING, Any, TypeVar

from runbook.cluster.wire import Connected, ConnectReply, Gathered, TaskError, TaskOrder, TaskOutcome, WireEvent

if TYPE_CHECKING:
    from runbook.cluster.wire import ChannelItem, StreamItem
    from runbook.cluster.worker import RunSession

OP = "runbook_channel"
ITEMS = (WireEvent, TaskOutcome, TaskError, Connected, Gathered)   # what a worker may send back, in a list
EVENT_WAIT = 1.0   # seconds the worker's writer waits for events before it looks again

T = TypeVar("T")

_offered: dict[str, RunSession] = {}   # token -> a set-up session waiting for its controller's channel


# --- the worker side --------------------------------------------------------------------------------

def install(worker: Any) -> None:
    """Give a Dask worker the channel's handler (a plain `dask worker` gets it with its first run session)."""
    worker.handlers.setdefault(OP, _serve)


def offer(token: str, session: RunSession) -> None:
    """A session is set up: its controller may now open its channel with `token`."""
    _offered[token] = session


def withdraw(token: str) -> None:
    """The session is over: no channel opens to it any more."""
    _offered.pop(token, None)


async def _serve(comm: Any, token: str = "") -> Any:
    """The worker's end: orders read and started, the session's events written back, until the comm closes."""
    from distributed.core import Status

    session = _offered.pop(str(token), None)   # one channel per session: a replayed token finds nothing
    if session is None:
        await comm.close()
        return Status.dont_reply
    writer = asyncio.ensure_future(_write_events(comm, session))
    try:
        while not writer.done():
            message = _order(await comm.read())
            if message is None:   # not a channel message: the channel ends (its tasks count as lost there)
                break
            kind, *args = message
            if kind == "run":
                session.run_later(args[0])
            elif kind == "connect":
                session.connect_later(*args)
            elif kind == "facts":
                session.gather_later(args[0])
            elif kind == "close":
                session.close_later(args[0])
            elif kind == "drain":
                session.drain()
    except (OSError, EOFError):   # the controller closed it, or went away: the run is over for this channel
        pass
    finally:
        writer.cancel()
    if not comm.closed():   # else Dask's own handler would read what follows as its messages
        await comm.close()
    return Status.dont_reply


def _order(data: Any) -> tuple[Any, ...] | None:
    """A controller's message, or None when it is not one (unreadable, or not a known order)."""
    try:
        message = pickle.loads(data)
    except Exception:
        return None
    if not isinstance(message, tuple):   # a list would match the patterns below too
        return None
    match message:
        case ("run", list() as orders) if all(isinstance(o, TaskOrder) for o in orders):
            return message
        case ("connect", str(), str() | None) | ("facts", str()) | ("close", str()) | ("drain",):
            return message
    return None


async def _write_events(comm: Any, session: RunSession) -> None:
    while True:
        items = await session.events(EVENT_WAIT)
        if items:
            await comm.write(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))


# --- the controller side ----------------------------------------------------------------------------

def _batch(data: Any) -> list[ChannelItem]:
    """A worker's batch; OSError when it is not one, so the worker counts as gone (its running tasks lost)."""
    try:
        items = pickle.loads(data)
    except Exception as exc:
        raise OSError(f"the worker sent an unreadable message ({type(exc).__name__})") from None
    if not isinstance(items, list) or not all(isinstance(item, ITEMS) for item in items):
        raise OSError(f"the worker sent a message that is not a batch of run events ({type(items).__name__})")
    return items


def _answer(waiting: dict[str, asyncio.Future[T]], host: str, value: T) -> None:
    """Hand an answer to the call waiting for it (none waits any more: it is dropped)."""
    if host in waiting and not waiting[host].done():
        waiting[host].set_result(value)


class Channel:
    """The controller's end of one worker's channel (used on the client's event loop)."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.lock = asyncio.Lock()   # one message at a time: a batch is never interleaved with another
        self.answers: dict[str, asyncio.Future[ConnectReply]] = {}   # host -> its connect, waiting
        self.gathers: dict[str, asyncio.Future[Gathered]] = {}       # host -> its facts, waiting

    @classmethod
    async def open(cls, address: str, connection_args: dict[str, Any], token: str) -> Channel:
        """Connect to the worker (its TLS settings apply) and claim the session's channel."""
        from distributed.comm import connect

        comm = await connect(address, **connection_args)
        await comm.write({"op": OP, "token": token, "reply": False})
        return cls(comm)

    async def send(self, orders: list[TaskOrder]) -> None:
        """Start these tasks on the worker; raises OSError when the worker cannot be reached."""
        await self._write(("run", orders))

    async def connect(self, host: str, sudo_password: str | None) -> ConnectReply:
        """Open a host's connection on the worker; OSError when the worker is gone before it answers."""
        answer: asyncio.Future[ConnectReply] = asyncio.get_running_loop().create_future()
        self.answers[host] = answer
        try:
            await self._write(("connect", host, sudo_password))
            return await answer   # it comes back among the worker's events (see receive)
        finally:
            self.answers.pop(host, None)

    async def gather(self, host: str) -> Gathered:
        """A host's facts, gathered on its worker (which keeps them); OSError when the worker is gone first.

        The run's fact store asks once per host (its other readers wait for that answer)."""
        answer: asyncio.Future[Gathered] = asyncio.get_running_loop().create_future()
        self.gathers[host] = answer
        try:
            await self._write(("facts", host))
            return await answer
        finally:
            self.gathers.pop(host, None)

    async def close_host(self, host: str) -> None:
        """A host is done: close its connection on the worker."""
        await self._write(("close", host))

    async def drain(self) -> None:
        """The run is stopping (a first interrupt): the worker's running loops start no further item."""
        await self._write(("drain",))

    async def _write(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self.lock:
            await self.comm.write(data)

    async def receive(self) -> list[StreamItem]:
        """The worker's next batch of events and outcomes, in order (connect answers go to their callers).

        Raises OSError when the worker is gone (the connects still waiting fail with it)."""
        try:
            items = _batch(await self.comm.read())
        except OSError as exc:
            self.fail(exc)
            raise
        events: list[StreamItem] = []
        for item in items:
            if isinstance(item, Connected):
                _answer(self.answers, item.host, item.reply)
            elif isinstance(item, Gathered):
                _answer(self.gathers, item.host, item)
            else:
                events.append(item)
        return events

    def fail(self, error: OSError) -> None:
        """The worker is gone: every connect (or facts request) still waiting for its answer fails."""
        waiting: list[asyncio.Future[Any]] = [*self.answers.values(), *self.gathers.values()]
        for answer in waiting:
            if not answer.done():
                answer.set_exception(error)

    async def close(self) -> None:
        """The run is over: close the comm (the worker's end stops with it)."""
        if not self.comm.closed():
            await self.comm.close()
