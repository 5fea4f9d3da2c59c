"""Each action's plan() and apply() against a LocalConnection in a tmp dir (real files, real commands)."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.actions import ACTIONS, Action, TaskEnv, action_for
from runbook.connections.local import LocalConnection
from runbook.errors import ReadOnlyViolation, RunbookError
from runbook.loader import load_playbook
from runbook.connections import ReadOnlyConnection


def make(tmp_path: Path, step: dict[str, Any], vars: dict[str, Any] | None = None, *,
         read_only: bool = False, **env_kw: Any) -> tuple[Action, TaskEnv]:
    """Load a one-step playbook from tmp_path and build its action and task environment."""
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "steps": [step]}, sort_keys=False))
    pb = load_playbook(path)
    conn: Any = LocalConnection("local")
    if read_only:
        conn = ReadOnlyConnection(conn, allow_run=False)
    ctx = {"dir": str(tmp_path), "inventory_hostname": "web1", **(vars or {})}
    return action_for(pb.steps[0]), TaskEnv(step=pb.steps[0], host="web1", conn=conn, vars=ctx, playbook=pb, **env_kw)


def test_registry_has_every_action() -> None:
    core = ["shell", "command", "upload", "template", "fetch", "wait_for", "assert", "approve"]
    assert ACTIONS.names()[:len(core)] == core          # the core first, in this order (messages, schema)
    for name in ACTIONS.names():                          # every other module of runbook/actions/ is found too
        assert ACTIONS.get(name).__module__.startswith("runbook.actions.") and ACTIONS.get(name).name == name


# --- shell / command ------------------------------------------------------------------------------


def test_shell_runs_through_sh_and_reports_rc_and_streams(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "s", "shell": "echo {{ inventory_hostname }} | tr a-z A-Z; echo e >&2; exit 4"})
    out = action.apply(env)
    assert out.failed and out.changed and out.rc == 4
    assert out.stdout == "WEB1\n" and out.stderr == "e\n" and out.message == "exit code 4"
    assert out.command == "echo web1 | tr a-z A-Z; echo e >&2; exit 4"


def test_shell_plan_is_unknown_unless_changed_when_false(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    action, env = make(tmp_path, {"name": "s", "shell": f"touch {marker}"}, read_only=True)
    assert action.plan(env).kind == "unknown"
    assert not marker.exists()
    action, env = make(tmp_path, {"name": "s", "shell": f"touch {marker}", "changed_when": False}, read_only=True)
    assert action.plan(env).kind == "ok"
    assert not marker.exists()


def test_command_never_splits_or_expands_words(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "c", "command": ["printf", "<%s>", "{{ word }}", "$HOME", "*"]},
                       {"word": "a b; rm -rf /"})
    out = action.apply(env)
    assert out.rc == 0 and out.stdout == "<a b; rm -rf /><$HOME><*>"


def test_shell_timeout_is_reported(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "s", "shell": "sleep 5", "timeout": "0.2s"})
    out = action.apply(env)
    assert out.failed and out.message == "timed out after 0.2s" and out.data == {"timed_out": True}


def test_shell_env_reaches_the_command(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "s", "shell": 'printf %s "$GREETING"', "env": {"GREETING": "hi {{ inventory_hostname }}"}})
    assert action.apply(env).stdout == "hi web1"


# --- upload / template ----------------------------------------------------------------------------


def test_upload_changes_only_when_content_or_mode_differs(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("one\n")
    dest = tmp_path / "out" / "dest.txt"
    dest.parent.mkdir()
    step = {"name": "u", "upload": {"src": "src.txt", "dest": str(dest), "mode": "0600"}}
    action, env = make(tmp_path, step)
    plan = action.plan(env)
    assert plan.kind == "change" and "does not exist" in plan.reason and "+one" in (plan.diff or "")
    out = action.apply(env)
    assert out.changed and dest.read_text() == "one\n" and stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert action.plan(env).kind == "ok"
    again = action.apply(env)
    assert not again.changed and not again.failed and again.message == "checksum and mode match"
    dest.chmod(0o644)
    assert "mode 0644 -> 0600" in action.plan(env).reason
    assert action.apply(env).changed and stat.S_IMODE(dest.stat().st_mode) == 0o600
    (tmp_path / "src.txt").write_text("two\n")
    plan = action.plan(env)
    assert plan.kind == "change" and "content differs" in plan.reason
    assert "-one" in (plan.diff or "") and "+two" in (plan.diff or "")
    assert action.apply(env).changed and dest.read_text() == "two\n"


def test_upload_plan_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("one\n")
    dest = tmp_path / "dest.txt"
    action, env = make(tmp_path, {"name": "u", "upload": {"src": "src.txt", "dest": str(dest)}}, read_only=True)
    assert action.plan(env).kind == "change"
    assert not dest.exists()
    with pytest.raises(ReadOnlyViolation):
        action.apply(env)
    assert not dest.exists()


def test_upload_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "u", "upload": {"src": "nope.txt", "dest": str(tmp_path / "d")}})
    with pytest.raises(RunbookError, match="cannot read .*nope.txt"):
        action.apply(env)


def test_binary_upload_diff_is_summarised(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"\x00\x01\x02")
    action, env = make(tmp_path, {"name": "u", "upload": {"src": "blob", "dest": str(tmp_path / "d")}})
    assert "binary or large file" in (action.plan(env).diff or "")
    action.apply(env)
    assert (tmp_path / "d").read_bytes() == b"\x00\x01\x02"


def test_template_renders_with_vars_and_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("name={{ inventory_hostname }}\nport={{ port }}\n")
    dest = tmp_path / "app.conf"
    action, env = make(tmp_path, {"name": "t", "template": {"src": "t.j2", "dest": str(dest)}}, {"port": 8080})
    assert action.apply(env).changed
    assert dest.read_text() == "name=web1\nport=8080\n"
    assert not action.apply(env).changed
    env.vars["port"] = 9090
    out = action.apply(env)
    assert out.changed and "-port=8080" in (out.diff or "") and "+port=9090" in (out.diff or "")


def test_template_undefined_variable_fails(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("{{ missing_var }}\n")
    action, env = make(tmp_path, {"name": "t", "template": {"src": "t.j2", "dest": str(tmp_path / "o")}})
    with pytest.raises(RunbookError, match="missing_var"):
        action.apply(env)
    assert not (tmp_path / "o").exists()


# --- fetch ----------------------------------------------------------------------------------------


def test_fetch_copies_into_dest_host_and_reports_change(tmp_path: Path) -> None:
    src = tmp_path / "remote.log"
    src.write_text("line\n")
    out_dir = tmp_path / "fetched"
    action, env = make(tmp_path, {"name": "f", "fetch": {"src": str(src), "dest": str(out_dir)}})
    assert action.plan(env).kind == "change"
    out = action.apply(env)
    assert out.changed and (out_dir / "web1" / "remote.log").read_text() == "line\n"
    assert action.plan(env).kind == "ok"
    assert not action.apply(env).changed
    assert [p.name for p in (out_dir / "web1").iterdir()] == ["remote.log"]   # no temp file left behind


def test_fetch_missing_source_fails_and_plans_unknown(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "f", "fetch": {"src": str(tmp_path / "nope"), "dest": str(tmp_path / "o")}})
    assert action.plan(env).kind == "unknown"
    # LocalConnection.get raises (the executor turns it into a failed task); SFTP errors become a failed outcome.
    try:
        out = action.apply(env)
        message = out.message if out.failed else ""
    except RunbookError as exc:
        message = str(exc)
    assert "cannot fetch" in message and "nope" in message
    assert list((tmp_path / "o" / "web1").iterdir()) == []


# --- wait_for ------------------------------------------------------------------------------------


def test_wait_for_path_and_command(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    action, env = make(tmp_path, {"name": "w", "wait_for": {"path": str(flag), "timeout": "0.3s", "interval": "0.05s"}})
    out = action.apply(env)
    assert out.failed and "timed out after 0.3s" in out.message
    flag.touch()
    assert not action.apply(env).failed
    action, env = make(tmp_path, {"name": "w", "wait_for": {"path": str(flag), "state": "absent", "timeout": "0.2s",
                                                             "interval": "0.05s"}})
    assert action.apply(env).failed
    action, env = make(tmp_path, {"name": "w", "wait_for": {"command": f"test -e {flag}", "timeout": 1}})
    out = action.apply(env)
    assert not out.failed and "condition met" in out.message


def test_wait_for_port(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        action, env = make(tmp_path, {"name": "w", "wait_for": {"port": port, "timeout": 2, "interval": "0.05s"}})
        assert not action.apply(env).failed
    action, env = make(tmp_path, {"name": "w", "wait_for": {"port": port, "timeout": "0.3s", "interval": "0.05s"}})
    assert action.apply(env).failed


# --- assert / approve ----------------------------------------------------------------------------


def test_assert_reports_the_first_false_condition(tmp_path: Path) -> None:
    action, env = make(tmp_path, {"name": "a", "assert": {"that": ["x > 1", "x < 3"], "msg": "x={{ x }} out of range"}},
                       {"x": 5})
    out = action.apply(env)
    assert out.failed and out.message == "x=5 out of range" and out.data["checks"] == {"x > 1": True, "x < 3": False}
    assert action.plan(env).kind == "fail"
    env.vars["x"] = 2
    assert not action.apply(env).failed and action.plan(env).kind == "ok"


def test_approve_yes_interactive_and_non_interactive(tmp_path: Path) -> None:
    seen: list[tuple[bool, str]] = []
    step = {"name": "g", "approve": "Restart {{ inventory_hostname }}?"}
    action, env = make(tmp_path, step, assume_yes=True, on_approval=lambda g, w: seen.append((g, w)))
    out = action.apply(env)
    assert not out.failed and "(--yes)" in out.message and seen[-1][0] is True

    action, env = make(tmp_path, step)
    out = action.apply(env)
    assert out.failed and "not interactive" in out.message and "--yes" in out.message

    asked: list[str] = []
    action, env = make(tmp_path, step, interactive=True, ask=lambda q: asked.append(q) or False,
                       on_approval=lambda g, w: seen.append((g, w)))
    out = action.apply(env)
    assert out.failed and "not approved" in out.message
    assert asked == ["[web1] Restart web1?"] and seen[-1][0] is False

    action, env = make(tmp_path, step, interactive=True, ask=lambda q: True)
    assert not action.apply(env).failed
    assert action.plan(env).kind == "ok"


# --- debug ------------------------------------------------------------------------------------------

def test_debug_shows_a_message_or_a_value_in_runs_and_plans(tmp_path: Path, write_playbook, local_inventory) -> None:
    import json as _json

    from tests.helpers import cli

    pb = write_playbook([
        {"name": "measure", "shell": "echo 42", "read_only": True, "register": "usage"},
        {"name": "say", "debug": "usage is {{ usage.stdout | trim }}%"},
        {"name": "show", "debug": {"var": "usage.stdout_lines"}},
        {"name": "unknown", "shell": "echo x", "register": "later"},
        {"name": "guess", "debug": {"msg": "{{ later.stdout }}"}}])
    inv = local_inventory(["a"])
    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    ran = _json.loads(cli("run", str(pb), "-i", str(inv), "--output", "json", env=env).stdout)
    by = {r["step_id"]: r for r in ran["results"]}
    assert by["say"]["message"] == "usage is 42%" and by["say"]["status"] == "ok"
    assert by["show"]["message"] == 'usage.stdout_lines = ["42"]'
    planned = _json.loads(cli("plan", str(pb), "-i", str(inv), "--output", "json", env=env).stdout)
    preds = {p["step_id"]: p for p in planned["predictions"]}
    assert (preds["say"]["prediction"], preds["say"]["reason"]) == ("ok", "usage is 42%")
    assert preds["guess"]["prediction"] == "unknown" and "later" in preds["guess"]["reason"]


def test_debug_needs_exactly_one_of_msg_and_var(tmp_path: Path, write_playbook) -> None:
    from tests.helpers import cli

    out = cli("validate", str(write_playbook([{"name": "d", "debug": {"msg": "a", "var": "b"}}])))
    assert out.returncode == 4 and "exactly one of `msg` or `var`" in out.stderr
