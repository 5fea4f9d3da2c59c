"""Roles, includes and vars_files against real sshd hosts: what runs, plan -> apply accuracy, and drift."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_main as cli
from tests.sshd import SSHHost, write_inventory

pytestmark = pytest.mark.ssh

SITE = Path(__file__).resolve().parents[1] / "fixtures" / "compose" / "site"
MATCHES = {"change": {"changed"}, "ok": {"ok"}, "skip": {"skipped"}, "fail": {"failed"}, "not_run": {"not_run"}}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the fixture site to change, a working directory and an audit trail."""
    shutil.copytree(SITE, tmp_path / "site")
    wd = tmp_path / "work"
    wd.mkdir()
    monkeypatch.chdir(wd)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    yield tmp_path / "site" / "site.yml"


def args_for(tmp_path: Path, hosts: list[SSHHost], known_hosts: Path) -> list[str]:
    inv = write_inventory(tmp_path / "inv.yml", hosts, host_vars={h.name: {"dir": str(h.home)} for h in hosts})
    return ["-i", str(inv), "--known-hosts", str(known_hosts)]


def test_a_role_and_an_include_run_on_real_hosts_as_planned(
        tmp_path: Path, site: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:3]
    h0, h1, h2 = hosts
    args = args_for(tmp_path, hosts, known_hosts)
    # h1 already has the page as the role renders it; h2 an old one.
    page = "<h1>Default title</h1>\nport=8080 hello production\n"
    for h, text in ((h1, page), (h2, "old\n")):
        (h.home / "www").mkdir()
        (h.home / "www/index.html").write_text(text)
        shutil.chown(h.home / "www", h.user, h.user)
        shutil.chown(h.home / "www/index.html", h.user, h.user)

    code, out, err = cli(capsys, "plan", site, *args, "--out", "plan.json", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    preds = {(p["host"], p["step_id"]): p for p in doc["predictions"]}
    assert {h.name: preds[(h.name, "web/page")]["prediction"] for h in hosts} == {"h0": "change", "h1": "ok", "h2": "change"}
    assert "+port=8080 hello production" in preds[("h2", "web/page")]["diff"]
    assert {p["step_id"] for p in doc["predictions"]} >= {"prepare", "web/page", "web/motd", "check/look", "check/report"}
    kept = doc["playbook"]["files"]
    assert kept[str((site.parent / "roles/web/steps.yml").resolve())] == (site.parent / "roles/web/steps.yml").read_text()
    assert str((site.parent / "vars/prod.yml").resolve()) in kept
    assert str((site.parent / "roles/web/templates/index.html.j2").resolve()) in doc["local_files"]
    assert not (h0.home / "www").exists()                       # the plan changed nothing

    code, out, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y", "--format", "json")
    assert code == 0, err
    actual = {(r["host"], r["step_id"]): r["status"] for r in json.loads(out)["results"]}
    wrong = [f"{k}: predicted {p['prediction']} ({p['reason']}), got {actual[k]}" for k, p in preds.items()
             if p["prediction"] in MATCHES and actual[k] not in MATCHES[p["prediction"]]]
    assert not wrong, "\n".join(wrong)
    for h in hosts:
        assert (h.home / "www/index.html").read_text() == page
        assert (h.home / "www/motd").read_text() == "welcome\n"        # from the role's files/
        assert "web ok" in (h.home / "www/log").read_text().splitlines()


def test_apply_refuses_a_role_file_changed_since_the_plan(
        tmp_path: Path, site: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hosts = clean_ssh_hosts[:2]
    args = args_for(tmp_path, hosts, known_hosts)
    code, _, err = cli(capsys, "plan", site, *args, "--out", "plan.json")
    assert code == 0, err
    steps_file = site.parent / "roles/web/steps.yml"
    reviewed = steps_file.read_text()
    for changed, rel in ((steps_file, "roles/web/steps.yml"),
                         (site.parent / "roles/web/defaults.yml", "roles/web/defaults.yml"),
                         (site.parent / "vars/prod.yml", "vars/prod.yml"),
                         (site.parent / "roles/web/templates/index.html.j2", "roles/web/templates/index.html.j2")):
        original = changed.read_text()
        changed.write_text(original + ("- name: extra\n  shell: touch {{ dir }}/owned\n" if rel.endswith("steps.yml")
                                       else "# edited\n" if rel.endswith(".yml") else "edited\n"))
        code, _, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y")
        assert code == 4, err
        assert f"file {(site.parent / rel).resolve()} changed since the plan" in err, err
        changed.write_text(original)
    assert steps_file.read_text() == reviewed
    for h in hosts:
        assert not (h.home / "www").exists() and not (h.home / "owned").exists()   # nothing ran
    code, _, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y")
    assert code == 0, err


def test_a_forged_kept_role_text_is_refused(
        tmp_path: Path, site: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.plan import canonical, sha256_text

    hosts = clean_ssh_hosts[:1]
    code, _, err = cli(capsys, "plan", site, *args_for(tmp_path, hosts, known_hosts), "--out", "plan.json")
    assert code == 0, err
    plan = Path("plan.json")
    doc = json.loads(plan.read_text())
    key = str((site.parent / "roles/web/steps.yml").resolve())
    doc["playbook"]["files"][key] += "- name: evil\n  shell: touch {{ dir }}/owned\n"
    doc["hash"] = sha256_text(canonical({k: v for k, v in doc.items() if k not in ("hash", "signature")}))
    plan.write_text(json.dumps(doc))
    code, _, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y")
    assert code != 0 and "does not match its sha256" in err
    # A forger who also rewrites the file's sha256 meets the file on disk, which is not what the plan says.
    doc["local_files"][key] = sha256_text(doc["playbook"]["files"][key])
    doc["hash"] = sha256_text(canonical({k: v for k, v in doc.items() if k not in ("hash", "signature")}))
    plan.write_text(json.dumps(doc))
    code, _, err = cli(capsys, "apply", "plan.json", "--known-hosts", str(known_hosts), "-y")
    assert code == 4 and f"file {key} changed since the plan" in err
    assert not (hosts[0].home / "owned").exists()
