"""Hardening regressions on real sshd hosts: hostile host names, dry runs that must not write, hostvars."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import cli
from tests.sshd import SSHHost


def _inventory(path: Path, hosts: dict[str, SSHHost], extra: dict[str, dict] | None = None) -> Path:
    doc = {"all": {"hosts": {name: {**h.inventory_vars(), "home": str(h.home), **(extra or {}).get(name, {})}
                             for name, h in hosts.items()}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return {"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}


def test_fetch_keeps_a_hostile_host_name_inside_dest(tmp_path: Path, ssh_host: SSHHost, known_hosts: Path) -> None:
    (ssh_host.home / "report.txt").write_text("data\n")
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    inv = _inventory(tmp_path / "inv.yml", {"../../escape-dir": ssh_host})
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "fetch", "steps": [
        {"name": "get", "fetch": {"src": "{{ home }}/report.txt", "dest": str(work / "out")}}]}))
    out = cli("run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json",
              env=_env(tmp_path), cwd=work)
    assert out.returncode == 0, out.stderr
    landed = [p for p in tmp_path.rglob("report.txt")]
    assert landed == [work / "out" / ".._.._escape-dir" / "report.txt"]
    assert not (tmp_path / "escape-dir").exists() and not (work.parent.parent / "escape-dir").exists()


def test_fetch_refuses_a_destination_that_a_symlink_leads_out_of(tmp_path: Path, ssh_host: SSHHost,
                                                                  known_hosts: Path) -> None:
    (ssh_host.home / "report.txt").write_text("data\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out_dir / "h0").symlink_to(elsewhere)
    inv = _inventory(tmp_path / "inv.yml", {"h0": ssh_host})
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "fetch", "steps": [
        {"name": "get", "fetch": {"src": "{{ home }}/report.txt", "dest": str(out_dir)}}]}))
    out = cli("run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), env=_env(tmp_path))
    assert out.returncode == 2
    assert "outside" in out.stdout + out.stderr and not list(elsewhere.iterdir())


def test_a_dry_run_never_runs_a_wait_for_command(tmp_path: Path, ssh_host: SSHHost, known_hosts: Path) -> None:
    inv = _inventory(tmp_path / "inv.yml", {"h0": ssh_host})
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "wait", "steps": [
        {"name": "wait", "wait_for": {"command": "touch {{ home | quote }}/pwned", "timeout": "2s"}},
        {"name": "probe", "wait_for": {"path": "{{ home }}/.profile-absent", "state": "absent", "timeout": "2s"}}]}))
    for args in (["plan", str(pb)], ["run", str(pb), "--dry-run"]):
        out = cli(*args, "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json", env=_env(tmp_path))
        assert out.returncode == 0, out.stderr
        assert not (ssh_host.home / "pwned").exists()
        predictions = {p["step_id"]: p for p in json.loads(out.stdout)["predictions"]}
        assert predictions["wait"]["prediction"] == "unknown" and "not run in a dry run" in predictions["wait"]["reason"]
        assert predictions["probe"]["prediction"] == "ok"        # runbook's own probes still run
    ran = cli("run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), env=_env(tmp_path))
    assert ran.returncode == 0 and (ssh_host.home / "pwned").exists()


def test_hostvars_reads_other_hosts_variables_redacted(tmp_path: Path, clean_ssh_hosts: list[SSHHost],
                                                       known_hosts: Path) -> None:
    h0, h1 = clean_ssh_hosts[:2]
    inv = _inventory(tmp_path / "inv.yml", {"h0": h0, "h1": h1},
                     {"h0": {"role": "primary", "db_password": "s3cr3t-pw"}, "h1": {"role": "replica"}})
    pb = tmp_path / "pb.yml"
    pb.write_text(yaml.safe_dump({"runbook": "hostvars", "steps": [
        {"name": "peer", "shell": "echo {{ hostvars['h0'].role | quote }} {{ hostvars['h0'].db_password | quote }}",
         "read_only": True, "register": "peer"}]}))
    out = cli("run", str(pb), "-i", str(inv), "--known-hosts", str(known_hosts), "--output", "json", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    results = {r["host"]: r for r in json.loads(out.stdout)["results"]}
    assert results["h1"]["stdout"] == "primary ***\n"
    assert "s3cr3t-pw" not in out.stdout + out.stderr + (tmp_path / "audit.jsonl").read_text()
