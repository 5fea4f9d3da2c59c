"""The `runbook` command: thin; parses flags, calls the library, renders, maps errors to exit codes."""

from __future__ import annotations

import json
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
    4 invalid input, 5 outside the maintenance window, 130 interrupted.
    """


# --- validate / graph / schema ----------------------------------------------------------------

@cli.command()
@click.argument("playbooks", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def validate(playbooks: tuple[str, ...], fmt: str, strict: bool) -> None:
    """Check playbooks: structure, step graph, templates and the shell-safety lint."""
    from runbook.loader import validate_playbook

    reports = [validate_playbook(p) for p in playbooks]
    failed = any(r.errors or (strict and r.warnings) for r in reports)
    if fmt == "json":
        click.echo(json.dumps([{
            "file": r.path, "valid": not r.errors,
            "steps": len(r.playbook.all_steps()) if r.playbook else None,
            "problems": [p.as_dict() for p in r.problems],
        } for r in reports], indent=2))
    else:
        for r in reports:
            for p in r.problems:
                _echo_err(p.render())
            if r.errors:
                click.echo(f"{r.path}: invalid ({len(r.errors)} error(s), {len(r.warnings)} warning(s))")
            else:
                pb = r.playbook
                assert pb is not None
                warn = f", {len(r.warnings)} warning(s)" if r.warnings else ""
                click.echo(f"{r.path}: ok — runbook `{pb.runbook}`, {len(pb.steps)} step(s)"
                           f"{f' + {len(pb.on_failure)} on_failure' if pb.on_failure else ''}{warn}")
    if failed:
        sys.exit(EXIT_INVALID)


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

