"""Build the report model: from a run-state file and audit records, from a live run, or from a plan file.

The documents are read as JSON through the small accessors below, so that a renamed field of a
state file, an audit record or a plan is changed here, in one place.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticError

from runbook import __version__
from runbook.errors import Location, RunbookError, ValidationError
from runbook.report.model import (
    AuditCheck, Event, PlanEntry, PlanHeader, PlanReview, RunHeader, RunReport, StepInfo, TaskEntry,
)

if TYPE_CHECKING:
    from runbook.events import RunInfo
    from runbook.graph import StepGraph
    from runbook.model import Playbook
    from runbook.results import RunResult

MAX_DOCUMENT_BYTES = 512 * 1024 * 1024     # a state file or plan larger than this is not a runbook document
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_TASKS = TypeAdapter(list[TaskEntry])   # one validation call for a whole run: 100,000 tasks in well under a second


# --- reading the documents ------------------------------------------------------------------------

def check_run_id(run_id: str) -> str:
    """A run id or prefix as typed by an operator; anything that could name another file is refused."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise ValidationError(f"`{run_id}` is not a run id", hint="run ids look like 20261123T180003Z-1a2b3c; "
                              "`runbook runs` lists them, `latest` is the newest")
    return run_id


def read_json(path: Path, what: str) -> Any:
    """Read a JSON document with a size limit, turning every failure into a located error."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ValidationError(f"{what} is {size // (1024 * 1024)} MiB, more than a runbook {what} can be",
                                  location=Location(str(path)), hint="is this the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError(f"{what} not found", location=Location(str(path))) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read {what}: {exc}", location=Location(str(path))) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"corrupt {what}: {exc.msg}", location=Location(str(path), exc.lineno, exc.colno)) from None


def find_state(directory: Path, run_id: str) -> Path | None:
    """The state file of a run id, a unique prefix of one, or `latest`; None when there is none."""
    if not directory.is_dir():
        return None
    from runbook.state import LATEST, latest_run   # not at the top: the state module brings the graph's networkx

    if run_id == LATEST:
        newest = latest_run(directory)
        return directory / f"{newest}.json" if newest else None
    files = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    check_run_id(run_id)
    exact = directory / f"{run_id}.json"
    if exact.is_file():
        return exact
    matches = [p for p in files if p.stem.startswith(run_id)]
    if len(matches) > 1:
        raise ValidationError(f"run id prefix `{run_id}` is ambiguous: {', '.join(p.stem for p in matches[:5])}",
                              hint="give more of the run id")
    return matches[0] if matches else None


def latest_run_in_audit(records: list[dict[str, Any]]) -> str | None:
    """The run id of the newest `run.started` record."""
    started = [str(r["run_id"]) for r in records if r.get("event") == "run.started" and r.get("run_id")]
    return started[-1] if started else None


def _fail(path: Path | None, what: str, exc: PydanticError) -> ValidationError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return ValidationError(f"{what}: `{where}`: {err['msg']}", location=Location(str(path)) if path else None,
                           hint="the file is not one runbook wrote, or it was edited")


def is_rescue(task: TaskEntry, rescue_ids: frozenset[str]) -> bool:
    """Whether a saved result is of an on_failure step (by its flag, or by the playbook's section)."""
    return task.rescue or task.step in rescue_ids


def validate_tasks(items: list[Any], what: str, names: list[str], path: Path | None = None) -> list[TaskEntry]:
    """Saved results (mappings) as TaskEntry, validated in one call; the first problem is a located error."""
    for name, d in zip(names, items):
        if not isinstance(d, Mapping):
            raise ValidationError(f"{what}: task `{name}` is not a mapping", location=Location(str(path)) if path else None)
    try:
        return _TASKS.validate_python(items)
    except PydanticError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:])
        raise ValidationError(f"{what} task `{names[int(err['loc'][0])]}`: `{where}`: {err['msg']}",
                              location=Location(str(path)) if path else None,
                              hint="the file is not one runbook wrote, or it was edited") from None


def audit_results(records: list[dict[str, Any]]) -> tuple[list[TaskEntry], int]:
    """The `task.finished` records of a trail as TaskEntry; records that do not validate are counted, not fatal.

    A broken record is what `audit verify` reports (the header shows it); the rest of the run is still worth reading.
    """
    try:
        return _TASKS.validate_python(records), 0
    except PydanticError:
        good = []
        for r in records:
            try:
                good.append(TaskEntry.model_validate(r))
            except PydanticError:
                continue
        return good, len(records) - len(good)


def state_tasks(doc: Mapping[str, Any], path: Path | None = None) -> list[TaskEntry]:
    """The tasks of a state document, validated."""
    raw = doc.get("tasks", {})
    if not isinstance(raw, Mapping):
        raise ValidationError("run state: `tasks` is not a mapping", location=Location(str(path)) if path else None)
    return validate_tasks(list(raw.values()), "run state", [str(k) for k in raw], path)


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _f(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def header_from_state(doc: Mapping[str, Any], started: Mapping[str, Any] | None, path: Path | None) -> RunHeader:
    """The header fields a state file (and the run's `run.started` audit record) hold."""
    started = started or {}
    found = doc.get("details") if isinstance(doc.get("details"), Mapping) else started.get("details")
    details: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    try:
        return RunHeader(
            run_id=str(doc.get("run_id") or started.get("run_id")), mode=str(doc.get("mode") or started.get("mode") or "run"),
            status=str(doc.get("status") or "unknown"),
            playbook_name=str(doc.get("playbook_name") or started.get("playbook_name") or ""),
            playbook_path=str(doc.get("playbook_path") or started.get("playbook_path") or ""),
            playbook_hash=str(doc.get("playbook_hash") or started.get("playbook_hash") or ""),
            inventory_source=str(doc.get("inventory_source") or started.get("inventory_source") or ""),
            inventory_hash=str(doc.get("inventory_hash") or started.get("inventory_hash") or ""),
            operator=str(doc.get("operator") or started.get("operator") or ""),
            control_host=_s(started.get("control_host")), host_key_checking=_s(started.get("host_key_checking")),
            git_commit=_s(started.get("git_commit")), plan_hash=_s(doc.get("plan_hash") or started.get("plan_hash")),
            started_at=_f(doc.get("started_at")) or _f(started.get("started_at")), finished_at=_f(doc.get("finished_at")),
            exit_code=doc.get("exit_code"), stop_reason=_s(doc.get("stop_reason")), limit=_s(doc.get("limit")),
            tags=list(doc.get("tags") or []), skip_tags=list(doc.get("skip_tags") or []),
            extra_vars=dict(doc.get("extra_vars") or started.get("extra_vars") or {}),
            resumed_from=_s(details.get("resumed_from")), window_note=_window_note(details))
    except (PydanticError, TypeError, ValueError) as exc:
        if isinstance(exc, PydanticError):
            raise _fail(path, "run state", exc) from None
        raise ValidationError(f"run state: {exc}", location=Location(str(path)) if path else None) from None


def _window_note(details: Mapping[str, Any]) -> str | None:
    if details.get("ignore_window"):
        return f"window ignored: {details.get('reason') or 'no reason given'}"
    return None


def events_from_audit(records: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Unreachable hosts, approvals, notices and interrupts of one run's audit records."""
    out: list[Event] = []
    for r in records:
        name, at = r.get("event"), _audit_time(r)
        if name == "host.unreachable":
            out.append(Event(at=at, kind="unreachable", level="error", host=_s(r.get("host")), message=str(r.get("reason", ""))))
        elif name in ("approval.granted", "approval.denied"):
            verb = "approved" if name == "approval.granted" else "denied"
            out.append(Event(at=at, kind="approval", host=_s(r.get("host")), step_id=_s(r.get("step_id")),
                             level="info" if verb == "approved" else "warning", message=f"{verb} by {r.get('who', '?')}"))
        elif name == "notice":
            out.append(Event(at=at, kind="notice", level=str(r.get("level", "info")), message=str(r.get("message", ""))))
        elif name == "run.interrupted":
            out.append(Event(at=at, kind="interrupted", level="warning", message=str(r.get("reason", ""))))
    return out


def mark_block_rescued(tasks: list[TaskEntry], records: Iterable[Mapping[str, Any]]) -> None:
    """Flag the failures the trail's `block.rescued` records say a block's rescue handled (recorded after them)."""
    handled = {(str(step), str(r.get("host"))) for r in records if r.get("event") == "block.rescued"
               and isinstance(r.get("steps"), list) for step in r["steps"]}
    for t in tasks:
        if (t.step_id, t.host) in handled and t.status == "failed":
            t.block_rescued = True


def _audit_time(record: Mapping[str, Any]) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def audit_check(path: Path | None, run_id: str) -> AuditCheck:
    """Verify the whole trail's chain, and that this run's records end with `run.finished`."""
    if path is None:
        return AuditCheck(state="not_checked", detail="no audit trail for this run")
    from runbook.audit import verify

    try:
        rep = verify(path)
    except RunbookError as exc:
        return AuditCheck(state="broken", detail=exc.message, path=str(path))
    if rep.kind == "missing":
        return AuditCheck(state="missing", detail="no audit trail at this path", path=str(path))
    if not rep.ok:
        return AuditCheck(state="broken", detail=f"line {rep.line}: {rep.kind}: {rep.problem}", records=rep.records, path=str(path))
    if run_id in rep.incomplete_runs:
        return AuditCheck(state="incomplete", records=rep.records, path=str(path),
                          detail="chain intact, but this run has no run.finished record (crashed, still running, or cut off)")
    return AuditCheck(state="ok", records=rep.records, path=str(path),
                      detail=f"chain intact: {rep.records} records, head {(rep.head or '')[:12]}")


# --- the playbook's steps ------------------------------------------------------------------------------

@dataclass
class PlaybookView:
    """What the report needs from the playbook: its steps in graph order, window, and notes on gaps."""

    steps: list[StepInfo] = field(default_factory=list)
    window: str | None = None
    notes: list[str] = field(default_factory=list)


def steps_of(graph: StepGraph) -> list[StepInfo]:
    """StepInfo for every main and on_failure step, in topological order, with their needs."""
    out: list[StepInfo] = []
    sections: tuple[tuple[Literal["steps", "on_failure"], Any, list[str]], ...] = (
        ("steps", graph.graph, graph.order()), ("on_failure", graph.rescue, graph.rescue_order()))
    for section, g, order in sections:
        index = {n: g.nodes[n]["index"] for n in g.nodes}
        for sid in order:
            step = g.nodes[sid]["step"]
            needs = sorted(g.predecessors(sid), key=index.__getitem__)
            cluster = g.nodes[sid].get("block") or getattr(step, "block", None)
            out.append(StepInfo(id=sid, name=step.name, action=step.action, section=section, index=len(out),
                                needs=needs, cluster=str(cluster) if cluster else None))
    return out


def window_of(playbook: Playbook, path: str) -> str | None:
    """One line describing the playbook's maintenance window, if it has one."""
    if playbook.window is None:
        return None
    try:
        from runbook.window import resolve_window

        schedule = resolve_window(playbook, path)
    except RunbookError as exc:
        return f"{playbook.window} (cannot be resolved now: {exc.message})"
    return schedule.describe() if schedule else None


def playbook_view(path: str, expected_hash: str | None) -> PlaybookView:
    """Load the playbook a run or plan used, for its graph; say so when it is gone or changed."""
    from runbook.graph import StepGraph
    from runbook.loader import load_playbook

    view = PlaybookView()
    if not path or not Path(path).is_file():
        view.notes.append("the playbook file is not here any more: steps are shown without their dependencies")
        return view
    try:
        pb = load_playbook(path)
        view.steps = steps_of(StepGraph.build(pb))
    except RunbookError as exc:
        view.notes.append(f"the playbook no longer loads ({exc.message}): steps are shown without their dependencies")
        return view
    if expected_hash and pb._source is not None and pb._source.content_hash() != expected_hash:
        view.notes.append("the playbook changed since this run: the step graph is drawn from the current file")
    view.window = window_of(pb, path)
    return view


def complete_steps(steps: list[StepInfo], step_ids: Iterable[tuple[str, str, bool]]) -> list[StepInfo]:
    """Add steps that tasks name but the playbook (gone or changed) does not: (id, action, on_failure)."""
    known = {s.id for s in steps}
    out = list(steps)
    for sid, action, rescue in step_ids:
        if sid not in known:
            known.add(sid)
            out.append(StepInfo(id=sid, name=sid, action=action, section="on_failure" if rescue else "steps", index=len(out)))
    return out


# --- run reports ------------------------------------------------------------------------------------------

def resume_command(header: RunHeader, tasks: list[TaskEntry], audit_path: Path | None, state_dir: Path | None) -> str | None:
    """The `runbook resume` command line for a run that left work undone; None when everything is done."""
    undone = {"failed", "unreachable", "deferred", "not_run", "drift"}
    if header.mode == "plan" or not any(t.status in undone and not t.rescue and not t.ignored for t in tasks):
        return None
    argv = ["runbook", "resume", header.run_id]
    if audit_path is not None:
        argv += ["--audit-log", str(audit_path)]
        if state_dir is not None and Path(state_dir).resolve() != audit_path.resolve().parent / "runs":
            argv += ["--state-dir", str(state_dir)]
    return " ".join(shlex.quote(a) for a in argv)


def with_predictions(tasks: list[TaskEntry], predictions: Mapping[tuple[str, str], tuple[str, str]]) -> None:
    """Attach a plan's (kind, reason) per (step id, host) to the tasks of an apply run."""
    for t in tasks:
        pred = predictions.get((t.step_id, t.host))
        if pred is not None and not t.rescue:
            t.prediction, t.prediction_reason = pred


def plan_predictions(plan: Mapping[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    """A plan document's predictions keyed by (step id, host)."""
    out = {}
    for p in plan.get("predictions") or []:
        if isinstance(p, Mapping):
            out[(str(p.get("step_id")), str(p.get("host")))] = (str(p.get("prediction")), str(p.get("reason") or ""))
    return out


def run_report_from_files(state: Mapping[str, Any] | None, records: list[dict[str, Any]], *, run_id: str,
                          audit_path: Path | None, state_dir: Path | None, state_path: Path | None = None,
                          plan: Mapping[str, Any] | None = None) -> RunReport:
    """A run report from a run-state file (may be None: then from the audit records alone) and the run's audit records."""
    mine = [r for r in records if r.get("run_id") == run_id]
    started = next((r for r in mine if r.get("event") == "run.started"), None)
    finished = next((r for r in mine if r.get("event") == "run.finished"), None)
    if state is None and started is None:
        raise ValidationError(f"no run `{run_id}` in the run state or the audit trail",
                              hint="`runbook runs` lists recent runs; pass --audit-log or --state-dir for another place")
    header = header_from_state(state if state is not None else {"run_id": run_id}, started, state_path)
    view = playbook_view(header.playbook_path, header.playbook_hash)
    rescue_ids = frozenset(s.id for s in view.steps if s.section == "on_failure")
    audit_tasks = [r for r in mine if r.get("event") == "task.finished"]
    if state is not None:   # the state has the main tasks; on_failure results are only in the audit trail
        audit_tasks = [r for r in audit_tasks if r.get("step_id") in rescue_ids or r.get("parent") in rescue_ids
                       or r.get("on_failure")
                       or (isinstance(r.get("data"), Mapping) and r["data"].get("on_failure"))]
    saved, unreadable = audit_results(audit_tasks)
    if unreadable:
        header.notes.append(f"{unreadable} task record(s) of the audit trail could not be read and are left out "
                            "(see the audit chain's check)")
    if state is not None:
        tasks = state_tasks(state, state_path)
    else:
        tasks = [t for t in saved if not is_rescue(t, rescue_ids)]
        header.notes.append("no run-state file: tasks are read from the audit trail (outputs as the trail keeps them)")
    if finished is not None:
        header.exit_code = header.exit_code if header.exit_code is not None else finished.get("exit_code")
        header.stop_reason = header.stop_reason or _s(finished.get("stop_reason"))
        header.finished_at = header.finished_at or _audit_time(finished)
        if header.status == "unknown" and isinstance(header.exit_code, int):
            header.status = {0: "ok", 5: "deferred", 130: "interrupted"}.get(header.exit_code, "failed")
    for t in (rescued := [t for t in saved if is_rescue(t, rescue_ids)]):
        t.rescue = True
    tasks += rescued
    mark_block_rescued(tasks, mine)
    if plan is not None:
        with_predictions(tasks, plan_predictions(plan))
    elif header.mode == "apply":
        header.notes.append("the reviewed plan is not attached: `runbook report RUN_ID --plan PLAN_FILE` shows "
                            "each task's prediction against its outcome")
    header.window, header.notes = view.window, header.notes + view.notes
    header.audit = audit_check(audit_path, run_id)
    hosts = list(state.get("hosts") or []) if state is not None else list((started or {}).get("hosts") or [])
    return assemble(header, hosts, view.steps, tasks, events_from_audit(mine), audit_path, state_dir)


def assemble(header: RunHeader, hosts: list[str], steps: list[StepInfo], tasks: list[TaskEntry], events: list[Event],
             audit_path: Path | None, state_dir: Path | None) -> RunReport:
    """Put a run report together: hosts and steps completed from the tasks, tasks in host and step order."""
    hosts = list(dict.fromkeys([*hosts, *(t.host for t in tasks)]))
    steps = complete_steps(steps, ((t.step, t.action, t.rescue) for t in tasks))
    host_pos = {h: i for i, h in enumerate(hosts)}
    step_pos = {s.id: i for i, s in enumerate(steps)}
    # A loop's items right after its step, in item order.
    tasks.sort(key=lambda t: (host_pos[t.host], step_pos[t.step], t.parent is not None, t.item_index or 0,
                              t.started_at or 0.0))
    return RunReport(header=header, hosts=hosts, steps=steps, tasks=tasks, events=events,
                     resume_command=resume_command(header, tasks, audit_path, state_dir),
                     generated_at=time.time(), runbook_version=__version__)


def run_report_live(info: RunInfo, result: RunResult, *, graph: StepGraph, playbook: Playbook | None,
                    events: list[Event], predictions: Mapping[Any, Any] | None,
                    audit_path: Path | None, state_dir: Path | None) -> RunReport:
    """A run report from the events of a run that just finished."""
    from runbook.results import Status

    status = ("interrupted" if result.interrupted else "deferred" if any(r.status == Status.DEFERRED for r in result.results)
              else "ok" if result.ok else "failed")
    header = RunHeader(
        run_id=info.run_id, mode=str(info.mode), status=status, playbook_name=info.playbook_name,
        playbook_path=info.playbook_path, playbook_hash=info.playbook_hash, inventory_source=info.inventory_source,
        inventory_hash=info.inventory_hash, operator=info.operator, control_host=info.control_host,
        host_key_checking=info.host_key_checking, git_commit=info.git_commit, plan_hash=info.plan_hash,
        started_at=result.started_at or info.started_at, finished_at=result.finished_at, exit_code=result.exit_code(),
        stop_reason=result.stop_reason, extra_vars=dict(info.extra_vars),
        resumed_from=_s(info.details.get("resumed_from")), window_note=_window_note(info.details),
        window=window_of(playbook, info.playbook_path) if playbook is not None else None,
        audit=audit_check(audit_path, info.run_id))
    rescue_ids = frozenset(graph.rescue.nodes)
    tasks = _TASKS.validate_python([r.as_dict() for r in result.results])
    for t in tasks:
        t.rescue = is_rescue(t, rescue_ids)
    if predictions:
        with_predictions(tasks, {k: (p.kind, p.reason) for k, p in predictions.items()})
    return assemble(header, list(info.hosts), steps_of(graph), tasks, events, audit_path, state_dir)


# --- plan review ---------------------------------------------------------------------------------------------

def plan_review(doc: Mapping[str, Any], plan_file: str) -> PlanReview:
    """A plan review page's model from a loaded (hash-checked) plan document."""
    try:
        pb = doc.get("playbook") or {}
        inv = doc.get("inventory") or {}
        header = PlanHeader(
            plan_file=plan_file, plan_hash=str(doc.get("hash", "")), playbook_name=str(pb.get("name", "")),
            playbook_path=str(pb.get("path", "")), playbook_hash=str(pb.get("hash", "")),
            inventory_source=str(inv.get("source", "")), inventory_hash=str(inv.get("hash", "")),
            extra_vars_hash=str(doc.get("extra_vars_hash", "")), extra_vars=dict(doc.get("extra_vars") or {}),
            operator=str(doc.get("operator", "")), control_host=str(doc.get("control_host", "")),
            created_at=str(doc.get("created_at", "")), run_id=str(doc.get("run_id", "")), limit=_s(doc.get("limit")),
            tags=list(doc.get("tags") or []), skip_tags=list(doc.get("skip_tags") or []),
            host_key_checking=_s(doc.get("host_key_checking")), runbook_version=str(doc.get("runbook_version", "")),
            local_files=dict(doc.get("local_files") or {}))
        entries = [PlanEntry.model_validate({k: v for k, v in p.items() if k in PlanEntry.model_fields and v is not None})
                   for p in doc.get("predictions") or []]
    except PydanticError as exc:
        raise _fail(Path(plan_file), "plan file", exc) from None
    except (AttributeError, TypeError) as exc:
        raise ValidationError(f"plan file: unexpected structure ({exc})", location=Location(plan_file)) from None
    view = playbook_view(header.playbook_path, header.playbook_hash)
    steps = complete_steps(view.steps, ((e.step_id, e.action, False) for e in entries))
    hosts = list(dict.fromkeys([*(str(h) for h in doc.get("hosts") or []), *(e.host for e in entries)]))
    return PlanReview(header=header, hosts=hosts, steps=steps, entries=entries,
                      unreachable={str(k): str(v) for k, v in (doc.get("unreachable") or {}).items()},
                      apply_command="runbook apply " + shlex.quote(plan_file),
                      generated_at=time.time(), runbook_version=__version__)
