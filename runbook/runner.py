"""The library entry point: prepare a run (playbook, hosts, secrets, identity, observers) and execute it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

from runbook.audit import AuditTrail, Redactor, default_audit_path, git_commit_of, operator_name
from runbook.connections import Connection, ConnectOptions, connect
from runbook.errors import Location, PlaybookError, Problem
from runbook.events import EventStream, Observer, RunInfo
from runbook.engine import ExecOptions, Executor, SavedPrediction
from runbook.engine.loops import loop_secrets
from runbook.graph import StepGraph, TaskKey
from runbook.inventory import Host, Inventory
from runbook.loader import load_playbook
from runbook.model import Playbook
from runbook.results import RunMode, RunResult, TaskResult


@dataclass
class RunRequest:
    """Everything a caller can ask of a run; the CLI fills it from flags."""

    mode: RunMode | str = RunMode.RUN          # run | plan | apply | resume
    limit: str | None = None
    extra_vars: dict[str, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    skip_tags: frozenset[str] = frozenset()
    assume_yes: bool = False
    interactive: bool = False
    ask: Callable[[str], bool] | None = None
    host_key_checking: str | None = None       # strict | accept-new | off; None: playbook, inventory, then strict
    known_hosts: str | None = None
    connect_timeout: float = 10.0
    concurrency: int | None = None
    operator: str | None = None
    audit_log: str | os.PathLike | None = None
    audit: bool = True
    state_dir: str | os.PathLike | None = None  # where run state files go; default: beside the audit trail
    observers: list[Observer] = field(default_factory=list)
    handle_signals: bool = False
    window_guard: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    plan_hash: str | None = None
    predictions: dict[TaskKey, SavedPrediction] | None = None
    allow_drift: bool = False
    previous: dict[TaskKey, TaskResult] = field(default_factory=dict)
    registers: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: str | None = None
    output_limit: int = 4096
    stop: threading.Event | None = None          # set it to stop the run as a first interrupt would (servers)
    start_at_step: str | None = None             # id or name: the steps it depends on are skipped
    cluster: str | None = None                   # run tasks on Dask workers: local:N, tcp://HOST:8786 (docs/cluster.md)


@dataclass
class Prepared:
    """A run that is ready to start: its model, hosts, secrets, identity and redactor."""

    playbook: Playbook
    playbook_path: str
    inventory: Inventory
    hosts: list[Host]
    secrets: dict[str, str]
    redactor: Redactor
    info: RunInfo
    steps: StepGraph


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def resolve_secrets(playbook: Playbook) -> dict[str, str]:
    """Read `secrets:` (env:NAME, file:PATH); a missing source is a located error."""
    out: dict[str, str] = {}
    problems: list[Problem] = []
    source = playbook._source
    for name, ref in playbook.secrets.items():
        kind, _, target = ref.partition(":")
        loc = source.locate(("secrets", name)) if source else Location("<playbook>")
        if kind == "env":
            if target not in os.environ:
                problems.append(Problem(f"secret `{name}`: environment variable {target} is not set", loc,
                                        f"export {target}=... before the run"))
                continue
            out[name] = os.environ[target]
        else:
            path = Path(os.path.expanduser(target))
            if not path.is_absolute() and source is not None:
                path = Path(source.file).resolve().parent / path
            try:
                out[name] = path.read_text(encoding="utf-8").rstrip("\n")
            except OSError as exc:
                problems.append(Problem(f"secret `{name}`: cannot read {path}: {exc.strerror}", loc,
                                        "check the path and its permissions"))
    if problems:
        raise PlaybookError(problems)
    return out


def host_key_mode(request: RunRequest, playbook: Playbook, hosts: list[Host]) -> str:
    """The host-key policy: flag, then playbook, then inventory (`host_key_checking`), then strict."""
    if request.host_key_checking:
        return request.host_key_checking
    if playbook.host_key_checking:
        return playbook.host_key_checking
    return inventory_host_key_mode(hosts)


def inventory_host_key_mode(hosts: Sequence[Host]) -> str:
    """The host-key policy the inventory sets (`host_key_checking` of the first host that has it), else strict."""
    for h in hosts:
        value = h.vars.get("host_key_checking", h.vars.get("ansible_host_key_checking"))
        if value is not None:
            if value is False or str(value).lower() in ("false", "off", "no"):
                return "off"
            if str(value).lower() in ("accept-new", "strict"):
                return str(value).lower()
            return "strict"
    return "strict"




def prepare(playbook: Playbook | str | os.PathLike, inventory: Inventory | str | os.PathLike | Sequence[str | os.PathLike] | None,
            request: RunRequest) -> Prepared:
    """Load and check everything a run needs before it touches a host."""
    pb = playbook if isinstance(playbook, Playbook) else load_playbook(playbook)
    pb_path = str(Path(pb._source.file).resolve()) if pb._source else str(playbook)
    inv = inventory if isinstance(inventory, Inventory) else (
        Inventory.load(inventory) if inventory is not None else Inventory.default())
    hosts = inv.select(pb.hosts, request.limit)
    check_delegates(pb, inv)
    secrets = resolve_secrets(pb)
    redactor = Redactor.from_vars({}, secrets)
    # Secret-named variables at any depth, and every string under them (lists, mappings).
    redactor.add_secrets_in(pb.vars)
    for h in hosts:
        redactor.add_secrets_in(h.vars)
    redactor.add_secrets_in(request.extra_vars)
    redactor.add_all(loop_secrets(pb))   # secret-named fields written into `loop:` lists
    steps = StepGraph.build(pb)
    if request.start_at_step:
        pb, steps = start_at(pb, steps, request.start_at_step)
    info = RunInfo(
        run_id=request.run_id or new_run_id(), mode=RunMode(request.mode), playbook_path=pb_path, playbook_name=pb.runbook,
        playbook_hash=pb._source.content_hash() if pb._source else "", inventory_source=inv.source,
        inventory_hash=inv.content_hash(), hosts=[h.name for h in hosts], operator=operator_name(request.operator),
        control_host=socket.gethostname(), host_key_checking=host_key_mode(request, pb, hosts),
        extra_vars=redactor.redact(dict(request.extra_vars)), plan_hash=request.plan_hash,
        git_commit=git_commit_of(pb_path) if pb._source else None, started_at=time.time(),
        details=dict(request.details),
        playbook_files={path: hashlib.sha256(text.encode()).hexdigest() for path, text in sorted(pb._files.items())})
    return Prepared(pb, pb_path, inv, hosts, secrets, redactor, info, steps)


def check_delegates(playbook: Playbook, inventory: Inventory) -> None:
    """Before a host is touched: every literal `delegate_to` names an inventory host (or `controller`)."""
    from runbook.checks import delegate_problems

    problems = delegate_problems(playbook, inventory.hosts)
    if problems:
        raise PlaybookError(problems)


def start_at(playbook: Playbook, steps: StepGraph, wanted: str) -> tuple[Playbook, StepGraph]:
    """A copy of the playbook whose steps before `wanted` (all it depends on) are skipped, with its graph."""
    from runbook.compose import find_step, rescue_of

    start = find_step(playbook, wanted)
    if rescue_of(start):
        from runbook.errors import ValidationError

        raise ValidationError(f"--start-at-step {wanted}: a rescue step runs only after a step of its block failed",
                              hint=f"start at the block `{rescue_of(start)[-1]}` instead")
    before = steps.upstream(start.step_id)
    reason = f"before --start-at-step {wanted}"
    copy = playbook.model_copy()
    copy.steps = [s.model_copy() if s.step_id in before else s for s in playbook.steps]
    for s in copy.steps:
        if s.step_id in before:
            s._skip = reason
    for name in ("_source", "_groups", "_units", "_files"):
        setattr(copy, name, getattr(playbook, name))
    return copy, StepGraph.build(copy)


def connector(request: RunRequest, mode: str, sudo_password: str | None) -> Callable[[Host], Connection]:
    """A function that builds the (unopened) connection for an inventory host, of the kind it names."""
    options = ConnectOptions(host_key_checking=mode, known_hosts=request.known_hosts,
                             connect_timeout=request.connect_timeout, sudo_password=sudo_password)
    return lambda host: connect(host, host.connection, options)


def state_dir_for(request: RunRequest, prepared: Prepared) -> Path:
    """Where run state files go: `--state-dir`, else `runs/` beside the audit trail."""
    if request.state_dir:
        return Path(request.state_dir)
    return audit_path_for(request, prepared).parent / "runs"


def audit_path_for(request: RunRequest, prepared: Prepared) -> Path:
    """The audit trail file of a run."""
    return Path(request.audit_log) if request.audit_log else default_audit_path(prepared.playbook_path)


def execute(prepared: Prepared, request: RunRequest) -> RunResult:
    """Run a prepared playbook with the audit trail, the run state and the caller's observers attached."""
    from runbook.state import RunState, run_lock

    observers: list[Observer] = []
    if request.audit:
        observers.append(AuditTrail(audit_path_for(request, prepared), prepared.redactor,
                                    output_limit=request.output_limit))
    keeps_state = RunMode(request.mode) != RunMode.PLAN
    if keeps_state:
        observers.append(RunState(state_dir_for(request, prepared), prepared.redactor, request))
    observers.extend(request.observers)
    sudo_password = prepared.secrets.get("sudo_password") or next(
        (str(h.vars[k]) for h in prepared.hosts for k in ("ansible_become_password", "become_password") if k in h.vars), None)
    groups = {name: prepared.inventory.group_hosts(name) for name in prepared.inventory.groups}
    options = ExecOptions(
        mode=RunMode(request.mode), extra_vars=dict(request.extra_vars), secrets=prepared.secrets, tags=request.tags,
        skip_tags=request.skip_tags, assume_yes=request.assume_yes, interactive=request.interactive, ask=request.ask,
        concurrency=request.concurrency, connect=connector(request, prepared.info.host_key_checking, sudo_password),
        window_guard=request.window_guard, predictions=request.predictions, allow_drift=request.allow_drift,
        previous=request.previous, registers=request.registers, groups=groups,
        handle_signals=request.handle_signals, playbook_dir=str(Path(prepared.playbook_path).parent), stop=request.stop,
        inventory_hosts=dict(prepared.inventory.hosts))
    executor = Executor(prepared.playbook, prepared.hosts, prepared.info, EventStream(observers), options,
                        steps=prepared.steps)
    lock = run_lock(state_dir_for(request, prepared), prepared.info.run_id) if keeps_state else contextlib.nullcontext()
    with lock:
        if request.cluster:
            from runbook.cluster.launch import execute_on_cluster
            return execute_on_cluster(prepared, request, options, sudo_password, executor.execute)
        return executor.execute()


def run(playbook: Playbook | str | os.PathLike, inventory: Inventory | str | os.PathLike | None = None,
        **kwargs: Any) -> RunResult:
    """Run a playbook over an inventory and return the result; keyword arguments are RunRequest fields."""
    request = RunRequest(**kwargs)
    return execute(prepare(playbook, inventory, request), request)
