"""What crosses between the controller and a worker: a run's setup, one task's order, its outcome, its events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from runbook.engine.options import ExecOptions
from runbook.facts import Facts
from runbook.events import RunInfo
from runbook.graph import TaskKey
from runbook.inventory import Host
from runbook.model import Playbook
from runbook.results import PredictionKind, Status, TaskResult

# Inventory variables that are credentials: a worker gets the run's sudo password with a host's connect
# instead, and templates on workers do not see them.
CREDENTIAL_VARS = frozenset({"ansible_become_password", "become_password", "ansible_password", "ansible_ssh_pass"})


@dataclass
class SessionSetup:
    """A run as a worker needs it, sent once per worker (directly to it, never through the scheduler)."""

    playbook: Playbook            # the composed, already-loaded model: workers never read the playbook file
    hosts: list[Host]             # every selected host (templates read `hostvars`), credentials removed
    info: RunInfo
    options: ExecOptions          # without callables, secrets, resumed results
    known_hosts: str              # the controller's known_hosts (its file and the system one), checked on the worker
    host_key_checking: str
    connect_timeout: float
    threads: int


@dataclass
class TaskOrder:
    """One task to run, with what the controller knows that it needs."""

    task_id: int
    key: TaskKey
    rescue: bool
    registers: dict[str, Any]                     # the registers it sees (shared ones, then its host's)
    unknown: dict[str, str] = field(default_factory=dict)   # plan: register name -> step that cannot set it
    stale: list[str] = field(default_factory=list)          # plan: names read before a planned change
    secrets: dict[str, str] = field(default_factory=dict)   # only the ones its step reads
    ancestors: dict[TaskKey, PredictionKind | None] = field(default_factory=dict)   # plan/apply: what it waits for
    gate: tuple[Status, str] | None = None        # blocks: the controller's verdict on a rescue step here
    sources: dict[tuple[str, str], bytes] = field(default_factory=dict)   # its step's files, the first time here
    facts: Facts | None = None                    # its host's facts, gathered elsewhere (a host moved here)


@dataclass
class WireEvent:
    """One event a task emitted on a worker: the hook name, its arguments after `run`, and its place in the task."""

    task_id: int | None
    seq: int
    hook: str
    args: tuple[Any, ...]


@dataclass
class TaskOutcome:
    """A task's result and its effects on the controller's state (its events came before it, on the same stream)."""

    task_id: int
    result: TaskResult
    writes: list[tuple[str, tuple[Any, ...], dict[str, Any]]]   # register calls, replayed on the controller
    stopped: list[tuple[str, str]]                              # hosts to stop (apply: drift), with why
    worker: str
    facts: Facts | None = None                                  # its host's facts, when this task gathered them


@dataclass
class TaskError:
    """A task the worker could not run at all (a bug there): it ends failed, with why."""

    task_id: int
    message: str


@dataclass
class ConnectReply:
    """How opening a host's connection on a worker went; new known_hosts lines (accept-new) to record."""

    reason: str | None = None
    hint: str | None = None
    learned: list[str] = field(default_factory=list)


@dataclass
class Connected:
    """The answer to a connect the controller asked for on the channel."""

    host: str
    reply: ConnectReply


@dataclass
class Gathered:
    """The answer to the controller's request for a host's facts (a step on the controller reads them)."""

    host: str
    facts: Facts | None = None
    reason: str | None = None     # why they could not be gathered
    failed: Literal["facts", "connect", "connection"] = "facts"   # the gather failed, the connect, or it broke


StreamItem = WireEvent | TaskOutcome | TaskError   # what the controller delivers of a worker's stream, in order
ChannelItem = StreamItem | Connected | Gathered    # what a worker's channel carries (answers too)
