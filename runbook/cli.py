"""The `runbook` command: thin; parses flags, calls the library, renders, maps errors to exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from runbook.errors import EXIT_INVALID, RunbookError

def _echo_err(text: str) -> None:
    click.echo(text, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="runbook")
def cli() -> None:
    """Agentless automation for operations teams.

    Exit codes: 0 ok, 1 internal error, 2 a task failed (or drift), 3 a host unreachable,
    4 invalid input, 5 outside the maintenance window, 6 the run cannot be recorded (disk full,
    read-only), 130 interrupted.
    """


# --- validate / graph / schema ----------------------------------------------------------------

@cli.command()
@click.argument("playbooks", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--strict", is_flag=True, help="Treat warnings (undefined variables, shell quoting) as errors.")
@click.option("-i", "--inventory", "inventory", multiple=True,
              help="Also check against this inventory: every literal `delegate_to` names one of its hosts.")
def validate(playbooks: tuple[str, ...], fmt: str, strict: bool, inventory: tuple[str, ...]) -> None:
    """Check playbooks: structure, step graph, templates and the shell-safety lint."""
    from runbook.cli_serve import is_rules_file, validate_rules

    check = _playbook_validator(inventory)
    reports = [_validate_windows_file(p) if Path(p).name in ("windows.yml", "windows.yaml")
               else validate_rules(p) if is_rules_file(p) else check(p) for p in playbooks]
    if strict:
        # Warnings become errors, in every output: the text, the JSON and the exit code all agree.
        reports = [_as_errors(r) for r in reports]
    failed = any(r.errors for r in reports)
    if fmt == "json":
        click.echo(json.dumps([{
            "file": r.path, "valid": not r.errors,
            "kind": "rules" if is_rules_file(r.path) else "windows" if r.summary else "playbook",
            "steps": len(r.playbook.all_steps()) if r.playbook else None,
            "problems": [p.as_dict() for p in r.problems],
        } for r in reports], indent=2))
    else:
        for r in reports:
            for p in r.problems:
                _echo_err(p.render())
            if r.errors:
                click.echo(f"{r.path}: invalid ({len(r.errors)} error(s), {len(r.warnings)} warning(s))")
            elif r.summary:
                click.echo(r.summary)
            else:
                pb = r.playbook
                assert pb is not None
                warn = f", {len(r.warnings)} warning(s)" if r.warnings else ""
                click.echo(f"{r.path}: ok — runbook `{pb.runbook}`, {_step_counts(pb)}{warn}")
    if failed:
        sys.exit(EXIT_INVALID)


def _playbook_validator(inventory: tuple[str, ...]):
    """`validate_playbook`, or with an inventory: literal `delegate_to` names must be its hosts (or `controller`)."""
    from runbook.loader import ValidationReport, validate_playbook

    if not inventory:
        return validate_playbook
    from runbook.checks import delegate_problems
    from runbook.inventory import Inventory

    inv = Inventory.load(list(inventory))

    def check(path: str) -> ValidationReport:
        report = validate_playbook(path)
        if report.playbook is None:
            return report
        found = delegate_problems(report.playbook, inv.hosts)
        return ValidationReport(report.path, None if found else report.playbook, [*report.problems, *found])
    return check


def _step_counts(pb) -> str:
    """`N step(s) + M on_failure + K handler(s)`, after includes, roles and blocks; flush points are no steps."""
    from runbook.handlers import is_flush

    steps = sum(1 for s in pb.steps if not is_flush(s))
    return (f"{steps} step(s)" + (f" + {len(pb.on_failure)} on_failure" if pb.on_failure else "")
            + (f" + {len(pb.handlers)} handler(s)" if pb.handlers else ""))


def _as_errors(report):
    """A report whose warnings are errors (`validate --strict`)."""
    import dataclasses

    if not report.warnings:
        return report
    problems = [dataclasses.replace(p, severity="error") for p in report.problems]
    return dataclasses.replace(report, problems=problems)


def _validate_windows_file(path: str):
    """A `windows.yml` next to the playbooks is validated as named windows, so `validate playbooks/*.yml` works."""
    from runbook.errors import ValidationError
    from runbook.loader import ValidationReport
    from runbook.window import load_windows_file

    try:
        names = load_windows_file(path)
    except ValidationError as exc:
        return ValidationReport(path, None, exc.problems)
    return ValidationReport(path, None, [], summary=f"{path}: ok — {len(names)} named window(s): {', '.join(sorted(names))}")


@cli.command()
@click.argument("playbook", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "mermaid"]), default="text", show_default=True)
def graph(playbook: str, fmt: str) -> None:
    """Show the step graph: topological layers (text), Graphviz DOT or Mermaid."""
    from runbook.graph import StepGraph
    from runbook.loader import load_playbook

    g = StepGraph.build(load_playbook(playbook))
    click.echo({"text": g.to_text, "dot": g.to_dot, "mermaid": g.to_mermaid}[fmt]())


@cli.command()
def schema() -> None:
    """Print the playbook format's JSON Schema (for editors' YAML language servers)."""
    from runbook.model import Playbook

    doc: dict[str, Any] = Playbook.model_json_schema(by_alias=True)
    doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", **doc, "title": "runbook playbook"}
    click.echo(json.dumps(doc, indent=2))


# --- running ------------------------------------------------------------------------------------

def parse_extra_vars(values: tuple[str, ...]) -> dict[str, Any]:
    """`-e key=value` (the value is text, as in Ansible), `-e @file.yml` and `-e '{"json": 1}'` (typed); later ones win."""
    from runbook.errors import ValidationError
    from runbook.loader import load_document

    out: dict[str, Any] = {}
    for raw in values:
        if raw.startswith("@"):
            doc = load_document(raw[1:], what="extra vars file")
            if not isinstance(doc.data, dict):
                raise ValidationError(f"extra vars file {raw[1:]} must hold a mapping", hint="write `key: value` lines")
            out.update(doc.data)
        elif raw.lstrip().startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"-e {raw!r}: invalid JSON: {exc.msg}", hint="or use -e key=value") from None
            out.update(data)
        else:
            key, eq, value = raw.partition("=")
            if not eq or not key.strip():
                raise ValidationError(f"-e {raw!r}: expected key=value, @file.yml or a JSON object",
                                      hint="for example: -e threshold=90")
            # Always text, as Ansible keeps them: `version=1.10` must not become 1.1, nor `cmd=true` True.
            # Typed values come from `-e @file.yml` or `-e '{"n": 90}'`.
            out[key.strip()] = value
    return out


_HOST_KEYS_HELP = "Unknown host keys: reject (strict, the default), record them (accept-new), or ignore (off)."
_AUDIT_HELP = "Audit trail file (default: .runbook/audit.jsonl beside the playbook)."
_VERBOSE_HELP = "Show every task's command, output (bounded), diff and message; failed tasks always show their output."


_CLUSTER_HELP = "Run tasks on Dask workers: local:N (N local processes) or tcp://HOST:8786 (see docs/cluster.md)."


def _cluster_option():
    """`--cluster ADDRESS` (or $RUNBOOK_CLUSTER): where tasks run; without it, in this process."""
    return click.option("--cluster", envvar="RUNBOOK_CLUSTER", metavar="ADDRESS", help=_CLUSTER_HELP)


def _checked_cluster(value: str | None) -> str | None:
    if not value:
        return None
    from runbook.cluster.address import parse_cluster

    return str(parse_cluster(value))   # a bad address is invalid input before anything is loaded


def _run_options(f):
    """Flags shared by run and plan."""
    opts = [
        click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory file, directory or `a,b,` list (repeatable)."),
        click.option("-l", "--limit", help="Further limit the selected hosts with a pattern."),
        click.option("-e", "--extra-vars", "extra", multiple=True,
                     help="key=value (the value is text), @file.yml or a JSON object (typed values); highest precedence."),
        click.option("-t", "--tags", "tags", multiple=True, help="Only run steps with these tags (comma-separated)."),
        click.option("--skip-tags", "skip_tags", multiple=True, help="Skip steps with these tags."),
        click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]), help=_HOST_KEYS_HELP),
        click.option("--known-hosts", type=click.Path(dir_okay=False), help="Known-hosts file (default ~/.ssh/known_hosts)."),
        click.option("--connect-timeout", type=float, default=10.0, show_default=True,
                     help="Seconds to wait for a host to answer."),
        click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Hosts at once (overrides the playbook)."),
        click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG", help=_AUDIT_HELP),
        click.option("--operator", envvar="RUNBOOK_OPERATOR", help="Who runs this (default: $RUNBOOK_OPERATOR, else the OS user)."),
        click.option("-v", "--verbose", is_flag=True, help=_VERBOSE_HELP),
        click.option("--list-steps", is_flag=True,
                     help="Print the steps in order (includes, roles and blocks expanded) and exit; connects to nothing."),
        click.option("--start-at-step", metavar="ID|NAME",
                     help="Begin at this step: every step it depends on is skipped (reason: before --start-at-step)."),
        _cluster_option(),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _format_flag(json_help: str):
    """`--format text|json` (the spelling every command uses); `--output` is its old name, kept hidden."""
    import functools

    def decorate(f):
        @functools.wraps(f)
        def command(*args: Any, **kw: Any) -> Any:
            alias = kw.pop("output_alias", None)
            if alias:
                kw["output"] = alias
            return f(*args, **kw)

        command = click.option("--output", "output_alias", type=click.Choice(["text", "json"]), hidden=True)(command)
        return click.option("--format", "output", type=click.Choice(["text", "json"]), default="text",
                            show_default=True, help=json_help)(command)
    return decorate


_RUN_JSON = "json: the run's result on stdout (every task's status, output and timing); the console goes to stderr."


def _split(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(t.strip() for v in values for t in v.split(",") if t.strip())


def _request(kw: dict[str, Any], mode: str, **extra: Any):
    from runbook.runner import RunRequest

    return RunRequest(mode=mode, limit=kw["limit"], extra_vars=parse_extra_vars(kw["extra"]), tags=_split(kw["tags"]),
                      skip_tags=_split(kw["skip_tags"]), host_key_checking=kw["host_key_checking"],
                      known_hosts=kw["known_hosts"], connect_timeout=kw["connect_timeout"],
                      concurrency=kw["concurrency"], operator=kw["operator"], audit_log=kw["audit_log"],
                      handle_signals=True, cluster=_checked_cluster(kw.get("cluster")),
                      start_at_step=kw.get("start_at_step"), **extra)


def _list_steps(playbook: str, output: str) -> None:
    """`--list-steps`: the expanded steps, in order, without an inventory or a connection."""
    from runbook.compose import step_listing
    from runbook.loader import load_playbook

    rows = step_listing(load_playbook(playbook))
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    from runbook.console import visible

    headers = ("id", "name", "action", "tags", "block")
    table = [[visible(str(r[h] if h != "tags" else ",".join(r["tags"]))) for h in headers] for r in rows]
    widths = [max([len(h), *(len(row[i]) for row in table)]) for i, h in enumerate(headers)]
    section = None
    for r, row in zip(rows, table):
        if r["section"] != section:
            section = r["section"]
            click.echo(f"{section}:")
            click.echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _check_tags(playbook, request) -> None:
    """`--tags`/`--skip-tags` naming no step's tag would silently select nothing: invalid input, known tags listed."""
    from runbook.errors import Problem, ValidationError, did_you_mean

    known = sorted({t for s in playbook.all_steps() for t in s.tags} | {"always"})
    problems = []
    for flag, given in (("--tags", request.tags), ("--skip-tags", request.skip_tags)):
        for tag in sorted(set(given) - set(known)):
            listed = ", ".join(t for t in known if t != "always") or "none (no step has `tags:`)"
            hint = did_you_mean(tag, known)
            problems.append(Problem(f"{flag}: no step of `{playbook.runbook}` has the tag `{tag}`", None,
                                    f"{hint + ' ' if hint else ''}known tags: {listed}"))
    if problems:
        raise ValidationError(problems)


def _inventory_arg(kw: dict[str, Any]):
    return list(kw["inventory"]) if kw["inventory"] else None


def _finish(result, kw: dict[str, Any], redactor) -> None:
    if kw["output"] == "json":
        click.echo(json.dumps(redactor.redact(result.as_dict()), indent=2, default=str))
    sys.exit(result.exit_code())


def _ask(prompt: str) -> bool:
    return click.confirm(prompt, default=False, err=True)


def _window_guard(prepared, kw: dict[str, Any], request) -> None:
    """Refuse to start outside the playbook's window (exit 5) unless --ignore-window --reason."""
    if prepared.playbook.window is None:
        return  # no window: skip importing croniter and the window module (~30 ms of startup)
    from runbook.window import SystemClock, WindowGuard, check_can_start, resolve_window

    schedule = resolve_window(prepared.playbook, prepared.playbook_path)
    if schedule is None:
        return
    clock = SystemClock()
    if kw.get("ignore_window"):
        request.details["ignore_window"] = True
        request.details["reason"] = kw["reason"]
        prepared.info.details.update(ignore_window=True, reason=kw["reason"])
        return
    check_can_start(schedule, clock)
    request.window_guard = WindowGuard(schedule, clock)


def _window_options(f):
    f = click.option("--reason", help="Why the window is ignored (required with --ignore-window; recorded).")(f)
    f = click.option("--ignore-window", is_flag=True, help="Run outside the maintenance window (recorded in the audit trail).")(f)
    return f


def _check_window_flags(kw: dict[str, Any]) -> None:
    from runbook.errors import ValidationError

    if kw.get("ignore_window") and not (kw.get("reason") or "").strip():
        raise ValidationError("--ignore-window needs --reason \"...\"", hint="say why the run cannot wait for the window")


@cli.command()
@click.argument("playbook", type=click.Path())
@_run_options
@_format_flag(_RUN_JSON)
@_window_options
@click.option("--dry-run", "--check", "dry_run", is_flag=True, help="Plan only: predict every change, change nothing.")
@click.option("-y", "--yes", is_flag=True, help="Approve every `approve` gate in advance.")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write a self-contained HTML report of the run to FILE.")
def run(playbook: str, dry_run: bool, yes: bool, **kw: Any) -> None:
    """Run a playbook on the selected hosts."""
    if kw["list_steps"]:
        return _list_steps(playbook, kw["output"])
    if dry_run and kw["report"]:
        raise click.UsageError("--report needs a real run; for a dry run: runbook plan ... --out plan.json, then runbook show plan.json --html FILE")
    if dry_run:
        return _plan(playbook, out=None, kw=kw)
    _check_window_flags(kw)
    from runbook.runner import execute, prepare

    request = _request(kw, "run", assume_yes=yes, interactive=sys.stdin.isatty(), ask=_ask)
    prepared = prepare(playbook, _inventory_arg(kw), request)
    _check_tags(prepared.playbook, request)
    _window_guard(prepared, kw, request)
    request.observers.append(_console_view(prepared, kw))
    from runbook.cli_report import add_report
    add_report(prepared, request, kw["report"])
    _finish(execute(prepared, request), kw, prepared.redactor)


def _warn_undefined(prepared) -> None:
    """Before a host is touched: names no vars, inventory host, register or -e defines, with a did-you-mean.

    Without this, a typo (`log_dri` for `log_dir`) is found only when its step runs, part-way through.
    """
    import dataclasses

    from runbook.checks import undefined_variables

    known = set(prepared.info.extra_vars).union(*(h.vars for h in prepared.hosts))
    for p in undefined_variables(prepared.playbook, known):
        _echo_err(dataclasses.replace(p, severity="warning", message=p.message + " (its step fails if it runs)").render())


def _console_view(prepared, kw: dict[str, Any]):
    """The terminal observer; no live redraw when an approval prompt may appear, and inventory warnings first."""
    from runbook.console import ConsoleView, make_console

    for w in prepared.inventory.warnings:
        _echo_err(w.render())
    _warn_undefined(prepared)
    from runbook.actions import action_class

    gates = any(action_class(s.action).asks_operator for s in prepared.playbook.all_steps())
    return ConsoleView(make_console(), prepared.redactor, verbose=kw["verbose"], live=False if gates else None,
                       playbook=prepared.playbook)


def _check_out_dir(out: str | None) -> None:
    """`--out dir/plan.json` needs `dir/` to exist: a mistyped path must not create a directory tree."""
    from runbook.errors import Location, ValidationError

    if out is None:
        return
    parent = Path(out).parent
    if not parent.is_dir():
        raise ValidationError(f"--out {out}: the directory {parent} does not exist", location=Location(out),
                              hint=f"create it first (mkdir -p {parent}), or check the path")


_PLAN_KEY_ENV = "RUNBOOK_PLAN_KEY"   # runbook.plan.KEY_ENV (not imported: the CLI module stays light)


def _plan(playbook: str, out: str | None, kw: dict[str, Any]) -> None:
    from runbook.console import ConsoleView, make_console, render_plan
    from runbook.plan import build_plan, plan_key, write_plan
    from runbook.runner import execute, prepare

    if kw["list_steps"]:
        return _list_steps(playbook, kw["output"])

    key = plan_key(kw.get("sign_key"))   # a bad key file fails before any host is contacted
    _check_out_dir(out)
    request = _request(kw, "plan")
    prepared = prepare(playbook, _inventory_arg(kw), request)
    _check_tags(prepared.playbook, request)
    _warn_undefined(prepared)
    console = make_console()
    request.observers.append(ConsoleView(console, prepared.redactor, verbose=kw["verbose"], playbook=prepared.playbook))
    result = execute(prepared, request)
    doc = build_plan(prepared, request, result, key=key)
    if out:
        write_plan(doc, out)
    if kw["output"] == "json":
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        render_plan(make_console(sys.stdout), doc, prepared.redactor)
        if out:
            signed = f" (signed, key id {key.key_id})" if key else ""
            click.echo(f"\nSaved to {out}{signed}. Review it with `runbook show {out}`; run exactly this with `runbook apply {out}`.")
    code = result.exit_code()
    sys.exit(code)


@cli.command()
@click.argument("playbook", type=click.Path())
@_run_options
@_format_flag("json: the plan document on stdout (what --out saves: every prediction with its reason and diff).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Save the plan for review and `runbook apply`.")
@click.option("--sign-key", type=click.Path(dir_okay=False),
              help=f"Sign the plan with the key in FILE (HMAC-SHA256; default: ${_PLAN_KEY_ENV}, the key itself).")
def plan(playbook: str, out: str | None, **kw: Any) -> None:
    """Dry run: predict every step on every host (+ change, = no change, - skip, ? unknown); change nothing."""
    _plan(playbook, out, kw)


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("--no-diff", is_flag=True, help="Hide content diffs.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Write the plan as a self-contained HTML review page instead.")
@click.option("--playbook", "playbook_text", is_flag=True, help="Print the playbook text the plan keeps, and of the files it includes (what apply runs).")
@click.option("--sign-key", type=click.Path(dir_okay=False),
              help=f"Check the plan's signature with the key in FILE (default: ${_PLAN_KEY_ENV}); unsigned plans are refused.")
def show(plan_file: str, no_diff: bool, html_file: str | None, playbook_text: bool, sign_key: str | None) -> None:
    """Render a saved plan again for review."""
    from runbook.console import make_console, render_plan
    from runbook.plan import load_plan, plan_key

    key = plan_key(sign_key)
    doc = load_plan(plan_file, max_age=float("inf"), key=key, allow_unverified=True)
    sig = doc.get("signature")
    _echo_err(f"signature: good (key id {key.key_id})" if key else
              f"signature: NOT CHECKED (signed with key id {sig['key_id']}; no plan key given)" if sig else
              "signature: none (anyone who can write this file can change what apply runs)")
    if playbook_text:
        text = doc["playbook"]["text"] or (f"(not kept: the playbook held a secret value; apply runs "
                                           f"{doc['playbook']['path']} only if its sha256 is {doc['playbook']['hash']})")
        click.echo(text, nl=not text.endswith("\n"))
        kept = doc["playbook"].get("files") or {}
        for path, body in kept.items() if isinstance(kept, dict) else ():   # includes, roles, vars files
            shown = body if isinstance(body, str) else "(not kept: it held a secret value; apply checks its sha256)\n"
            click.echo(f"\n# --- {path} ---\n" + shown, nl=not shown.endswith("\n"))
        return None
    if html_file:
        from runbook.cli_report import write_plan_page
        return write_plan_page(doc, plan_file, html_file)
    render_plan(make_console(sys.stdout), doc, diffs=not no_diff)


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory (default: the plan's).")
@click.option("-e", "--extra-vars", "extra", multiple=True, help="Needed again only for values the plan redacted.")
@click.option("--allow-drift", is_flag=True, help="Go on when a host's state no longer matches the plan.")
@click.option("--max-age", default="24h", show_default=True, help="Refuse plans older than this.")
@click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]),
              help=_HOST_KEYS_HELP + " The plan may raise it, never lower it.")
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="Known-hosts file (default ~/.ssh/known_hosts).")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for a host to answer.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Hosts at once (overrides the playbook).")
@_format_flag(_RUN_JSON)
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG", help=_AUDIT_HELP)
@click.option("--operator", envvar="RUNBOOK_OPERATOR", help="Who runs this (default: $RUNBOOK_OPERATOR, else the OS user).")
@click.option("-y", "--yes", is_flag=True, help="Approve every `approve` gate in advance.")
@click.option("-v", "--verbose", is_flag=True, help=_VERBOSE_HELP)
@_window_options
@click.option("--report", type=click.Path(dir_okay=False), help="Also write a self-contained HTML report of the run to FILE.")
@click.option("--sign-key", type=click.Path(dir_okay=False),
              help=f"Accept only plans signed with the key in FILE (default: ${_PLAN_KEY_ENV}, the key itself).")
@_cluster_option()
def apply(plan_file: str, allow_drift: bool, max_age: str, yes: bool, sign_key: str | None, **kw: Any) -> None:
    """Execute exactly a reviewed plan: the playbook text it keeps; refuse when inputs drifted or the plan was changed."""
    from runbook.errors import DriftError, ValidationError
    from runbook.model import parse_duration
    from runbook.plan import (drift_between, host_key_level, load_plan, plan_hash, plan_key, reviewed_playbook,
                              saved_predictions)
    from runbook.runner import execute, prepare
    from runbook.state import reusable_sources

    _check_window_flags(kw)
    try:
        age = parse_duration(max_age)
    except ValueError as exc:
        raise ValidationError(f"--max-age: {exc}") from None
    key = plan_key(sign_key)
    doc = load_plan(plan_file, max_age=age, key=key)
    extra = parse_extra_vars(kw["extra"]) if kw["extra"] else dict(doc["extra_vars"])
    kw.update(limit=doc["limit"], tags=tuple(doc["tags"]), skip_tags=tuple(doc["skip_tags"]), extra=())
    # Safety settings come from the command line; the plan may keep or raise them, never lower them.
    kw["host_key_checking"] = host_key_level(doc.get("host_key_checking"), kw["host_key_checking"], plan_file)
    request = _request(kw, "apply", assume_yes=yes, interactive=sys.stdin.isatty(), ask=_ask,
                       plan_hash=plan_hash(doc), predictions=saved_predictions(doc), allow_drift=allow_drift)
    request.extra_vars = extra
    request.details["plan_file"] = str(Path(plan_file).resolve())   # `runbook report` finds the plan by it
    inventory = list(kw["inventory"]) if kw["inventory"] else reusable_sources(doc["inventory"]["source"])
    prepared = prepare(reviewed_playbook(doc, plan_file), inventory, request)
    drifted = drift_between(doc, prepared, extra, key=key)
    if drifted:
        raise DriftError("the plan no longer matches:\n  - " + "\n  - ".join(drifted),
                         hint="review a new plan: runbook plan ... --out FILE")
    if _already_applied(plan_file, doc, prepared, request, kw):
        return
    _window_guard(prepared, kw, request)
    request.observers.append(_console_view(prepared, kw))
    from runbook.cli_report import add_report
    add_report(prepared, request, kw["report"])
    _finish(execute(prepared, request), kw, prepared.redactor)


def _already_applied(plan_file: str, doc: dict[str, Any], prepared, request, kw: dict[str, Any]) -> bool:
    """A plan applied once with success has reached its state: say so and change nothing (exit 0).

    Re-applying it would find every planned change already made and stop each host as drifted.
    An earlier apply that did not end ok is pointed out (resume continues it), and this one goes on.
    """
    from datetime import UTC, datetime

    from runbook.runner import state_dir_for
    from runbook.state import applies_of

    earlier = applies_of(state_dir_for(request, prepared), str(doc["hash"]), after=str(doc.get("run_id") or ""))
    done = [e for e in earlier if e["status"] == "ok"]
    if not done:
        for e in earlier:
            _echo_err(f"note: this plan was applied before in run {e['run_id']} (status {e['status']}); "
                      f"`runbook resume {e['run_id']}` continues that run instead")
        return False
    last = done[-1]
    when = (datetime.fromtimestamp(last["finished_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(last.get("finished_at"), (int, float)) else "earlier")
    _echo_err(f"{plan_file} was already applied: run {last['run_id']} by {last['operator']} ended ok ({when}). "
              "Its changes are in place; nothing was run again.")
    _echo_err("To review the hosts as they are now, plan again: runbook plan PLAYBOOK --out FILE")
    if kw["output"] == "json":
        click.echo(json.dumps({"plan": plan_file, "already_applied": last, "exit_code": 0, "results": []}, indent=2))
    return True


# --- audit trail, run history, resume -----------------------------------------------------------

def _still_running(doc: dict[str, Any], force: bool) -> str | None:
    """Why resuming this run now would run its tasks beside the run itself (None: it is not running).

    A run whose controller died on this machine is `aborted` by now (load_state checks its lock or
    pid); one from another machine cannot be checked from here, so it counts as running until --force."""
    if doc.get("status") != "running":
        return None
    return _refused_unless(force, f"run {doc['run_id']} is still running (pid {doc.get('pid')} on "
                                  f"{doc.get('control_host')})",
                           "wait for it to end, or stop it first (Ctrl-C in its terminal, or kill -INT its pid); "
                           "if its controller is gone for good (its machine crashed), --force resumes it (recorded)")


def _resumed_already(directory: Path, run_id: str, force: bool) -> str | None:
    """Why resuming `run_id` again would run its unfinished tasks a second time (None: it was never resumed).

    A resume continues the run it names: its state still lists the tasks an earlier resume ran. So the
    earlier resume is the one to continue; only --force resumes this run again (recorded)."""
    from runbook.state import resumes_of

    earlier = resumes_of(directory, run_id)
    if not earlier:
        return None
    last = earlier[-1]
    follow = ("its tasks are all done: nothing is left to run" if last["status"] == "ok"
              else f"`runbook resume {last['run_id']}` continues from there")
    return _refused_unless(force, f"run {run_id} was already resumed by run {last['run_id']} (status {last['status']})",
                           f"{follow}; --force resumes {run_id} again, re-running what that run did (recorded)")


def _refused_unless(force: bool, reason: str, hint: str) -> str:
    """`reason` to record as forced; without --force, the refusal (exit 4) with its own hint."""
    if not force:
        from runbook.errors import DriftError

        raise DriftError(f"cannot resume: {reason}", hint=hint)
    return reason


def _audit_file(audit_log: str | None) -> Path:
    """The trail the audit/runs/resume commands read: the flag or env, else ./.runbook, else ./playbooks/.runbook.

    Runs write beside their playbook, so from a repository root whose playbooks live in playbooks/
    the trail is one level down; looking there too saves typing --audit-log every time.
    """
    from runbook.audit import default_audit_path

    if audit_log:
        return Path(audit_log)
    here = default_audit_path(None)
    below = Path.cwd() / "playbooks" / ".runbook" / "audit.jsonl"
    return below if not here.exists() and below.exists() and "RUNBOOK_AUDIT_LOG" not in os.environ else here


@cli.group()
def audit() -> None:
    """The tamper-evident audit trail: verify it, read its history."""


@audit.command("verify")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG",
              help="Audit trail file (default: ./.runbook/audit.jsonl).")
def audit_verify(audit_log: str | None) -> None:
    """Check the whole hash chain; report the first broken or missing record by line (exit 2 when broken, 4 when no trail)."""
    from runbook.audit import verify
    from runbook.errors import Location, ValidationError

    path = _audit_file(audit_log)
    report = verify(path)
    if report.kind == "missing":   # nothing to check is a wrong path (invalid input), not a broken chain
        raise ValidationError("no audit trail at this path", location=Location(str(path)),
                              hint="give the trail with --audit-log FILE (or RUNBOOK_AUDIT_LOG), or run from the "
                                   "directory holding .runbook/ or playbooks/.runbook/")
    click.echo(report.render())
    if not report.ok:
        sys.exit(2)


@audit.command("show")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG")
@click.option("--run", "run_id", help="One run (id or prefix).")
@click.option("--host", help="Only records about this host.")
@click.option("--since", help="ISO date or date-time, e.g. 2026-11-23 or 2026-11-23T18:00.")
@click.option("--event", help="Event name or glob, e.g. task.*")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def audit_show(audit_log: str | None, run_id: str | None, host: str | None, since: str | None, event: str | None,
               fmt: str) -> None:
    """A readable history: who changed which host, when, with what result."""
    from datetime import datetime

    from runbook.audit import format_table, read_records
    from runbook.errors import ValidationError

    when = None
    if since:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            raise ValidationError(f"--since {since!r}: expected an ISO date like 2026-11-23 or 2026-11-23T18:00") from None
    records = read_records(_audit_file(audit_log), run=run_id, host=host, since=when, event=event)
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
    else:
        click.echo(format_table(records))


@cli.command()
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Run state directory (default: runs/ beside the audit trail).")
@click.option("-n", "--count", default=20, show_default=True)
@click.option("--prune-older-than", "prune", metavar="DURATION",
              help="Remove the state of runs that started longer ago than this (30d, 720h); never a running one.")
@click.option("--dry-run", is_flag=True, help="With --prune-older-than: list what would be removed, remove nothing.")
def runs(audit_log: str | None, state_dir: str | None, count: int, prune: str | None, dry_run: bool) -> None:
    """List recent runs with their status (or remove old runs' state: --prune-older-than)."""
    from runbook.state import format_runs, list_runs

    directory = Path(state_dir) if state_dir else _audit_file(audit_log).parent / "runs"
    if prune is not None:
        return _prune_runs(directory, _audit_file(audit_log), prune, dry_run)
    if dry_run:
        raise click.UsageError("--dry-run goes with --prune-older-than")
    items = list_runs(directory, count)
    click.echo(format_runs(items) if items else f"no runs in {directory}")


def _prune_runs(directory: Path, audit: Path, older_than: str, dry_run: bool) -> None:
    """Remove (or list) old runs' state; the audit trail records which, and who removed them."""
    import time
    from datetime import UTC, datetime

    from runbook.errors import ValidationError
    from runbook.model import parse_duration
    from runbook.state import prunable_runs, remove_runs

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise ValidationError(f"--prune-older-than: {exc}", hint="for example 30d or 720h") from None
    before = time.time() - age
    gone = prunable_runs(directory, before)
    if gone and not dry_run:
        from runbook.audit import AuditTrail, operator_name

        # Recorded first: a removal the trail cannot record does not happen.
        AuditTrail(audit).append(f"prune-{os.getpid()}-{os.urandom(3).hex()}", "runs.pruned",
                                 {"operator": operator_name(None), "state_dir": str(directory.resolve()),
                                  "before": before, "count": len(gone), "runs": gone}, sync=True)
        remove_runs(directory, gone)
    cutoff = datetime.fromtimestamp(before, UTC).strftime("%Y-%m-%d %H:%M:%S")
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(gone)} run(s) started before {cutoff} UTC from {directory}"
               + (":\n  " + "\n  ".join(gone) if gone else ""))


@cli.command()
@click.argument("run_id", metavar="RUN_ID|latest")
@click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory (default: the run's).")
@click.option("--force", is_flag=True, help="Resume even though the playbook or inventory changed (recorded).")
@click.option("--rerun-in-flight", is_flag=True,
              help="Run again the tasks that were running when the run stopped (their outcome is unknown).")
@click.option("-e", "--extra-vars", "extra", multiple=True, help="Needed again for the values the run state redacted.")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Run state directory (default: runs/ beside the audit trail).")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG", help=_AUDIT_HELP)
@click.option("--operator", envvar="RUNBOOK_OPERATOR", help="Who runs this (default: $RUNBOOK_OPERATOR, else the OS user).")
@click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]), help=_HOST_KEYS_HELP)
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="Known-hosts file (default ~/.ssh/known_hosts).")
@_format_flag(_RUN_JSON)
@click.option("-y", "--yes", is_flag=True, help="Approve every `approve` gate in advance.")
@click.option("-v", "--verbose", is_flag=True, help=_VERBOSE_HELP)
@_window_options
@click.option("--report", type=click.Path(dir_okay=False), help="Also write a self-contained HTML report of the run to FILE.")
@_cluster_option()
def resume(run_id: str, force: bool, rerun_in_flight: bool, state_dir: str | None, yes: bool, **kw: Any) -> None:
    """Continue a run: re-run what failed, was unreachable, deferred or never started; skip what succeeded."""
    from runbook.errors import DriftError
    from runbook.runner import RunRequest, execute, prepare
    from runbook.state import reusable_sources
    from runbook.state import LATEST, load_state, resumable

    _check_window_flags(kw)
    directory = Path(state_dir) if state_dir else _audit_file(kw["audit_log"]).parent / "runs"
    doc = load_state(directory, run_id)
    if run_id == LATEST:   # say which one: the newest may not be the one meant
        _echo_err(f"resuming {doc['run_id']} (the newest run in {directory})")
    live = _still_running(doc, force)   # before the in-flight question: a live run's tasks are not unknown
    _confirm_in_flight(doc, rerun_in_flight)
    done, registers = resumable(doc)
    # The state file holds secret-looking -e values masked: they must be given again, never run as "***".
    extra = {**(doc.get("extra_vars") or {}), **parse_extra_vars(kw["extra"])}
    masked = sorted(k for k, v in extra.items() if v == "***")
    if masked:
        from runbook.errors import ValidationError
        raise ValidationError(f"the run's extra vars {', '.join(masked)} were redacted in its state",
                              hint="give them again: " + " ".join(f"-e {k}=..." for k in masked))
    request = RunRequest(mode="resume", limit=doc.get("limit"), extra_vars=extra,
                         tags=frozenset(doc.get("tags") or ()), skip_tags=frozenset(doc.get("skip_tags") or ()),
                         host_key_checking=kw["host_key_checking"], known_hosts=kw["known_hosts"],
                         operator=kw["operator"], audit_log=kw["audit_log"], state_dir=directory,
                         handle_signals=True, assume_yes=yes, interactive=sys.stdin.isatty(), ask=_ask,
                         previous=done, details={"resumed_from": doc["run_id"], "force": force},
                         cluster=_checked_cluster(kw.get("cluster")))
    inventory = list(kw["inventory"]) if kw["inventory"] else reusable_sources(doc["inventory_source"])
    prepared = prepare(doc["playbook_path"], inventory, request)
    changed = []
    if prepared.info.playbook_hash != doc["playbook_hash"]:
        changed.append("the playbook changed since the run")
    then, now = doc.get("playbook_files") or {}, prepared.info.playbook_files
    if (moved := sorted(p for p in {*then, *now} if then.get(p) != now.get(p))):
        changed.append(f"{', '.join(moved)} changed since the run (included, role or vars file)")
    if prepared.info.inventory_hash != doc["inventory_hash"]:
        changed.append("the inventory changed since the run")
    changed.extend(r for r in (live, _resumed_already(directory, doc["run_id"], force)) if r)
    if changed and not force:
        raise DriftError("cannot resume: " + "; ".join(changed), hint="plan a new run, or pass --force (recorded)")
    if changed:
        prepared.info.details["forced"] = changed
    _window_guard(prepared, kw, request)
    from runbook.state import registers_from
    request.registers = registers_from(prepared.playbook, done)
    request.observers.append(_console_view(prepared, kw))
    from runbook.cli_report import add_report
    add_report(prepared, request, kw["report"])
    _finish(execute(prepared, request), kw, prepared.redactor)


def _confirm_in_flight(doc: dict[str, Any], rerun: bool) -> None:
    """Tasks in flight when a run died may or may not have done their work: run them again only when told to."""
    in_flight = list(doc.get("in_flight") or [])
    if not in_flight or rerun:
        return
    listed = ", ".join(in_flight[:10]) + (f" and {len(in_flight) - 10} more" if len(in_flight) > 10 else "")
    _echo_err(f"{len(in_flight)} task(s) were running when run {doc['run_id']} stopped; their outcome is unknown: {listed}")
    if sys.stdin.isatty() and click.confirm("Run them again?", default=False, err=True):
        return
    from runbook.errors import ValidationError
    raise ValidationError("tasks in flight when the run stopped would run again",
                          hint="check them on the hosts, then resume with --rerun-in-flight")


# --- inventory, windows, schedule -----------------------------------------------------------------

@cli.command()
@click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory file, directory or `a,b,` list.")
@click.option("-l", "--limit", help="Only hosts matching this pattern.")
@click.option("--list", "as_list", is_flag=True, help="JSON like `ansible-inventory --list`.")
@click.option("--graph", "as_graph", is_flag=True, help="A tree of groups.")
@click.option("--host", help="One host's merged variables and where each came from.")
def inventory(inventory: tuple[str, ...], limit: str | None, as_list: bool, as_graph: bool, host: str | None) -> None:
    """Show an inventory: --list, --graph or --host NAME."""
    from runbook.errors import ValidationError
    from runbook.inventory import Inventory, inventory_report

    if sum([as_list, as_graph, host is not None]) != 1:
        raise ValidationError("choose one of --list, --graph or --host NAME")
    inv = Inventory.load(list(inventory) if inventory else None)
    for w in [*inv.warnings, *(inv.limit_warnings(limit) if host is None else [])]:
        _echo_err(w.render())
    click.echo(inventory_report(inv, mode="list" if as_list else "graph" if as_graph else "host", limit=limit, host=host))


@cli.command()
@click.argument("target", required=False)
@click.option("-n", "--count", default=5, show_default=True, help="How many openings to list.")
def windows(target: str | None, count: int) -> None:
    """Whether a maintenance window is open now, and its next openings (a playbook or a name in windows.yml)."""
    from runbook.cli_windows import show_windows

    click.echo(show_windows(target, count))


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="playbooks", show_default=True)
@click.option("-i", "--inventory", "inventory", multiple=True)
@click.option("--state-dir", type=click.Path(file_okay=False), help="Scheduler state and locks (default: DIR/.runbook/schedule).")
@click.option("--interval", type=float, default=30.0, show_default=True, help="Seconds between checks.")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG")
@click.option("--once", is_flag=True, help="Check once, start what is due, wait for it, and exit.")
@click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]))
@click.option("--known-hosts", type=click.Path(dir_okay=False))
def schedule(directory: str, inventory: tuple[str, ...], state_dir: str | None, interval: float,
             audit_log: str | None, once: bool, host_key_checking: str | None, known_hosts: str | None) -> None:
    """Foreground scheduler: start playbooks when their schedule or window opens (for systemd or a container)."""
    from runbook.cli_windows import run_scheduler
    from runbook.errors import Location, ValidationError

    if not Path(directory).is_dir():
        raise ValidationError("playbook directory not found", location=Location(directory),
                              hint="pass the directory that holds the playbooks with --dir")
    passthrough = ([f"--host-key-checking={host_key_checking}"] if host_key_checking else []) + (
        [f"--known-hosts={known_hosts}"] if known_hosts else [])
    sys.exit(run_scheduler(directory, list(inventory) or None, state_dir, interval, audit_log, once, passthrough))


from runbook.cli_report import report as _report_command  # noqa: E402  (its own module, like cli_windows)

cli.add_command(_report_command)

from runbook.cli_serve import approvals as _approvals_command, serve as _serve_command  # noqa: E402  (like cli_report)

cli.add_command(_serve_command)
cli.add_command(_approvals_command)

from runbook.cli_cluster import worker as _worker_command  # noqa: E402  (like cli_report)

cli.add_command(_worker_command)

from runbook.cli_facts import facts as _facts_command  # noqa: E402  (like cli_report)

cli.add_command(_facts_command)

def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every expected error into a message and an exit code."""
    try:
        cli.main(args=argv, prog_name="runbook", standalone_mode=False)
    except RunbookError as exc:
        _echo_err(str(exc))
        return exc.exit_code
    except click.exceptions.Abort:
        _echo_err("aborted")
        return 130
    except click.UsageError as exc:
        exc.show()
        return EXIT_INVALID  # click's own 2 would read as "a task failed"
    except click.ClickException as exc:
        exc.show()
        return EXIT_INVALID
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        return 130
    return 0



# Commands that run playbooks load the whole engine; the others (validate, graph, ...) stay light.
_ENGINE_COMMANDS = frozenset({"run", "plan", "apply", "resume", "schedule"})


def entry() -> None:
    """Console-script entry point: run, then exit without the interpreter's final sweep of every object."""
    import gc

    if len(sys.argv) > 1 and sys.argv[1] in _ENGINE_COMMANDS:
        # Importing the engine creates ~0.5 M long-lived objects: collecting cycles among them while
        # they are being created is wasted work (~40 ms). Freeze them, then collect normally.
        gc.disable()
        import runbook.actions
        import runbook.console
        import runbook.runner  # noqa: F401

        gc.freeze()
        gc.enable()
    code = main()
    # Everything is flushed and closed by now; freezing skips a final garbage-collector pass over
    # the ~0.5 M objects of our dependencies (about 60 ms of exit time), atexit handlers still run.
    gc.freeze()
    sys.exit(code)
