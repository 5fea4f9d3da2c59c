"""The shipped playbooks validate cleanly and the harmless ones run locally; engine features they rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runbook.cli import main
from runbook.template import render

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = sorted(p for p in (ROOT / "playbooks").glob("*.yml") if p.name != "windows.yml")
EXPECTED = {"health-check", "disk-pressure", "backup", "restore", "diagnostics", "ssh-hardening", "rolling-restart"}


def test_every_area_has_a_playbook() -> None:
    assert {p.stem for p in PLAYBOOKS} == EXPECTED


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.stem)
def test_validates_strictly_without_warnings(playbook: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", "--strict", "--format", "json", str(playbook)])
    out = capsys.readouterr().out
    assert rc == 0, out
    [report] = json.loads(out)
    assert report["valid"] and report["problems"] == [], out   # no warning either (shell-safety lint included)


def test_the_readmes_playbook_language_example_validates_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's loops/handlers/blocks/roles example is a real playbook (given the files it names)."""
    import re

    text = (ROOT / "README.md").read_text()
    example = re.search(r"```yaml\n(runbook: web\n.*?)```", text, re.DOTALL)
    assert example is not None, "the README lost its playbook-language example"
    (tmp_path / "pb.yml").write_text(example.group(1))
    for rel, content in {"roles/nginx/steps.yml": "- name: install\n  package: {name: nginx, state: present}\n",
                         "vars/prod.yml": "sites: [{name: shop}, {name: blog}]\n",
                         "tasks/upgrade.yml": "- name: upgrade nginx\n  shell: 'true'\n",
                         "site.conf.j2": "server {}\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
    assert main(["validate", "--strict", str(tmp_path / "pb.yml")]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["run", str(tmp_path / "pb.yml"), "--list-steps"]) == 0
    listed = capsys.readouterr().out
    for sid in ("nginx/install", "site-configs", "upgrade/upgrade-nginx", "say-so", "out-of-the-pool", "reload-nginx"):
        assert sid in listed, listed


def test_readme_lists_every_playbook_with_commands() -> None:
    readme = (ROOT / "playbooks" / "README.md").read_text()
    for name in EXPECTED:
        assert f"{name}.yml" in readme
        assert f"runbook plan playbooks/{name}.yml -i inventory/example.yml" in readme
    assert "runbook run playbooks/health-check.yml" in readme.split("|")[0], "the first command is the harmless one"


def _run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "RUNBOOK_AUDIT_LOG": str(cwd / "audit.jsonl")}
    return subprocess.run([sys.executable, "-m", "runbook", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_health_check_runs_locally(tmp_path: Path) -> None:
    res = _run(["run", str(ROOT / "playbooks/health-check.yml"), "--output", "json", "-e",
                json.dumps({"load_max_per_core": 10000, "mem_min_available_pct": 0, "swap_max_pct": 100,
                            "disk_max_pct": 100, "inode_max_pct": 100})], tmp_path, tmp_path)
    result = json.loads(res.stdout)
    asserts = [r for r in result["results"] if r["action"] == "assert"]
    assert len(asserts) == 7 and all(r["data"]["checks"] for r in asserts)
    assert res.returncode == (0 if all(r["status"] == "ok" for r in asserts) else 2)


def test_diagnostics_runs_locally(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_text("a\nb\nc\n")
    res = _run(["run", str(ROOT / "playbooks/diagnostics.yml"), "--output", "json", "-e",
                json.dumps({"log_files": ["~/app.log"], "log_lines": 2})], tmp_path, tmp_path)
    assert res.returncode == 0, res.stderr
    run_id = json.loads(res.stdout)["run_id"]
    host_dir = tmp_path / "diagnostics" / run_id / "localhost"
    assert (host_dir / "logs.txt").read_text() == f"## {tmp_path}/app.log\nb\nc\n\n"
    assert "logs.txt" in (host_dir / "index.txt").read_text()


def test_disk_pressure_dry_run_locally_changes_nothing(tmp_path: Path) -> None:
    logs = tmp_path / "app" / "logs"
    logs.mkdir(parents=True)
    old = logs / "old.log"
    old.write_text("x" * 10000)
    os.utime(old, (1_000_000_000, 1_000_000_000))
    res = _run(["plan", str(ROOT / "playbooks/disk-pressure.yml"), "--out", "p.json", "-e",
                json.dumps({"capacity_bytes": 1000, "threshold_pct": 1})], tmp_path, tmp_path)
    assert res.returncode == 0, res.stderr
    preds = {p["step_id"]: p["prediction"] for p in json.loads((tmp_path / "p.json").read_text())["predictions"]}
    assert preds["compress"] == "change" and preds["delete-compressed"] == "skip" and preds["verify"] == "unknown"
    assert old.exists() and not (logs / "old.log.gz").exists()


# --- engine features the playbooks rely on -------------------------------------------------------

@pytest.mark.parametrize("value, shell", [
    ("~", '"$HOME"'), ("~/app/logs", '"$HOME"/app/logs'), ("/var/log/my app", "'/var/log/my app'"),
    ("~/a'b", '"$HOME"/\'a\'"\'"\'b\''), (["~/x", "/y z"], '"$HOME"/x \'/y z\''), ("~user/x", "'~user/x'"),
])
def test_quote_path_keeps_home_and_quotes_the_rest(value: object, shell: str) -> None:
    assert render("{{ p | quote_path }}", {"p": value}) == shell


def test_quote_path_expands_in_a_real_shell(tmp_path: Path) -> None:
    weird = "d i r;$(touch pwned)"
    (tmp_path / weird).mkdir()
    cmd = render("cd {{ p | quote_path }} && pwd", {"p": "~/" + weird})
    out = subprocess.run(["sh", "-c", cmd], env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / weird)
    assert not (tmp_path / "pwned").exists()


def test_dry_run_marks_reads_after_a_planned_change_unknown(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "pb.yml").write_text(f"""
runbook: stale
steps:
  - name: change
    shell: touch {marker}
    unless: test -e {marker}
  - name: after
    read_only: true
    shell: test -e {marker} && echo yes
    register: after
  - name: check
    read_only: true
    assert: after.stdout | trim == 'yes'
  - name: restart
    shell: "true"
    changed_when: true
""")
    res = _run(["plan", "pb.yml", "--out", "p.json"], tmp_path, tmp_path)
    assert res.returncode == 0, res.stderr
    preds = {p["step_id"]: (p["prediction"], p["reason"]) for p in json.loads((tmp_path / "p.json").read_text())["predictions"]}
    assert preds["change"][0] == "change"
    assert preds["after"][0] == "unknown" and "before changes planned ahead" in preds["after"][1]
    assert preds["check"][0] == "unknown" and "`after`" in preds["check"][1]
    assert preds["restart"][0] == "change"
    assert not marker.exists()
    # Once the change is made, nothing is planned ahead of the reads: they predict for real.
    marker.touch()
    _run(["plan", "pb.yml", "--out", "p2.json"], tmp_path, tmp_path)
    preds = {p["step_id"]: p["prediction"] for p in json.loads((tmp_path / "p2.json").read_text())["predictions"]}
    assert preds == {"change": "skip", "after": "ok", "check": "ok", "restart": "change"}


def test_numeric_limits_given_as_key_value_extra_vars_work(tmp_path: Path) -> None:
    """`-e key=value` is text (as in Ansible): the shipped playbooks compare limits with `| int`."""
    from tests.helpers import cli

    env = {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    out = cli("run", str(ROOT / "playbooks" / "health-check.yml"), "-e", "disk_max_pct=100", "-e", "inode_max_pct=100",
              "-e", "mem_min_available_pct=0", "-e", "swap_max_pct=100", "-e", "load_max_per_core=100000",
              "-e", "max_clock_skew=60", "--format", "json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
