"""What the engine is asked to do: the options of one execution, and what a reviewed plan or earlier run decided."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from runbook.connections import Connection
from runbook.graph import TaskKey
from runbook.results import PredictionKind, RunMode, TaskResult


class HostLike(Protocol):
    """What the engine needs of an inventory host."""

    @property
    def name(self) -> str: ...
    @property
    def vars(self) -> dict[str, Any]: ...


class WindowGuardLike(Protocol):
    """What the engine needs of a maintenance window guard."""

    def allows_start(self, max_duration: float | None) -> bool: ...


@dataclass
class SavedPrediction:
    """One prediction of a reviewed plan, as `apply` needs it."""

    kind: PredictionKind | str
    reason: str = ""
    state: str | None = None


@dataclass
class ExecOptions:
    """How to execute: mode, variables, filters, interaction, and what a plan or earlier run decided."""

    mode: RunMode = RunMode.RUN
    extra_vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    skip_tags: frozenset[str] = frozenset()
    assume_yes: bool = False
    interactive: bool = False
    ask: Callable[[str], bool] | None = None
    concurrency: int | None = None
    connect: Callable[[Any], Connection] | None = None    # host -> unopened connection
    window_guard: WindowGuardLike | None = None
    predictions: dict[TaskKey, SavedPrediction] | None = None   # apply: the reviewed plan
    allow_drift: bool = False
    previous: dict[TaskKey, TaskResult] = field(default_factory=dict)  # resume: tasks already done
    registers: dict[str, dict[str, Any]] = field(default_factory=dict)   # resume: their registers
    groups: dict[str, list[str]] = field(default_factory=dict)
    interrupt_grace: float = 10.0
    stop: threading.Event | None = None      # set by an embedding program (e.g. `runbook serve` shutting down)
    handle_signals: bool = False
    playbook_dir: str = "."
    inventory_hosts: Mapping[str, Any] = field(default_factory=dict)   # every inventory host: where delegate_to may run
    pool: Callable[[Any, int], Any] | None = None   # (executor, threads) -> its TaskPool; None: in-process threads

    def __post_init__(self) -> None:
        self.mode = RunMode(self.mode)
