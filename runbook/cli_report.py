"""The `runbook report` command, and the report hooks of `run/apply/resume --report` and `show --html`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from runbook.audit import Redactor
    from runbook.runner import Prepared, RunRequest


def _say(text: str) -> None:
    click.echo(text, err=True)


def redactor_for(playbook_path: str) -> Redactor | None:
    """The redactor of a playbook's `secrets:` when they can be read here; None otherwise (files are redacted already)."""
    from runbook.audit import Redactor
    from runbook.errors import RunbookError
    from runbook.loader import load_playbook
    from runbook.runner import resolve_secrets

    if not playbook_path or not Path(playbook_path).is_file():
        return None
    try:
        return Redactor.from_vars({}, resolve_secrets(load_playbook(playbook_path)))
    except RunbookError:
        return None


def add_report(prepared: Prepared, request: RunRequest, path: str | None) -> None:
    """Attach the report observer to a run when `--report FILE` was given."""
    if not path:
        return
    from runbook.report.observer import ReportObserver
    from runbook.runner import audit_path_for, state_dir_for

    request.observers.append(ReportObserver(
        path, graph=prepared.steps, playbook=prepared.playbook, redactor=prepared.redactor,
        predictions=request.predictions, audit_path=audit_path_for(request, prepared) if request.audit else None,
        state_dir=state_dir_for(request, prepared), announce=lambda p: _say(f"report: {p}"), warn=_say))


def write_plan_page(doc: dict[str, Any], plan_file: str, out: str) -> None:
    """`runbook show plan.json --html FILE`: the plan as a review page."""
    from runbook.report.data import plan_review
    from runbook.report.render import render_plan, write_html

    review = plan_review(doc, plan_file)
    write_html(render_plan(review, redactor_for(review.header.playbook_path)), out)
    _say(f"plan review page: {out} ({len(review.entries)} predictions on {len(review.hosts)} hosts)")


def _resolve(run_id: str, directory: Path, audit: Path) -> tuple[Path | None, str, list[dict[str, Any]]]:
    """The state file (if any), the full run id, and that run's audit records."""
    from runbook.audit import read_records
    from runbook.errors import ValidationError
    from runbook.report.data import check_run_id, find_state, latest_run_in_audit

    if run_id != "latest":
        check_run_id(run_id)
    state_path = find_state(directory, run_id)
    if state_path is not None:
        full = state_path.stem
    elif run_id == "latest":
        found = latest_run_in_audit(read_records(audit, event="run.started"))
        if found is None:
            raise ValidationError(f"no runs in {directory} or {audit}", hint="run a playbook first, or pass --audit-log / --state-dir")
        full = found
    else:
        ids = sorted({str(r.get("run_id")) for r in read_records(audit, run=run_id, event="run.started")})
        if len(ids) != 1:
            raise ValidationError(f"no run `{run_id}` in {directory} or {audit}" + (" (ambiguous prefix)" if ids else ""),
                                  hint="`runbook runs` lists recent runs")
        full = ids[0]
    return state_path, full, [r for r in read_records(audit, run=full) if r.get("run_id") == full]


@click.command("report")
@click.argument("run_id", default="latest", metavar="RUN_ID|latest")
@click.option("-o", "--out", type=click.Path(dir_okay=False, allow_dash=True),
              help="The HTML file to write (default: report-RUN_ID.html here; - for stdout).")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG",
              help="Audit trail file (default: ./.runbook/audit.jsonl, else ./playbooks/.runbook/audit.jsonl).")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Run state directory (default: runs/ beside the audit trail).")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="The reviewed plan of an apply run: shows prediction against outcome for each task.")
def report(run_id: str, out: str | None, audit_log: str | None, state_dir: str | None, plan_file: str | None) -> None:
    """Write a run's self-contained HTML report: header, status per host, step graph, timeline, results."""
    from runbook.cli import _audit_file
    from runbook.errors import ValidationError
    from runbook.plan import load_plan
    from runbook.report.data import read_json, run_report_from_files
    from runbook.report.render import render_run, write_html

    audit = _audit_file(audit_log)
    directory = Path(state_dir) if state_dir else audit.parent / "runs"
    state_path, full, records = _resolve(run_id, directory, audit)
    state = read_json(state_path, "run state") if state_path is not None else None
    if state is not None and not isinstance(state, dict):
        raise ValidationError("run state is not a JSON object", location=None if state_path is None else _loc(state_path))
    plan = load_plan(plan_file, max_age=float("inf")) if plan_file else _applied_plan(state, records)
    rep = run_report_from_files(state, records, run_id=full, audit_path=audit if audit.exists() else None,
                                state_dir=directory, state_path=state_path, plan=plan)
    if plan is not None and rep.header.plan_hash != plan.get("hash"):
        raise ValidationError(f"plan {plan_file} is not the plan run {full} applied",
                              hint=f"that run applied the plan with hash {rep.header.plan_hash or '(none: not an apply run)'}")
    text = render_run(rep, redactor_for(rep.header.playbook_path))
    if out == "-":
        sys.stdout.write(text)
        return
    target = out or f"report-{full}.html"
    write_html(text, target)
    _say(f"report: {target} ({len(rep.tasks)} tasks on {len(rep.hosts)} hosts, run {full})")


def _applied_plan(state: dict[str, Any] | None, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The plan an apply run recorded it applied (`details.plan_file`), if it is still there, unchanged."""
    from runbook.errors import RunbookError
    from runbook.plan import load_plan

    started = next((r for r in records if r.get("event") == "run.started"), None) or {}
    doc = state if state is not None else started
    details = doc.get("details")
    path = details.get("plan_file") if isinstance(details, dict) else None
    if doc.get("mode") != "apply" or not isinstance(path, str) or not Path(path).is_file():
        return None
    try:
        plan = load_plan(path, max_age=float("inf"))
    except RunbookError:
        return None   # unreadable now: the report says the plan is not attached, as without one
    return plan if plan.get("hash") == doc.get("plan_hash") else None   # replaced since: not the one applied


def _loc(path: Path):
    from runbook.errors import Location

    return Location(str(path))
