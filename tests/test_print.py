"""`print:`: a templated message (string or mapping) on the console and in results; never a change; dry runs too;
secrets redacted everywhere it is shown; a host's control characters cannot reach the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.actions.print import message_text
from runbook.errors import PlaybookError
from runbook.loader import parse_playbook, validate_playbook
from runbook.results import Status
from tests.helpers import cli

SECRET = "hunter2-very-secret"


def files(tmp_path: Path, steps: list[dict[str, Any]], **top: Any) -> tuple[Path, Path]:
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"a": {"ansible_connection": "local", "role": "web"},
                                                      "b": {"ansible_connection": "local", "role": "db"}}}}))
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "t", **top, "steps": steps}, sort_keys=False))
    return pb, inv


def test_a_string_message_is_rendered_per_host_into_the_result(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "say", "print": "{{ inventory_hostname }} is {{ role }}", "register": "said"},
                               {"name": "echo", "print": "{{ said.msg }} / {{ said.changed }}"}])
    result = run(pb, str(inv), audit_log=str(tmp_path / "a.jsonl"), state_dir=str(tmp_path / "runs"))
    assert result.exit_code() == 0
    for host, role in (("a", "web"), ("b", "db")):
        r = result.get(host, "say")
        assert (r.status, r.changed, r.message, r.data) == (Status.OK, False, f"{host} is {role}", {"message": f"{host} is {role}"})
        assert result.get(host, "echo").message == f"{host} is {role} / False"


def test_a_mapping_message_keeps_its_structure_in_results_and_reads_as_lines(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "summary", "print": {"host": "{{ inventory_hostname }}", "checks": ["{{ role }}", 2],
                                                             "nested": {"ok": True, "none": None}}}])
    result = run(pb, str(inv), audit_log=str(tmp_path / "a.jsonl"), state_dir=str(tmp_path / "runs"))
    r = result.get("a", "summary")
    assert r.data["message"] == {"host": "a", "checks": ["web", 2], "nested": {"ok": True, "none": None}}
    assert r.message == "host: a\nchecks:\n  - web\n  - 2\nnested:\n  ok: true\n  none: null"


def test_message_text_writes_values_unescaped() -> None:
    # JSON would escape a quote or backslash inside a secret, and the redactor would then miss it.
    assert message_text({"k": 'a"b\\c'}) == 'k: a"b\\c'
    assert message_text([{"a": 1}, []]) == "- a: 1\n- []"


def test_the_console_shows_printed_messages_without_verbose(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "say", "print": "hello from {{ inventory_hostname }}"},
                               {"name": "map", "print": {"role": "{{ role }}", "n": 1}},
                               {"name": "quiet", "shell": "echo not shown"}])
    proc = cli("run", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "a: say: ok" in proc.stderr and "— hello from a" in proc.stderr and "— hello from b" in proc.stderr
    assert "    | role: web" in proc.stderr and "    | n: 1" in proc.stderr
    assert "not shown" not in proc.stderr


def test_print_runs_in_a_dry_run_and_predicts_ok(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "say", "print": "{{ inventory_hostname }} would be touched"}])
    result = run(pb, str(inv), mode="plan", audit_log=str(tmp_path / "a.jsonl"))
    r = result.get("a", "say")
    assert str(r.prediction) == "ok" and r.message == "a would be touched"
    proc = cli("plan", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 0 and "= say  no change — a would be touched" in proc.stdout


def test_secrets_in_a_printed_message_are_redacted_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRINT_TOKEN", SECRET)
    pb, inv = files(tmp_path, [{"name": "leak", "print": "token={{ token }}"},
                               {"name": "leak-map", "print": {"t": "{{ token }}", "quoted": '"{{ token }}"'}}],
                    secrets={"token": "env:PRINT_TOKEN"})
    audit = tmp_path / "a.jsonl"
    proc = cli("run", str(pb), "-i", str(inv), "--audit-log", str(audit), "--format", "json",
               env={"PRINT_TOKEN": SECRET})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert "token=***" in proc.stderr and "| t: ***" in proc.stderr
    for text in (proc.stdout, proc.stderr, audit.read_text()):
        assert SECRET not in text
    leak = next(r for r in doc["results"] if r["step_id"] == "leak-map")
    assert leak["data"]["message"] == {"t": "***", "quoted": '"***"'}
    plan = cli("plan", str(pb), "-i", str(inv), "--audit-log", str(audit), env={"PRINT_TOKEN": SECRET})
    assert plan.returncode == 0 and SECRET not in plan.stdout + plan.stderr and "token=***" in plan.stdout


def test_a_hosts_control_characters_in_a_message_are_shown_as_escapes(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "read", "shell": "printf 'x\\033[2J\\033]0;owned\\007y'", "register": "out"},
                               {"name": "show", "print": "got {{ out.stdout }}"}])
    proc = cli("run", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "got x\\x1b[2J\\x1b]0;owned\\x07y" in proc.stderr
    plan = cli("plan", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert "\x1b" not in plan.stdout


def test_print_is_validated_and_its_templates_checked(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError):
        parse_playbook("runbook: t\nsteps:\n  - name: x\n    print: 5\n")
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: t\nsteps:\n  - name: x\n    print:\n      a: '{{ mispelt }}'\n      b: '{{ oops'\n")
    report = validate_playbook(pb)
    assert [(p.location.line, p.severity) for p in report.problems] == [(5, "warning"), (6, "error")]


def test_a_message_reading_output_a_dry_run_cannot_know_is_unknown(tmp_path: Path) -> None:
    pb, inv = files(tmp_path, [{"name": "count", "shell": "ls | wc -l", "register": "n"},
                               {"name": "say", "print": "{{ n.stdout }} files"}])
    result = run(pb, str(inv), mode="plan", audit_log=str(tmp_path / "a.jsonl"))
    r = result.get("a", "say")
    assert str(r.prediction) == "unknown" and "registered by `count`, which cannot run in a dry run" in r.message
