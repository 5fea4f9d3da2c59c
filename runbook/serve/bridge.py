"""The one place the server calls the engine: playbook checks, inventory, windows, run / plan / apply / resume.

Everything else in runbook.serve speaks in jobs and outcomes, so an engine API change is absorbed here.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook.errors import Problem, RunbookError, ValidationError
from runbook.inventory import Inventory

# An inventory name that can be selected exactly with an anchored `~regex` limit term (no pattern separators).
_SELECTABLE = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_playbook(path: str | Path) -> list[Problem]:
    """Every problem of a playbook a rule names, its maintenance window included."""
    from runbook.loader import validate_playbook
    from runbook.window import resolve_window

    report = validate_playbook(path)
    problems = list(report.problems)
    if report.playbook is not None and report.playbook.window is not None:
        try:
            resolve_window(report.playbook, str(path))
        except ValidationError as exc:
            problems.extend(exc.problems)
    return problems


def load_inventory(sources: list[str] | None) -> Inventory:
    """The server's inventory (the default one when none is given)."""
    return Inventory.load(sources)


def map_hosts(inventory: Inventory, names: list[str]) -> tuple[list[str], list[str]]:
    """Inventory hosts for alert host names (by name, else by `ansible_host`); returns (hosts, why-not reasons)."""
    found: list[str] = []
    missing: list[str] = []
    by_address: dict[str, list[str]] = {}
    for h in inventory.hosts.values():
        by_address.setdefault(h.address.lower(), []).append(h.name)
    lowered = {n.lower(): n for n in inventory.hosts}
    for name in names:
        match = name if name in inventory.hosts else lowered.get(name.lower())
        if match is None:
            candidates = by_address.get(name.lower(), [])
            if len(candidates) > 1:
                missing.append(f"`{name}` is the address of several inventory hosts ({', '.join(candidates)})")
                continue
            match = candidates[0] if candidates else None
        if match is None:
            missing.append(f"`{name}` is not in the inventory")
        elif not _SELECTABLE.fullmatch(match) or match in inventory.groups:
            missing.append(f"inventory host `{match}` cannot be selected alone (its name is a group's or has pattern characters)")
        elif match not in found:
            found.append(match)
    return found, missing


def exact_limit(host: str) -> str:
    """A host pattern that selects exactly this inventory host (a checked name, anchored and escaped)."""
    if not _SELECTABLE.fullmatch(host):
        raise ValueError(f"unsafe host name {host!r}")
    return "~^" + re.escape(host) + "$"


@dataclass
class WindowState:
    """A playbook's maintenance window right now."""

    open: bool
    next_open: float | None = None
    describe: str = ""


def window_state(playbook: str) -> WindowState | None:
    """Whether the playbook's window is open now and when it opens next; None when it has no window."""
    from runbook.loader import load_playbook
    from runbook.window import SystemClock, resolve_window

    schedule = resolve_window(load_playbook(playbook), playbook)
    if schedule is None:
        return None
    now = SystemClock().now()
    if schedule.is_open(now):
        return WindowState(True, None, schedule.describe())
    upcoming = schedule.next_openings(now, 1)
    return WindowState(False, upcoming[0][0].timestamp() if upcoming else None, schedule.describe())


@dataclass
class RunSettings:
    """Server-wide settings of every run."""

    inventory: Inventory
    audit_log: Path
    state_dir: Path
    plan_dir: Path
    stop: threading.Event
    host_key_checking: str | None = None
    known_hosts: str | None = None
    operator: str = "runbook-serve"


@dataclass
class Outcome:
    """What one engine call produced."""

    run_id: str
    exit_code: int
    results: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    plan_path: str | None = None
    error: str | None = None

    @property
    def checkpointed(self) -> bool:
        """True when the run stopped early with work left (window closed: deferred; server stopping: not run)."""
        return (self.exit_code == 5 and any(r["status"] == "deferred" for r in self.results)) or (
            self.exit_code == 130 and any(r["status"] == "not_run" for r in self.results))


def _summary(result: Any, redactor: Any) -> list[dict[str, Any]]:
    return [{"host": r.host, "step_id": r.step_id, "status": str(r.status), "changed": r.changed,
             "message": redactor.redact(r.message)[:300]} for r in result.results]


def new_run_id() -> str:
    """A fresh engine run id (stored with the job before the run starts, so a killed server can resume it)."""
    from runbook.runner import new_run_id as make

    return make()


def _request(settings: RunSettings, mode: str, host: str, extra_vars: dict[str, Any], details: dict[str, Any],
             run_id: str | None, operator: str | None = None, **more: Any) -> Any:
    from runbook.runner import RunRequest

    return RunRequest(mode=mode, limit=exact_limit(host), extra_vars=dict(extra_vars),
                      host_key_checking=settings.host_key_checking, known_hosts=settings.known_hosts,
                      operator=operator or settings.operator, audit_log=settings.audit_log, state_dir=settings.state_dir,
                      details=dict(details), run_id=run_id, **more)


def _prepare(playbook: Any, settings: RunSettings, request: Any, host: str) -> Any:
    from runbook.runner import prepare

    prepared = prepare(playbook, settings.inventory, request)
    if [h.name for h in prepared.hosts] != [host]:
        # Defence in depth: a remediation for one host must never reach another.
        raise ValidationError(f"host selection for `{host}` gave {[h.name for h in prepared.hosts]}")
    _attach_window(prepared, request, settings)
    return prepared


def _attach_window(prepared: Any, request: Any, settings: RunSettings) -> None:
    from runbook.window import SystemClock, WindowGuard, resolve_window

    schedule = resolve_window(prepared.playbook, prepared.playbook_path) if prepared.playbook.window is not None else None
    request.window_guard = WindowGuard(schedule, SystemClock()) if schedule else None
    request.stop = settings.stop   # a server shutdown stops the run as an interrupt does; its state is the checkpoint


def run(playbook: str, host: str, extra_vars: dict[str, Any], details: dict[str, Any], settings: RunSettings,
        run_id: str | None = None) -> Outcome:
    """Run a playbook on one host, recorded in the audit trail with the alert's details."""
    from runbook.runner import execute

    request = _request(settings, "run", host, extra_vars, details, run_id)
    prepared = _prepare(playbook, settings, request, host)
    result = execute(prepared, request)
    return Outcome(result.run_id, result.exit_code(), _summary(result, prepared.redactor), result.stop_reason)


def plan(playbook: str, host: str, extra_vars: dict[str, Any], details: dict[str, Any], settings: RunSettings,
         name: str, run_id: str | None = None) -> Outcome:
    """A dry run on one host, saved as a plan file for review (`name` makes its file name)."""
    from runbook.plan import build_plan, write_plan
    from runbook.runner import execute

    request = _request(settings, "plan", host, extra_vars, details, run_id)
    prepared = _prepare(playbook, settings, request, host)
    result = execute(prepared, request)
    settings.plan_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = settings.plan_dir / f"{name}.json"
    write_plan(build_plan(prepared, request, result), str(path))
    return Outcome(result.run_id, result.exit_code(), _summary(result, prepared.redactor), result.stop_reason, str(path))


def plan_summary(path: str) -> dict[str, Any]:
    """What a reviewer needs of a saved plan: its hash, hosts and every prediction (already redacted)."""
    from runbook.plan import load_plan

    doc = load_plan(path, max_age=float("inf"))
    return {"hash": doc["hash"], "playbook": doc["playbook"]["path"], "hosts": doc["hosts"], "created_at": doc["created_at"],
            "predictions": [{k: p.get(k) for k in ("host", "step_id", "prediction", "reason", "diff")} for p in doc["predictions"]]}


def apply(plan_path: str, extra_vars: dict[str, Any], details: dict[str, Any], settings: RunSettings,
          approver: str, run_id: str | None = None, previous_run_id: str | None = None,
          max_age: float = 24 * 3600) -> Outcome:
    """Execute exactly a reviewed plan; refuse when the playbook, inventory, vars or hosts drifted.

    `previous_run_id`: an apply checkpointed earlier; its finished tasks are not run again.
    """
    from runbook.plan import drift_between, host_key_level, load_plan, plan_hash, reviewed_playbook, saved_predictions
    from runbook.runner import execute

    doc = load_plan(plan_path, max_age=max_age)
    if len(doc["hosts"]) != 1:
        raise ValidationError(f"plan {plan_path} is for {len(doc['hosts'])} hosts, expected one")
    host = doc["hosts"][0]
    request = _request(settings, "apply", host, extra_vars, details, run_id, operator=approver, assume_yes=True,
                       plan_hash=plan_hash(doc), predictions=saved_predictions(doc), previous=_done(settings, previous_run_id))
    # As `runbook apply`: the reviewed text, and a host-key policy the plan may raise but never lower.
    request.host_key_checking = host_key_level(doc.get("host_key_checking"), settings.host_key_checking, plan_path)
    prepared = _prepare(reviewed_playbook(doc, plan_path), settings, request, host)
    drifted = drift_between(doc, prepared, extra_vars)
    if drifted:
        return Outcome(prepared.info.run_id, 2, [], None, plan_path, "the plan no longer matches: " + "; ".join(drifted))
    result = execute(prepared, request)
    return Outcome(result.run_id, result.exit_code(), _summary(result, prepared.redactor), result.stop_reason, plan_path)


def _done(settings: RunSettings, run_id: str | None) -> dict[Any, Any]:
    from runbook.state import load_state, resumable

    if not run_id:
        return {}
    try:
        return resumable(load_state(settings.state_dir, run_id))[0]
    except ValidationError:
        return {}


def resume(previous_run_id: str, extra_vars: dict[str, Any], details: dict[str, Any], settings: RunSettings,
           run_id: str | None = None) -> Outcome | None:
    """Continue a checkpointed run (tasks done are not run again); None when it left no state to resume from."""
    from runbook.runner import execute
    from runbook.state import load_state, registers_from, resumable

    try:
        doc = load_state(settings.state_dir, previous_run_id)
    except ValidationError:
        return None
    hosts = doc.get("hosts") or []
    if len(hosts) != 1:
        return None
    host = hosts[0]
    done: dict[Any, Any] = resumable(doc)[0]
    request = _request(settings, "resume", host, extra_vars, {**details, "resumed_from": previous_run_id}, run_id,
                       previous=done)
    prepared = _prepare(doc["playbook_path"], settings, request, host)
    request.registers = registers_from(prepared.playbook, done)
    result = execute(prepared, request)
    return Outcome(result.run_id, result.exit_code(), _summary(result, prepared.redactor), result.stop_reason)


def error_text(exc: BaseException) -> str:
    """A one-line reason for a run that could not start (a located runbook error, or the exception's type)."""
    if isinstance(exc, RunbookError):
        return " | ".join(p.render().replace("\n", " ") for p in exc.problems)[:1000]
    return f"{type(exc).__name__}: {exc}"[:1000]
