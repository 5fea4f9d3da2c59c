"""`runbook run` through the CLI (runbook.cli.main, or a subprocess for signals) on local inventories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.cli import main
from tests.sshd import free_port


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp dir with the audit trail pointed inside it, used as the current directory."""
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def inventory(tmp: Path, names: list[str] | None = None, extra: dict[str, dict] | None = None) -> Path:
    """Local hosts (default a and b) with a per-host directory `dir`."""
    hosts: dict[str, dict] = {}
    for n in names or ["a", "b"]:
        (tmp / "hosts" / n).mkdir(parents=True, exist_ok=True)
        hosts[n] = {"ansible_connection": "local", "dir": str(tmp / "hosts" / n)}
    hosts.update(extra or {})
    path = tmp / "inv.yml"
    path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
    return path


def playbook(tmp: Path, steps: list[dict[str, Any]], name: str = "pb.yml", **top: Any) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"runbook": "t", **top, "steps": steps}, sort_keys=False))
    return path


def cli_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, dict[str, Any], str]:
    """Run the CLI with --output json; return (exit code, parsed stdout, stderr)."""
    code = exit_code(lambda: main([*args, "--output", "json"]))
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def exit_code(fn: Any) -> int:
    """The exit code of a CLI call: main() returns it or click's sys.exit raises it."""
    try:
        rc = fn()
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(rc or 0)


def by_task(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["host"], r["step_id"]): r for r in doc["results"]}


def test_json_output_and_exit_0(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir)
    pb = playbook(workdir, [{"name": "hello", "shell": "echo hi {{ inventory_hostname }} | tee {{ dir }}/hello"},
                            {"name": "skip", "shell": "true", "when": "false"}])
    code, doc, _ = cli_json(capsys, ["run", str(pb), "-i", str(inv)])
    assert code == 0 and doc["exit_code"] == 0
    tasks = by_task(doc)
    assert set(tasks) == {(h, s) for h in "ab" for s in ("hello", "skip")}
    assert tasks[("b", "hello")]["stdout"] == "hi b\n" and tasks[("b", "hello")]["status"] == "changed"
    assert tasks[("a", "skip")]["status"] == "skipped"
    assert doc["recap"] == {"a": {"changed": 1, "skipped": 1}, "b": {"changed": 1, "skipped": 1}}
    assert (workdir / "hosts" / "a" / "hello").read_text() == "hi a\n"
    assert (workdir / "audit.jsonl").stat().st_size > 0   # the audit trail went where it was told
    assert not (workdir / ".runbook" / "audit.jsonl").exists()


def test_failed_task_exits_2_and_plain_output_has_a_recap(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir)
    pb = playbook(workdir, [{"name": "bad", "shell": "echo boom >&2; exit 5"}, {"name": "next", "shell": "true"}])
    code = exit_code(lambda: main(["run", str(pb), "-i", str(inv)]))
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""                  # the console view writes to stderr only
    assert "bad" in err and "a" in err and "failed" in err.lower()


def test_unreachable_host_exits_3(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A real refused TCP connection to a closed loopback port (no SSH layer is mocked).
    dead = {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "nobody"}
    inv = inventory(workdir, ["a"], extra={"dead": dead})
    pb = playbook(workdir, [{"name": "one", "shell": "touch {{ dir | default('/nonexistent') }}/one"}])
    code, doc, _ = cli_json(capsys, ["run", str(pb), "-i", str(inv), "--connect-timeout", "3"])
    assert code == 3
    assert "connection refused" in doc["unreachable"]["dead"]
    assert by_task(doc)[("a", "one")]["status"] == "changed"
    assert (workdir / "hosts" / "a" / "one").exists()


@pytest.mark.parametrize("args, needle", [
    (["-e", "novalue"], "expected key=value"),
    (["-e", "{bad json"], "invalid JSON"),
    (["-e", "@missing.yml"], "missing.yml"),
    (["--host-key-checking", "maybe"], "maybe"),
    (["--ignore-window"], "--reason"),
])
def test_invalid_input_exits_4(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    inv = inventory(workdir)
    pb = playbook(workdir, [{"name": "one", "shell": "touch {{ dir }}/one"}])
    code = exit_code(lambda: main(["run", str(pb), "-i", str(inv), *args]))
    _, err = capsys.readouterr()
    assert code == 4, err
    assert needle in err
    assert not (workdir / "hosts" / "a" / "one").exists()


def test_invalid_playbook_and_inventory_exit_4(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir)
    bad = workdir / "bad.yml"
    bad.write_text("runbook: x\nsteps:\n  - name: a\n    shell: 'true'\n    needs: [ghost]\n")
    assert exit_code(lambda: main(["run", str(bad), "-i", str(inv)])) == 4
    assert "ghost" in capsys.readouterr().err
    pb = playbook(workdir, [{"name": "one", "shell": "true"}])
    assert exit_code(lambda: main(["run", str(pb), "-i", str(workdir / "no-such-inventory.yml")])) == 4
    capsys.readouterr()


def test_extra_vars_forms_and_precedence(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir, ["a"])
    (workdir / "vars.yml").write_text("x: from-file\ny: from-file\nz: from-file\n")
    pb = playbook(workdir, [{"name": "w", "shell": "echo {{ x }} {{ y }} {{ z }} {{ n }} > {{ dir }}/v"}],
                  vars={"x": "pb", "y": "pb", "z": "pb", "n": 0})
    code = exit_code(lambda: main(["run", str(pb), "-i", str(inv), "-e", "@vars.yml", "-e", "y=kv",
                                   "-e", '{"z": "json", "n": 3}']))
    assert code == 0, capsys.readouterr().err
    assert (workdir / "hosts" / "a" / "v").read_text() == "from-file kv json 3\n"


def test_limit_and_tags(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir, ["a", "b", "c"])
    pb = playbook(workdir, [
        {"name": "x", "shell": "touch {{ dir }}/x", "tags": ["one"]},
        {"name": "y", "shell": "touch {{ dir }}/y", "tags": ["two"]},
        {"name": "z", "shell": "touch {{ dir }}/z", "tags": ["three"]},
    ])
    code, doc, _ = cli_json(capsys, ["run", str(pb), "-i", str(inv), "-l", "a:c", "-t", "one,two", "--skip-tags", "two"])
    assert code == 0 and doc["hosts"] == ["a", "c"]
    assert sorted(p.name for p in (workdir / "hosts" / "a").iterdir()) == ["x"]
    assert list((workdir / "hosts" / "b").iterdir()) == []


def test_dry_run_changes_nothing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir, ["a"])
    pb = playbook(workdir, [{"name": "w", "shell": "touch {{ dir }}/w", "creates": "{{ dir }}/w"}])
    code = exit_code(lambda: main(["run", str(pb), "-i", str(inv), "--dry-run"]))
    out, _ = capsys.readouterr()
    assert code == 0 and "w" in out
    assert list((workdir / "hosts" / "a").iterdir()) == []


def test_approve_fails_without_yes_when_not_interactive(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = inventory(workdir, ["a"])
    pb = playbook(workdir, [{"name": "gate", "approve": "Go?"}, {"name": "act", "shell": "touch {{ dir }}/act"}])
    code, doc, _ = cli_json(capsys, ["run", str(pb), "-i", str(inv)])
    assert code == 2
    gate = by_task(doc)[("a", "gate")]
    assert gate["status"] == "failed" and "not interactive" in gate["message"] and "--yes" in gate["message"]
    assert not (workdir / "hosts" / "a" / "act").exists()
    code, doc, _ = cli_json(capsys, ["run", str(pb), "-i", str(inv), "--yes"])
    assert code == 0 and (workdir / "hosts" / "a" / "act").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_with_130(tmp_path: Path, sig: signal.Signals) -> None:
    inv = inventory(tmp_path, ["a"])
    pb = playbook(tmp_path, [
        {"name": "first", "shell": "touch {{ dir }}/first"},
        {"name": "nap", "shell": "sleep 0.5; touch {{ dir }}/nap"},
        {"name": "last", "shell": "touch {{ dir }}/last"},
    ])
    env = {**os.environ, "RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", str(pb), "-i", str(inv), "--output", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "hosts" / "a" / "first").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    doc = json.loads(out)
    tasks = by_task(doc)
    assert doc["interrupted"] is True
    assert tasks[("a", "last")]["status"] == "not_run"
    assert not (tmp_path / "hosts" / "a" / "last").exists()
    # The audit trail recorded the interrupt and the run's end (nothing half-recorded).
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events[-1] == "run.finished" and "run.interrupted" in events
    assert events.count("task.finished") == 3


def test_audit_commands_find_the_trail_beside_playbooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """From a repository root, `runbook audit verify` and `runbook runs` find playbooks/.runbook/ by themselves."""
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks" / "pb.yml").write_text("runbook: t\nsteps:\n  - name: a\n    command: ['true']\n")
    assert main(["run", "playbooks/pb.yml"]) == 0
    assert (tmp_path / "playbooks" / ".runbook" / "audit.jsonl").is_file()
    capsys.readouterr()
    assert main(["audit", "verify"]) == 0
    assert "playbooks/.runbook/audit.jsonl: ok" in capsys.readouterr().out
    assert main(["runs"]) == 0
    assert " run " in capsys.readouterr().out
