"""The controller's side of a worker's stream: order, duplicates, and what a worker may not do (attack cases)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from runbook.cluster.delivery import Call, Delivery
from runbook.cluster.facts import RunFacts
from runbook.cluster.wire import TaskError, TaskOutcome, WireEvent
from runbook.engine.registers import Registers
from runbook.events import EventStream, RunInfo, TaskRef
from runbook.facts import Facts, FactStore
from runbook.graph import TaskKey
from runbook.results import RunMode, RunResult, Status, TaskResult
from tests.helpers import EventRecorder

INFO = RunInfo("r1", RunMode.RUN, "pb.yml", "t", "", "", "", ["h1", "h2"], "op", "ctl", "strict")


def pool() -> tuple[Delivery, EventRecorder, Registers, list[tuple[str, str]]]:
    """A delivery wired to a recorder, registers and a scheduler stub; no cluster is needed to deliver."""
    recorder = EventRecorder()
    registers = Registers(["h1", "h2"])
    stopped: list[tuple[str, str]] = []
    steps = SimpleNamespace(step=lambda sid: SimpleNamespace(action="shell"))
    executor = SimpleNamespace(runner=SimpleNamespace(registers=registers), events=EventStream([recorder]), info=INFO,
                               scheduler=SimpleNamespace(stop_host=lambda h, r: stopped.append((h, r))), steps=steps)
    return Delivery(executor, {"tcp://w:1": "w1"}), recorder, registers, stopped


def op(p: Delivery, task_id: int, host: str, step: str) -> Future[Any]:
    fut: Future[Any] = Future()
    p.ops[task_id] = Call(fut, host, TaskKey(step, host), worker="tcp://w:1")
    return fut


def result(host: str, step: str) -> TaskResult:
    return TaskResult(host, step, "shell", Status.CHANGED, worker="w1")


def test_events_are_delivered_once_in_order_before_the_result() -> None:
    p, recorder, _, _ = pool()
    fut = op(p, 1, "h1", "s1")
    started = WireEvent(1, 0, "task_started", (TaskRef("h1", "s1", "s1", "shell"),))
    finished = WireEvent(1, 1, "task_finished", (result("h1", "s1"),))
    p.take([started, started, finished])          # a repeat is dropped
    p.take([TaskOutcome(1, result("h1", "s1"), [], [], "w1")])
    p.take([finished])                            # after the outcome: the task is done
    assert recorder.events == [("task_started", ("h1", "s1", 1)), ("task_finished", ("h1", "s1", "changed"))]
    assert fut.result().status == Status.CHANGED


def test_a_worker_cannot_emit_run_events_nor_act_for_other_hosts() -> None:
    p, recorder, registers, stopped = pool()
    fut = op(p, 1, "h1", "s1")
    forged = RunResult("r1", RunMode.RUN, ["h1"])
    p.take([WireEvent(None, 0, "run_finished", (forged,)), WireEvent(None, 0, "host_unreachable", ("h2", "x")),
                  WireEvent(None, 0, "notice", ("warning", "hello"))])
    assert recorder.events == [("notice", "hello")]
    writes = [("store", ("h1", "out", {"rc": 0}), {"shared": False}),
              ("store", ("h2", "out", {"rc": 99}), {"shared": False}),     # another host's register
              ("__init__", (["h1"],), {}),                                   # not a register write
              ("store", ("h1", "evil", {}), {"shared": False, "x": 1})]      # unknown keyword
    p.take([TaskOutcome(1, result("h1", "s1"), writes, [("h2", "stop"), ("h1", "drift")], "w1")])
    assert fut.result().status == Status.CHANGED
    assert registers.visible("h1") == {"out": {"rc": 0}}
    assert registers.visible("h2") == {}
    assert stopped == [("h1", "drift")]


def test_an_answer_for_another_task_is_refused() -> None:
    p, recorder, _, _ = pool()
    fut = op(p, 1, "h1", "s1")
    p.take([TaskOutcome(1, result("h2", "s9"), [], [], "w1")])
    res = fut.result()
    assert (res.host, res.step_id, res.status) == ("h1", "s1", Status.FAILED)
    assert "answered for another task" in res.message
    fut2 = op(p, 2, "h2", "s1")
    p.take([TaskError(2, "ValueError: boom")])
    assert fut2.result().status == Status.FAILED and "boom" in fut2.result().message
    assert [e[0] for e in recorder.events] == ["task_finished", "task_finished"]


def test_an_outcome_brings_its_own_hosts_facts_to_the_controller_before_its_result() -> None:
    p, _, _, _ = pool()
    store = FactStore(gatherer=lambda host, conn: Facts(hostname="gathered-here"))
    p.facts = RunFacts(store, lambda host: True, lambda host: "tcp://w:1", lambda worker, host: None)  # type: ignore[arg-type, return-value]
    seen: list[Facts | None] = []
    fut = op(p, 1, "h1", "s1")
    fut.add_done_callback(lambda f: seen.append(store.known("h1")))
    p.take([TaskOutcome(1, result("h1", "s1"), [], [], "w1", Facts(hostname="h1", cpu_count=8))])
    assert seen == [Facts(hostname="h1", cpu_count=8)]   # known when its dependents start
    assert p.facts.for_order("tcp://w:1", "h1") is None   # that worker has them already
    fut2 = op(p, 2, "h1", "s2")
    p.take([TaskOutcome(2, result("h1", "s2"), [], [], "w1", "not facts")])   # a broken worker's payload
    assert fut2.result().status == Status.CHANGED and store.known("h1") == Facts(hostname="h1", cpu_count=8)
    assert store.known("h2") is None
