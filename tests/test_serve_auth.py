"""The intake's defences: authentication, signatures and replays, size limits, malformed payloads — each recorded."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from runbook.errors import ValidationError
from runbook.serve.auth import load_token, sign, token_matches
from tests.serve_support import AUTH, TOKEN, am_alert, am_payload, live, make_site, records, settle

SECRET = "hook-secret-0123456789"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEPLOY_HOOK_SECRET", SECRET)
    s = make_site(tmp_path)
    s.write_rules([{"name": "disk", "match": {"alertname": "DiskFull"}, "playbook": "fix.yml"},
                   {"name": "deploy", "hook": "deploy", "playbook": "fix.yml", "hosts": "{{ alert.labels.host }}",
                    "vars": {"value": "{{ alert.payload.version | default('-') }}"}},
                   {"name": "b64", "hook": "b64", "playbook": "fix.yml", "hosts": "{{ alert.labels.host }}"},
                   {"name": "plain", "hook": "plain", "playbook": "fix.yml", "hosts": "{{ alert.labels.host }}"}],
                  hooks={"deploy": {"secret": "env:DEPLOY_HOOK_SECRET"},
                         "b64": {"secret": "env:DEPLOY_HOOK_SECRET", "header": "X-Hub-Signature-256", "encoding": "base64",
                                 "prefix": "sha256=", "timestamp_header": None}})
    return s


def signed(body: bytes, *, stamp: float | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = str(int(stamp if stamp is not None else time.time()))
    return {"X-Runbook-Timestamp": ts, "X-Runbook-Signature": sign(secret.encode(), body, ts), "Content-Type": "application/json"}


def rejected(site) -> list[dict]:
    return [r for r in records(site.root / ".runbook" / "audit.jsonl") if r["event"] == "request.rejected"]


# --- tokens -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {TOKEN}", True), (f"bearer   {TOKEN}  ", True), ("Bearer wrong-token-0123456789", False), ("Bearer", False),
    (f"Basic {base64.b64encode(f'alertmanager:{TOKEN}'.encode()).decode()}", True),
    (f"Basic {base64.b64encode(b'alertmanager:nope').decode()}", False), (f"Basic {base64.b64encode(TOKEN.encode()).decode()}", False),
    ("Basic !!!", False), (f"Token {TOKEN}", False), (None, False), ("Bearer tëst", False),
])
def test_token_matches(header: str | None, ok: bool) -> None:
    assert token_matches(header, TOKEN) is ok


def test_load_token_sources_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNBOOK_SERVE_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="no token"):
        load_token(None)
    monkeypatch.setenv("RUNBOOK_SERVE_TOKEN", "short")
    with pytest.raises(ValidationError, match="too short"):
        load_token(None)
    monkeypatch.setenv("RUNBOOK_SERVE_TOKEN", TOKEN)
    assert load_token(None) == (TOKEN, [])
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    token, warnings = load_token(str(f))
    assert token == TOKEN and "readable by other users" in warnings[0]


# --- Alertmanager endpoint ----------------------------------------------------------------------------

def test_unauthenticated_posts_are_refused_recorded_and_nothing_runs(site) -> None:
    with live(site) as (client, server):
        body = am_payload(am_alert())
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": "Basic " + base64.b64encode(b"x:wrong").decode()}):
            r = client.post("/alertmanager", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "credentials" in r.json()["error"]
        assert client.get("/runs").status_code == 401 and client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200
        settle(server)
        assert server.queue.counts()["alerts"] == 0 and site.lines("web01") == []
    assert [r["reason"] for r in rejected(site)][:3] == ["unauthorized"] * 3
    assert TOKEN not in (site.root / ".runbook" / "audit.jsonl").read_text()


def test_oversize_bodies_are_refused_with_413(site) -> None:
    with live(site, max_body=4096) as (client, server):
        big = am_payload(*[am_alert(fingerprint=f"{i:016x}") for i in range(40)])
        r = client.post("/alertmanager", json=big, headers=AUTH)
        assert r.status_code == 413
        def chunks():
            for _ in range(10):
                yield b" " * 1024
        r = client.post("/alertmanager", content=chunks(), headers=AUTH)
        assert r.status_code == 413, "a chunked body without Content-Length is counted as it streams"
        assert server.queue.counts()["alerts"] == 0


@pytest.mark.parametrize(("body", "code", "text"), [
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not JSON"),
    (json.dumps({"version": "3", "alerts": []}).encode(), 422, "version"),
    (json.dumps(am_payload(am_alert(labels={"bad key": "x"}))).encode(), 422, "labels"),
    (json.dumps(am_payload({**am_alert(), "fingerprint": "../../etc/passwd"})).encode(), 422, "fingerprint"),
    (json.dumps(am_payload({**am_alert(), "status": "exploded"})).encode(), 422, "status"),
    (json.dumps(am_payload(am_alert(annotations={"summary": "x" * 5000}))).encode(), 422, "annotations"),
    (json.dumps([1, 2]).encode(), 422, "payload"),
])
def test_malformed_payloads_get_a_reason_and_are_recorded(site, body: bytes, code: int, text: str) -> None:
    with live(site) as (client, server):
        r = client.post("/alertmanager", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == code, r.text
        assert text in json.dumps(r.json())
        assert server.queue.counts()["alerts"] == 0
    assert rejected(site)[-1]["reason"] == ("malformed" if code == 400 else "invalid")


def test_invalid_payload_replies_never_echo_the_input(site) -> None:
    with live(site) as (client, _):
        bad = am_payload({**am_alert(), "startsAt": "sekret-value-123 not a date"})
        r = client.post("/alertmanager", json=bad, headers=AUTH)
        assert r.status_code == 422 and "sekret-value-123" not in r.text
    assert "sekret-value-123" not in (site.root / ".runbook" / "audit.jsonl").read_text()


def test_basic_auth_as_alertmanager_http_config_sends_it(site) -> None:
    with live(site) as (client, server):
        basic = "Basic " + base64.b64encode(f"am:{TOKEN}".encode()).decode()
        r = client.post("/alertmanager", json=am_payload(am_alert()), headers={"Authorization": basic})
        assert r.status_code == 200 and r.json()["accepted"] == 1


# --- generic hooks --------------------------------------------------------------------------------------

def test_signed_hook_runs_once_and_a_replay_inside_the_window_is_deduplicated(site) -> None:
    body = json.dumps({"id": "deploy-42", "labels": {"host": "web02"}, "version": "1.2.3"}).encode()
    with live(site) as (client, server):
        headers = signed(body)
        first = client.post("/hooks/deploy", content=body, headers=headers)
        assert first.status_code == 200 and first.json()["accepted"] == 1
        replay = client.post("/hooks/deploy", content=body, headers=headers)
        assert replay.status_code == 200 and replay.json() == {**replay.json(), "accepted": 0, "duplicates": 1}
        settle(server)
    assert site.lines("web02") and [ln[:2] for ln in site.lines("web02")] == [["fix", "1.2.3"]]


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-Runbook-Signature"}), "missing signature header"),
    (lambda b, h: (b.replace(b"web02", b"web01"), h), "signature does not match"),
    (lambda b, h: (b, {**h, "X-Runbook-Timestamp": str(int(h["X-Runbook-Timestamp"]) + 1)}), "signature does not match"),
    (lambda b, h: (b, {**h, "X-Runbook-Signature": "zz"}), "malformed signature"),
    (lambda b, h: (b, {**h, "X-Runbook-Timestamp": "yesterday"}), "invalid timestamp"),
    (lambda b, h: (b, signed(b, stamp=time.time() - 3600)), "outside the accepted window"),
    (lambda b, h: (b, signed(b, secret="not-the-secret-000")), "signature does not match"),
])
def test_bad_signatures_and_old_replays_are_refused(site, mutate, why: str) -> None:
    body = json.dumps({"id": "deploy-43", "labels": {"host": "web02"}}).encode()
    with live(site) as (client, server):
        b, h = mutate(body, signed(body))
        r = client.post("/hooks/deploy", content=b, headers=h)
        assert r.status_code == 401 and why in r.json()["error"]
        assert client.post("/hooks/deploy", content=b, headers={**h, **AUTH}).status_code == 401, \
            "the server token does not replace a hook's signature"
        assert server.queue.counts()["alerts"] == 0
    assert rejected(site)[-1]["reason"] == "bad_signature"


def test_base64_signature_with_prefix_and_no_timestamp(site) -> None:
    body = json.dumps({"labels": {"host": "web01"}}).encode()
    header = "sha256=" + sign(SECRET.encode(), body, None, "base64")
    with live(site) as (client, _):
        assert client.post("/hooks/b64", content=body, headers={"X-Hub-Signature-256": header}).status_code == 200
        assert client.post("/hooks/b64", content=body + b" ", headers={"X-Hub-Signature-256": header}).status_code == 401


def test_unsigned_hooks_need_the_token_and_unknown_hooks_are_404(site) -> None:
    body = {"labels": {"host": "web01"}}
    with live(site) as (client, _):
        assert client.post("/hooks/plain", json=body).status_code == 401
        assert client.post("/hooks/plain", json=body, headers=AUTH).status_code == 200
        assert client.post("/hooks/nope", json=body).status_code == 401, "no hint that a name exists without auth"
        assert client.post("/hooks/nope", json=body, headers=AUTH).status_code == 404
        assert client.post("/hooks/plain", json=[1], headers=AUTH).status_code == 422
        assert client.post("/hooks/plain", json={"status": "maybe"}, headers=AUTH).status_code == 422


def test_rejections_are_audited_at_a_bounded_rate(site) -> None:
    with live(site) as (client, server):
        for _ in range(70):
            client.post("/alertmanager", json={})
        text = server.metrics.exposition().decode()
    assert 'runbook_serve_requests_rejected_total{reason="unauthorized"} 70.0' in text
    events = [r["event"] for r in records(site.root / ".runbook" / "audit.jsonl")]
    assert events.count("request.rejected") == 60 and events.count("request.rejected.throttled") == 1
