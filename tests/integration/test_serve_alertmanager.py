"""`runbook serve` behind a real Prometheus Alertmanager, remediating real sshd test hosts.

Alertmanager runs as its own process on a free loopback port, with its own config and data
directory, and a webhook receiver that posts to `runbook serve` with a bearer token; its group and
repeat intervals are short so that it resends quickly. Alerts are pushed into its API.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_support import (AUTH, TOKEN, Site, am_alert, am_payload, free_port, records, start_serve, stop_serve,
                                 wait_for)
from tests.sshd import SSHHost, write_inventory

pytestmark = pytest.mark.ssh

REMOTE = """\
runbook: {tag}
hosts: all
vars: {{tag: {tag}, value: "-", hold: "0"}}
steps:
  - name: wait
    shell: sleep {{{{ hold | quote }}}}
  - name: record
    shell: echo {{{{ tag | quote }}}} {{{{ value | quote }}}} >> ~/remediations.log
"""


def alertmanager_binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class Alertmanager:
    """One Alertmanager process of this test (never any other)."""

    def __init__(self, root: Path, webhook: str):
        binary = alertmanager_binary()
        if binary is None:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("prometheus-alertmanager is not installed; CI=true forbids skipping (.ci/run installs it)")
            pytest.skip("prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "route": {"receiver": "runbook", "group_by": ["alertname", "instance"], "group_wait": "100ms",
                      "group_interval": "500ms", "repeat_interval": "1s"},
            "receivers": [{"name": "runbook", "webhook_configs": [{
                "url": webhook, "send_resolved": True,
                "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}}}]}],
        }
        (root / "am").mkdir()
        (root / "am" / "alertmanager.yml").write_text(yaml.safe_dump(config))
        self.log = root / "am" / "alertmanager.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={root / 'am' / 'alertmanager.yml'}", f"--storage.path={root / 'am' / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait_for(self._ready, 30, "Alertmanager to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"alertmanager exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def push(self, *alerts: dict) -> None:
        """POST /api/v2/alerts, as Prometheus does."""
        r = httpx.post(self.url + "/api/v2/alerts", json=list(alerts), timeout=5)
        assert r.status_code == 200, r.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def alert(name: str, host: str, starts: float, ends: float | None = None, **labels: str) -> dict:
    out = {"labels": {"alertname": name, "instance": f"{host}:9100", "severity": "critical", **labels},
           "annotations": {"summary": f"{name} on {host}"}, "startsAt": iso(starts), "generatorURL": "http://prom/graph"}
    if ends is not None:
        out["endsAt"] = iso(ends)
    return out


def remote_log(host: SSHHost) -> list[str]:
    path = host.home / "remediations.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


@pytest.fixture
def setup(tmp_path: Path, clean_ssh_hosts: list[SSHHost], known_hosts: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Site, Alertmanager, list[SSHHost], list[str]]]:
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    inventory = write_inventory(tmp_path / "inventory.yml", clean_ssh_hosts)
    (tmp_path / "out").mkdir()
    site = Site(tmp_path, tmp_path / "out", inventory)
    for tag in ("fix", "verify", "escalate", "slow"):
        (tmp_path / f"{tag}.yml").write_text(REMOTE.format(tag=tag))
    site.write_rules([
        {"name": "disk-full", "match": {"alertname": "DiskFull", "severity": "~critical|page"}, "playbook": "fix.yml",
         "vars": {"value": "{{ alert.annotations.summary }}"}, "cooldown": "60s", "on_resolved": "verify.yml"},
        {"name": "service-down", "match": {"alertname": "ServiceDown"}, "playbook": "fix.yml", "cooldown": 0,
         "breaker": {"max_runs": 2, "per": "1h", "escalate": "escalate.yml"}},
        {"name": "crash", "match": {"alertname": "Crash"}, "playbook": "slow.yml", "vars": {"hold": "1"}},
    ])
    port = free_port()
    am = Alertmanager(tmp_path, f"http://127.0.0.1:{port}/alertmanager")
    extra = ["--known-hosts", str(known_hosts), "--listen", f"127.0.0.1:{port}"]
    try:
        yield site, am, clean_ssh_hosts, extra
    finally:
        am.stop()


def runs(url: str) -> list[dict]:
    return httpx.get(url + "/runs", headers=AUTH, timeout=10).json()["runs"]


def test_alertmanager_to_remediation_end_to_end(setup) -> None:
    site, am, hosts, extra = setup
    h0, h1, h2 = hosts[:3]
    sp = start_serve(site, *extra, port=int(extra[-1].rsplit(":", 1)[1]))
    try:
        _fires_once_per_host_despite_repeats(sp.url, am, h0, h1)
        _resolved_runs_the_resolved_playbook(sp.url, am, h0)
        _second_alert_inside_the_cooldown_is_suppressed(sp.url, am, h0)
        _breaker_opens_and_escalates_once(sp.url, am, h2)
        _unauthenticated_post_is_refused(sp.url)
        _killed_after_accepting_runs_after_restart(site, sp, extra, h1)
    finally:
        stop_serve(sp, signal.SIGKILL)
    trail = records(site.root / ".runbook" / "audit.jsonl")
    assert any(r["event"] == "run.started" and r["details"]["serve"]["rule"] == "disk-full" for r in trail)


def _fires_once_per_host_despite_repeats(url: str, am: Alertmanager, h0: SSHHost, h1: SSHHost) -> None:
    now = time.time()
    am.push(alert("DiskFull", h0.name, now - 5), alert("DiskFull", h1.name, now - 5))
    wait_for(lambda: remote_log(h0) and remote_log(h1), 30, "the remediation on h0 and h1")

    def repeated() -> bool:
        disk = [r for r in runs(url) if r["rule"] == "disk-full"]
        details = [httpx.get(f"{url}/runs/{r['id']}", headers=AUTH, timeout=10).json() for r in disk]
        return len(details) == 2 and all(d["alerts"][0]["deliveries"] >= 3 for d in details)

    wait_for(repeated, 30, "Alertmanager to resend the alerts twice more")
    assert remote_log(h0) == [f"fix DiskFull on {h0.name}"] and remote_log(h1) == [f"fix DiskFull on {h1.name}"]


def _resolved_runs_the_resolved_playbook(url: str, am: Alertmanager, h0: SSHHost) -> None:
    [first] = [r for r in runs(url) if r["rule"] == "disk-full" and r["host"] == h0.name]
    detail = httpx.get(f"{url}/runs/{first['id']}", headers=AUTH, timeout=10).json()
    starts = datetime.fromisoformat(detail["alerts"][0]["starts_at"].replace("Z", "+00:00")).timestamp()
    am.push(alert("DiskFull", h0.name, starts, ends=time.time() - 1))
    wait_for(lambda: len(remote_log(h0)) == 2, 30, "the resolved playbook on h0")
    assert remote_log(h0)[1] == f"verify DiskFull on {h0.name}"


def _second_alert_inside_the_cooldown_is_suppressed(url: str, am: Alertmanager, h0: SSHHost) -> None:
    am.push(alert("DiskFull", h0.name, time.time() - 1))       # it flapped back: a new alert, same host
    wait_for(lambda: any(r["state"] == "suppressed" and r["host"] == h0.name for r in runs(url)), 30,
             "the second alert to be suppressed by the cooldown")
    suppressed = [r for r in runs(url) if r["state"] == "suppressed" and r["host"] == h0.name]
    assert suppressed[0]["reason"].startswith("cooldown:")
    assert len(remote_log(h0)) == 2


def _breaker_opens_and_escalates_once(url: str, am: Alertmanager, h2: SSHHost) -> None:
    def handled(lines: int, jobs: int) -> bool:
        mine = [r for r in runs(url) if r["rule"] == "service-down"]
        return len(remote_log(h2)) == lines and len(mine) >= jobs and all(r["state"] not in ("queued", "running") for r in mine)

    now = time.time()
    for attempt in range(1, 5):
        # Distinct alerts (a label differs) for the same host: each would remediate again.
        am.push(alert("ServiceDown", h2.name, now - 10, attempt=str(attempt)))
        escalated = 1 if attempt >= 3 else 0
        wait_for(lambda a=attempt, e=escalated: handled(min(a, 2) + e, a + e), 30, f"attempt {attempt} to be handled")
    assert [line.split()[0] for line in remote_log(h2)] == ["fix", "fix", "escalate"]
    states = [r["state"] for r in reversed(runs(url)) if r["rule"] == "service-down"]
    assert states == ["succeeded", "succeeded", "suppressed", "succeeded", "suppressed"]
    metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    assert f'runbook_serve_breaker_open{{host="{h2.name}",rule="service-down"}} 1.0' in metrics


def _unauthenticated_post_is_refused(url: str) -> None:
    before = len(runs(url))
    body = am_payload(am_alert("DiskFull", "h1:9100", fingerprint="beefbeefbeefbeef"))
    assert httpx.post(url + "/alertmanager", json=body, timeout=10).status_code == 401
    assert httpx.post(url + "/alertmanager", json=body, headers={"Authorization": "Bearer not-the-token-123456"},
                      timeout=10).status_code == 401
    time.sleep(0.5)
    assert len(runs(url)) == before


def _killed_after_accepting_runs_after_restart(site: Site, sp, extra: list[str], h1: SSHHost) -> None:
    before = remote_log(h1)
    body = am_payload(am_alert("Crash", f"{h1.name}:9100", fingerprint="c0ffeec0ffeec0ff"))
    r = httpx.post(sp.url + "/alertmanager", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    os.kill(sp.proc.pid, signal.SIGKILL)           # after the 2xx, before the remediation could finish
    sp.proc.wait(timeout=10)
    assert remote_log(h1) == before, "the slow remediation cannot have finished yet"
    restarted = start_serve(site, *extra, port=sp.port)
    sp.proc = restarted.proc
    wait_for(lambda: len(remote_log(h1)) == len(before) + 1, 30, "the accepted alert to run after the restart")
    wait_for(lambda: any(r["rule"] == "crash" and r["state"] == "succeeded" for r in runs(sp.url)), 10,
             "the crash job to be recorded")
    assert remote_log(h1)[-1] == "slow -"
    assert stop_serve(restarted) == 0
