"""`runbook serve` as a command: --check, refusals before start, and SIGTERM checkpointing a run that resumes on restart."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest

from runbook.cli import main
from tests.serve_support import AUTH, am_alert, am_payload, make_site, records, start_serve, stop_serve, wait_for


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    monkeypatch.delenv("RUNBOOK_SERVE_TOKEN", raising=False)
    s = make_site(tmp_path)
    s.write_rules([{"name": "disk", "playbook": "fix.yml"}])
    return s


def serve(site, *args: str) -> int:
    return main(["serve", "--rules", str(site.rules), "-i", str(site.inventory), *args])


def test_check_validates_rules_inventory_and_credentials(site, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_SERVE_TOKEN", "a-token-long-enough-123")
    assert serve(site, "--check") == 0
    out = capsys.readouterr().out
    assert "ok — 1 rule(s): disk" in out and "inventory: ok — 3 host(s)" in out and "auth: token" in out


def test_check_reports_located_errors(site, capsys: pytest.CaptureFixture[str]) -> None:
    site.rules.write_text("rules:\n  - name: disk\n    playbook: fix.yml\n    colldown: 5m\n")
    assert serve(site, "--check", "--insecure-no-auth") == 4
    assert "rules.yml:4:5: error: unknown key `colldown`" in capsys.readouterr().err


def test_check_reports_a_bad_inventory(site, capsys: pytest.CaptureFixture[str]) -> None:
    (site.root / "bad.ini").write_text("[web\nhost1\n")
    assert main(["serve", "--rules", str(site.rules), "-i", str(site.root / "bad.ini"), "--check", "--insecure-no-auth"]) == 4
    assert "bad.ini:1" in capsys.readouterr().err


def test_no_token_no_server(site, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve(site) == 4
    err = capsys.readouterr().err
    assert "refuses to run without authentication" in err and "RUNBOOK_SERVE_TOKEN" in err


def test_a_missing_hook_secret_stops_the_start(site, capsys: pytest.CaptureFixture[str]) -> None:
    site.write_rules([{"name": "d", "hook": "d", "playbook": "fix.yml"}], hooks={"d": {"secret": "env:NOT_SET_ANYWHERE"}})
    assert serve(site, "--check", "--insecure-no-auth") == 4
    assert "environment variable NOT_SET_ANYWHERE is not set" in capsys.readouterr().err


def test_no_auth_only_on_loopback(site, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve(site, "--insecure-no-auth", "--listen", "0.0.0.0:9095") == 4
    assert "anyone who can reach it" in capsys.readouterr().err
    assert serve(site, "--listen", "nonsense") == 4


def test_a_port_in_use_is_a_clear_error(site, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert serve(site, "--insecure-no-auth", "--listen", f"127.0.0.1:{port}") == 4
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_sigterm_checkpoints_a_running_remediation_and_the_restart_resumes_it(site) -> None:
    (site.root / "two-steps.yml").write_text(f"""\
runbook: two-steps
hosts: all
vars: {{log: "{site.out}/steps.log"}}
steps:
  - name: first
    shell: echo first >> {{{{ log | quote }}}}; sleep 1.5
  - name: second
    shell: echo second >> {{{{ log | quote }}}}
""")
    site.write_rules([{"name": "disk", "playbook": "two-steps.yml"}])
    log = site.out / "steps.log"
    sp = start_serve(site)
    try:
        r = httpx.post(sp.url + "/alertmanager", json=am_payload(am_alert()), headers=AUTH, timeout=10)
        assert r.status_code == 200
        wait_for(lambda: log.exists(), 20, "the first step to start")
        assert stop_serve(sp, signal.SIGTERM) == 0, sp.output()
    finally:
        stop_serve(sp, signal.SIGKILL)
    assert log.read_text().split() == ["first"], "the running step finished; no new step started"
    trail = records(site.root / ".runbook" / "audit.jsonl")
    assert any(r["event"] == "remediation.checkpointed" for r in trail)
    assert trail[-1]["event"] == "serve.stopped" and trail[-1]["clean"] is True
    sp = start_serve(site)
    try:
        wait_for(lambda: log.read_text().split() == ["first", "second"], 20, "the resumed run to finish")
        jobs = httpx.get(sp.url + "/runs", headers=AUTH, timeout=10).json()["runs"]
        wait_for(lambda: httpx.get(sp.url + "/runs", headers=AUTH, timeout=10).json()["runs"][0]["state"] == "succeeded",
                 10, "the job to be recorded")
    finally:
        assert stop_serve(sp) == 0
    assert len(jobs) == 1 and jobs[0]["resume_run_id"]
    started = [r for r in records(site.root / ".runbook" / "audit.jsonl") if r["event"] == "run.started"]
    assert started[-1]["details"]["resumed_from"] == started[0]["run_id"]
    assert main(["audit", "verify", "--audit-log", str(site.root / ".runbook" / "audit.jsonl")]) == 0


def test_a_second_server_on_the_same_queue_is_refused(site, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from runbook.serve.queue import ServerLock

    monkeypatch.setenv("RUNBOOK_SERVE_TOKEN", "a-token-long-enough-123")
    held = ServerLock(site.root / ".runbook" / "serve.db")
    held.acquire()           # what a running server holds
    try:
        assert serve(site, "--listen", "127.0.0.1:0") == 4
        assert "another `runbook serve`" in capsys.readouterr().err
    finally:
        held.release()


def test_the_shipped_sample_rules_validate_and_check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from runbook.inventory import Inventory
    from runbook.serve.models import AMPayload, alerts_from_alertmanager
    from runbook.serve.rules import load_rules
    from runbook.serve.worker import route
    from tests.serve_support import REPO

    sample = REPO / "playbooks" / "serve"
    assert main(["validate", "--strict", str(sample / "rules.yml"), str(sample / "page-oncall.yml")]) == 0
    assert "4 rule(s)" in capsys.readouterr().out
    monkeypatch.setenv("RUNBOOK_DEPLOY_HOOK_SECRET", "a-secret-for-the-test")
    monkeypatch.setenv("RUNBOOK_SERVE_TOKEN", "a-token-long-enough-123")
    assert main(["serve", "--rules", str(sample / "rules.yml"), "-i", str(REPO / "inventory" / "local.yml"), "--check"]) == 0
    [alert] = alerts_from_alertmanager(AMPayload.model_validate(json.loads((sample / "alert-example.json").read_text())))
    routed = route(alert, load_rules(sample / "rules.yml"), Inventory.load(REPO / "inventory" / "local.yml"))
    assert [(j.rule, j.host, j.vars) for j in routed.jobs] == [("disk-full", "localhost", {"threshold_pct": 85})]


def test_sighup_reloads_rules_inventory_and_token_all_or_nothing(site) -> None:
    """`systemctl reload`: SIGHUP reads the rules, inventory and token file again; a file that does not check
    leaves the server on what it had (and says why), and nothing is half-taken."""
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "match": {"alertname": "DiskFull"}}])
    token = site.root / "token"
    token.write_text("first-token-0123456789abcdef\n")
    token.chmod(0o600)
    sp = start_serve(site, "--token-file", str(token))
    first, second = ({"Authorization": f"Bearer {t}-0123456789abcdef"} for t in ("first-token", "second-token"))
    trail = site.root / ".runbook" / "audit.jsonl"

    def send(alert: str, headers: dict[str, str], instance: str = "web01:9100") -> int:
        return httpx.post(sp.url + "/alertmanager", json=am_payload(am_alert(alert, instance)), headers=headers,
                          timeout=10).status_code

    def events(name: str) -> list[dict]:
        return [r for r in records(trail) if r["event"] == name]

    try:
        assert send("MemoryHigh", first) == 200
        wait_for(lambda: any(e.get("alertname") == "MemoryHigh" for e in events("alert.ignored")), 20, "no rule for it")
        site.write_rules([{"name": "disk", "playbook": "fix.yml", "match": {"alertname": "DiskFull"}},
                          {"name": "memory", "playbook": "verify.yml", "match": {"alertname": "MemoryHigh"}}])
        token.write_text("second-token-0123456789abcdef\n")
        sp.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("serve.reloaded"), 20, "the reload")
        assert events("serve.reloaded")[0]["rules_count"] == 2
        assert send("MemoryHigh", first) == 401                      # the old token is gone with the reload
        assert send("MemoryHigh", second, "web02:9100") == 200
        wait_for(lambda: site.tags("web02") == ["verify"], 30, "the new rule's playbook")
        # A broken rules file: refused whole, the server keeps the rules and token it has.
        site.write_rules("rules:\n  - name: disk\n    playbook: nope.yml\n    bogus: 1\n")
        token.write_text("third-token-0123456789abcdef\n")
        sp.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("serve.reload_failed"), 20, "the refused reload")
        assert "rules.yml" in events("serve.reload_failed")[0]["error"]
        assert "reload refused, still serving the previous rules" in sp.output()
        assert send("MemoryHigh", second, "db01:9100") == 200
        wait_for(lambda: site.tags("db01") == ["verify"], 30, "the kept rule's playbook")
        assert sp.proc.poll() is None
    finally:
        assert stop_serve(sp) == 0, sp.output()
    assert main(["audit", "verify", "--audit-log", str(trail)]) == 0
