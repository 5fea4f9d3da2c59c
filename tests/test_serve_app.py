"""The server end to end on local-connection hosts: alerts in, real playbook runs out, every safety rule, approvals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runbook.cli import main
from tests.serve_support import AUTH, am_alert, am_payload, live, make_site, records, settle, wait_for


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    return make_site(tmp_path)


def post(client, *alerts) -> dict:
    r = client.post("/alertmanager", json=am_payload(*alerts), headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def audit(site) -> list[dict]:
    return records(site.root / ".runbook" / "audit.jsonl")


def test_each_alert_runs_once_per_host_despite_repeats_and_the_trail_links_it(site) -> None:
    site.write_rules([{"name": "disk", "match": {"alertname": "DiskFull", "severity": "~critical|page"},
                       "playbook": "fix.yml", "vars": {"value": "{{ alert.annotations.threshold | default(85) }}"}}])
    web01 = am_alert(instance="web01:9100", annotations={"threshold": "90"})
    web02 = am_alert(instance="10.0.0.2:9100")            # by ansible_host
    with live(site) as (client, server):
        first = post(client, web01, web02)
        assert first["accepted"] == 2
        for _ in range(5):                                  # Alertmanager's repeats and its HA peer
            again = post(client, web01, web02)
            assert again["accepted"] == 0 and again["duplicates"] == 2
        settle(server)
        runs = client.get("/runs", headers=AUTH).json()["runs"]
        metrics = client.get("/metrics", headers=AUTH).text
    assert [ln[:2] for ln in site.lines("web01")] == [["fix", "90"]]
    assert [ln[:2] for ln in site.lines("web02")] == [["fix", "85"]]
    assert sorted((r["host"], r["state"]) for r in runs) == [("web01", "succeeded"), ("web02", "succeeded")]
    assert 'runbook_serve_alerts_received_total{source="alertmanager"} 2.0' in metrics
    assert 'runbook_serve_alerts_deduplicated_total{source="alertmanager"} 10.0' in metrics
    assert 'runbook_serve_runs_succeeded_total{kind="remediate",rule="disk"} 2.0' in metrics
    trail = audit(site)
    started = {r["hosts"][0]: r for r in trail if r["event"] == "run.started"}
    assert started["web01"]["details"]["serve"]["alert_fingerprint"] == web01["fingerprint"]
    assert started["web01"]["details"]["serve"]["rule"] == "disk"
    finished = [r for r in trail if r["event"] == "remediation.finished" and r["host"] == "web01"]
    assert finished[0]["run"] == started["web01"]["run_id"] and finished[0]["state"] == "succeeded"
    assert main(["audit", "verify", "--audit-log", str(site.root / ".runbook" / "audit.jsonl")]) == 0


def test_run_detail_by_id_or_engine_run_id(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml"}])
    with live(site) as (client, server):
        post(client, am_alert())
        settle(server)
        [run] = client.get("/runs", headers=AUTH).json()["runs"]
        by_id = client.get(f"/runs/{run['id']}", headers=AUTH).json()
        by_run = client.get(f"/runs/{run['run_id']}", headers=AUTH).json()
        assert by_id["run"] == by_run["run"] and by_id["alerts"][0]["labels"]["alertname"] == "DiskFull"
        assert by_id["run"]["results"][0]["status"] == "changed"
        assert client.get("/runs/999", headers=AUTH).status_code == 404
        assert client.get("/runs?state=failed", headers=AUTH).json()["runs"] == []


def test_resolved_runs_the_resolved_playbook(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "on_resolved": "verify.yml"}])
    with live(site) as (client, server):
        post(client, am_alert())
        settle(server)
        post(client, am_alert(status="resolved"))
        post(client, am_alert(status="resolved"))
        settle(server)
    assert site.tags("web01") == ["fix", "verify"]


def test_a_second_alert_inside_the_cooldown_is_suppressed_and_recorded(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "cooldown": "1h"}])
    with live(site) as (client, server):
        post(client, am_alert(starts="2026-11-30T10:00:00Z"))
        settle(server)
        post(client, am_alert(starts="2026-11-30T10:20:00Z"))     # it flapped: a new alert
        settle(server)
        runs = client.get("/runs", headers=AUTH).json()["runs"]
    assert site.tags("web01") == ["fix"]
    assert [r["state"] for r in runs] == ["suppressed", "succeeded"]
    assert runs[0]["reason"].startswith("cooldown: the last run of `disk` on web01 ended")
    assert any(r["event"] == "remediation.suppressed" for r in audit(site))


def test_the_breaker_opens_after_its_limit_and_escalates_once(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "cooldown": 0,
                       "breaker": {"max_runs": 2, "per": "1h", "escalate": "escalate.yml"}}])
    with live(site) as (client, server):
        for minute in range(5):
            post(client, am_alert(starts=f"2026-11-30T10:0{minute}:00Z"))
            settle(server)
        metrics = client.get("/metrics", headers=AUTH).text
        runs = client.get("/runs", headers=AUTH).json()["runs"]
    assert site.tags("web01") == ["fix", "fix", "escalate"]
    assert [r["state"] for r in reversed(runs)] == ["succeeded", "succeeded", "suppressed", "succeeded", "suppressed",
                                                    "suppressed"]
    assert 'runbook_serve_breaker_open{host="web01",rule="disk"} 1.0' in metrics
    assert 'runbook_serve_remediations_suppressed_total{reason="breaker",rule="disk"} 3.0' in metrics
    assert [r["event"] for r in audit(site)].count("breaker.opened") == 1


def test_never_two_remediations_on_one_host_at_once(site) -> None:
    site.playbook("other")
    site.write_rules([{"name": "a", "playbook": "fix.yml", "vars": {"hold": "0.4"}},
                      {"name": "b", "playbook": "other.yml", "vars": {"hold": "0.4"}}])
    with live(site, concurrency=4) as (client, server):
        post(client, am_alert(), am_alert(instance="web02"))
        settle(server)
    for host in ("web01", "web02"):
        spans = sorted((float(ln[3]), float(ln[5])) for ln in site.lines(host))
        assert len(spans) == 2 and spans[0][1] <= spans[1][0], f"{host}: runs overlapped: {spans}"
    # ...while different hosts did run at the same time (the global limit is 4).
    starts = sorted(float(ln[3]) for h in ("web01", "web02") for ln in site.lines(h))
    assert starts[1] - starts[0] < 0.4


def test_the_global_concurrency_limit(site) -> None:
    site.write_rules([{"name": "a", "playbook": "fix.yml", "vars": {"hold": "0.3"}}])
    with live(site, concurrency=1) as (client, server):
        post(client, am_alert(), am_alert(instance="web02"), am_alert(instance="db01"))
        settle(server)
    spans = sorted((float(ln[3]), float(ln[5])) for h in ("web01", "web02", "db01") for ln in site.lines(h))
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_queued_alerts_for_a_busy_host_are_coalesced(site) -> None:
    site.playbook("slow")
    site.write_rules([{"name": "slow", "match": {"alertname": "Slow"}, "playbook": "slow.yml", "vars": {"hold": "0.6"}},
                      {"name": "disk", "match": {"alertname": "DiskFull"}, "playbook": "fix.yml", "cooldown": 0}])
    with live(site) as (client, server):
        post(client, am_alert("Slow"))
        wait_for(lambda: server.queue.counts().get("running"), 10, "the slow run to start")
        for minute in range(3):     # three distinct alerts while web01 is busy: one remediation
            post(client, am_alert(starts=f"2026-11-30T10:0{minute}:00Z"))
        settle(server)
        runs = client.get("/runs", headers=AUTH).json()["runs"]
    assert site.tags("web01") == ["slow", "fix"]
    disk = [r for r in runs if r["rule"] == "disk"]
    assert len(disk) == 1 and disk[0]["alerts"] == 3


def test_unknown_hosts_and_unmatched_alerts_are_recorded_and_ignored(site) -> None:
    site.write_rules([{"name": "disk", "match": {"alertname": "DiskFull"}, "playbook": "fix.yml"}])
    with live(site) as (client, server):
        post(client, am_alert(instance="elsewhere:9100"), am_alert("Other"), am_alert(instance="all"),
             am_alert(instance="web*"))
        settle(server)
        metrics = client.get("/metrics", headers=AUTH).text
    assert not any(site.lines(h) for h in ("web01", "web02", "db01"))
    ignored = [r for r in audit(site) if r["event"] == "alert.ignored"]
    assert len(ignored) == 4
    assert 'runbook_serve_alerts_ignored_total{reason="unknown_host"} 2.0' in metrics
    assert 'runbook_serve_alerts_ignored_total{reason="invalid_host"} 1.0' in metrics
    assert 'runbook_serve_alerts_ignored_total{reason="no_rule"} 1.0' in metrics


def test_payload_text_reaches_the_playbook_as_data_only(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "vars": {"value": "{{ alert.annotations.summary }}"}}])
    hostile = "x';touch${IFS}pwned;'{{7*7}}$(touch${IFS}pwned2)`touch${IFS}pwned3`"
    with live(site) as (client, server):
        post(client, am_alert(annotations={"summary": hostile}))
        settle(server)
    assert site.lines("web01")[0][1] == hostile
    assert not any((site.root / name).exists() for name in ("pwned", "pwned2", "pwned3"))


def test_outside_the_window_suppress_or_defer(site) -> None:
    window = "window: {cron: \"0 3 29 2 *\", duration: 1m, timezone: UTC}\n"    # 29 February, 03:00
    site.playbook("closed", window)
    site.write_rules([{"name": "s", "match": {"alertname": "S"}, "playbook": "closed.yml", "outside_window": "suppress"},
                      {"name": "d", "match": {"alertname": "D"}, "playbook": "closed.yml"}])
    with live(site) as (client, server):
        post(client, am_alert("S"), am_alert("D", instance="web02"))
        settle(server)
        runs = {r["rule"]: r for r in client.get("/runs", headers=AUTH).json()["runs"]}
    assert runs["s"]["state"] == "suppressed" and "outside the maintenance window" in runs["s"]["reason"]
    assert runs["d"]["state"] == "queued" and runs["d"]["not_before"] > runs["d"]["created_at"] + 3600
    assert site.lines("web01") == [] and site.lines("web02") == []


def test_plan_mode_waits_for_approval_over_http(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "mode": "plan"}])
    with live(site) as (client, server):
        post(client, am_alert(), am_alert(instance="web02"))
        settle(server)
        pending = client.get("/approvals", headers=AUTH).json()["approvals"]
        assert sorted(p["host"] for p in pending) == ["web01", "web02"] and site.lines("web01") == []
        ids = {p["host"]: p["id"] for p in pending}
        detail = client.get(f"/runs/{ids['web01']}", headers=AUTH).json()
        assert detail["plan"]["predictions"][0]["prediction"] in ("change", "unknown")
        ok = client.post(f"/approvals/{ids['web01']}", json={"decision": "approve", "by": "alice"}, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["run"]["decided_by"] == "http:alice"
        no = client.post(f"/approvals/{ids['web02']}", json={"decision": "reject", "reason": "not now"}, headers=AUTH)
        assert no.status_code == 200
        assert client.post(f"/approvals/{ids['web02']}", json={"decision": "approve"}, headers=AUTH).status_code == 404
        assert client.post("/approvals/1", json={"decision": "maybe"}, headers=AUTH).status_code == 422
        assert client.post("/approvals/1", json={"decision": "approve"}).status_code == 401
        settle(server)
        runs = {r["host"]: r for r in client.get("/runs", headers=AUTH).json()["runs"]}
    assert site.tags("web01") == ["fix"] and site.lines("web02") == []
    assert runs["web01"]["state"] == "succeeded" and runs["web02"]["state"] == "rejected"
    applied = [r for r in audit(site) if r["event"] == "run.started" and r["mode"] == "apply"]
    assert len(applied) == 1 and applied[0]["operator"] == "http:alice" and applied[0]["plan_hash"]


def test_plan_mode_approved_from_the_cli(site, capsys: pytest.CaptureFixture[str]) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "mode": "plan"}])
    with live(site) as (client, server):
        post(client, am_alert())
        settle(server)
        assert main(["approvals", "list"]) == 0
        out = capsys.readouterr().out
        job_id = int(out.split()[0])
        assert "disk  on web01" in out
        assert main(["approvals", "show", str(job_id)]) == 0
        assert "fix.yml" not in capsys.readouterr().err
        assert main(["approvals", "approve", str(job_id), "--reason", "ticket 42"]) == 0
        assert main(["approvals", "approve", str(job_id)]) == 4, "decided once"
        wait_for(lambda: site.lines("web01"), 10, "the approved plan to be applied")
        settle(server)
    grants = [r for r in audit(site) if r["event"] == "approval.granted"]
    assert grants and grants[0]["via"] == "cli" and grants[0]["reason"] == "ticket 42"


def test_a_drifted_plan_is_not_applied(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml", "mode": "plan"}])
    with live(site) as (client, server):
        post(client, am_alert())
        settle(server)
        [pending] = client.get("/approvals", headers=AUTH).json()["approvals"]
        (site.root / "fix.yml").write_text((site.root / "fix.yml").read_text() + "\n# edited after review\n")
        client.post(f"/approvals/{pending['id']}", json={"decision": "approve"}, headers=AUTH)
        settle(server)
        run = client.get(f"/runs/{pending['id']}", headers=AUTH).json()["run"]
    assert run["state"] == "failed" and "changed since the plan" in run["reason"]
    assert site.lines("web01") == []


def test_accepted_alerts_are_run_by_the_next_server(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml"}])
    from runbook.serve.queue import Queue
    from runbook.serve.models import AMPayload, alerts_from_alertmanager

    # What a killed server leaves: an accepted alert nobody dispatched yet.
    q = Queue(site.root / ".runbook" / "serve.db")
    q.accept(alerts_from_alertmanager(AMPayload.model_validate(am_payload(am_alert()))), "before-the-crash")
    q.close()
    with live(site) as (_, server):
        settle(server)
    assert site.tags("web01") == ["fix"]


def test_generic_hook_payload_fields_reach_rule_templates(site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.write_rules([{"name": "deploy", "hook": "deploy", "playbook": "fix.yml", "hosts": "{{ alert.payload.target }}",
                       "vars": {"value": "{{ alert.payload.release }}"}}])
    with live(site) as (client, server):
        r = client.post("/hooks/deploy", json={"target": "db01", "release": "v7"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert client.post("/hooks/deploy", json={"target": "db01", "release": "v7"}, headers=AUTH).json()["duplicates"] == 1
        settle(server)
    assert [ln[:2] for ln in site.lines("db01")] == [["fix", "v7"]]


def test_metrics_and_health(site) -> None:
    site.write_rules([{"name": "disk", "playbook": "fix.yml"}])
    with live(site) as (client, server):
        assert client.get("/healthz").json()["status"] == "ok"
        text = client.get("/metrics", headers=AUTH).text
        for name in ("runbook_serve_alerts_received_total", "runbook_serve_alerts_deduplicated_total",
                     "runbook_serve_alerts_matched_total", "runbook_serve_runs_started_total",
                     "runbook_serve_runs_succeeded_total", "runbook_serve_runs_failed_total", "runbook_serve_queue_depth",
                     "runbook_serve_breaker_open", "runbook_serve_accept_seconds"):
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert json.loads(client.get("/runs", headers=AUTH).text)["runs"] == []
