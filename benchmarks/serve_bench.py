"""`python -m benchmarks.serve_bench`: post 1,000 alerts (90% duplicates, 50 hosts) to `runbook serve` as fast as it can.

Checks (exit 1 when one fails): no accepted alert is lost, and the playbook runs exactly once per
distinct (rule, host) pair however often the alerts are delivered. Reports the accept latency
(time to a durable 2xx) p50/p99 and the throughput. The hosts are local connections and the
playbook is a no-op, so no sshd is needed; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site(root: Path, hosts: int) -> None:
    inv = {"all": {"hosts": {f"node{i:03d}": {"ansible_connection": "local"} for i in range(hosts)}}}
    (root / "inventory.yml").write_text(yaml.safe_dump(inv))
    (root / "noop.yml").write_text("runbook: noop\nhosts: all\nsteps:\n  - name: nothing\n    command: [\"true\"]\n")
    (root / "rules.yml").write_text("rules:\n  - name: node-down\n    match: {alertname: NodeDown}\n    playbook: noop.yml\n")


def _alerts(total: int, hosts: int, duplicates: float, seed: int) -> list[dict[str, Any]]:
    """`total` deliveries of round(total * (1 - duplicates)) distinct alerts spread over the hosts, shuffled."""
    distinct = max(1, round(total * (1 - duplicates)))
    base = []
    for i in range(distinct):
        labels = {"alertname": "NodeDown", "instance": f"node{i % hosts:03d}:9100", "wave": str(i // hosts)}
        fp = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
        base.append({"status": "firing", "labels": labels, "annotations": {}, "fingerprint": fp,
                     "startsAt": f"2026-11-30T10:{i // hosts:02d}:00Z", "endsAt": "0001-01-01T00:00:00Z"})
    deliveries = [base[i % distinct] for i in range(total)]
    random.Random(seed).shuffle(deliveries)
    return deliveries


def _post_all(url: str, deliveries: list[dict[str, Any]], concurrency: int) -> tuple[list[float], int]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    chunks = [deliveries[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[dict[str, Any]]) -> tuple[list[float], int]:
        latencies, errors = [], 0
        # TCP_NODELAY as Go's HTTP client (Alertmanager's) sets it: without it the request body waits
        # for the server's delayed ACK of the headers (~40 ms), which would measure the kernel, not the server.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(timeout=30, transport=transport) as client:
            for a in chunk:
                body = {"version": "4", "groupKey": "bench", "status": "firing", "truncatedAlerts": 0, "alerts": [a]}
                start = time.perf_counter()
                r = client.post(url + "/alertmanager", json=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200
        return latencies, errors

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, chunks))
    return [x for lat, _ in results for x in lat], sum(e for _, e in results)


def _settled(url: str, deadline: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while time.monotonic() < deadline:
        runs = httpx.get(url + "/runs?limit=1000", headers=headers, timeout=30).json()["runs"]
        depth = [ln for ln in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines()
                 if ln.startswith("runbook_serve_queue_depth ")]
        if depth and float(depth[0].split()[1]) == 0 and not any(r["state"] in ("queued", "running") for r in runs):
            return {"runs": runs}
        time.sleep(0.2)
    raise SystemExit("the server did not settle in time")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start a server, post the alerts, wait for every remediation, and check the counts."""
    with tempfile.TemporaryDirectory(prefix="runbook-serve-bench-") as tmp:
        root = Path(tmp)
        _site(root, args.hosts)
        port = _free_port()
        env = {**os.environ, "RUNBOOK_SERVE_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        env.pop("RUNBOOK_AUDIT_LOG", None)
        proc = subprocess.Popen([sys.executable, "-m", "runbook", "serve", "--rules", "rules.yml", "-i", "inventory.yml",
                                 "--listen", f"127.0.0.1:{port}", "-q", "-c", str(args.runs_at_once)],
                                cwd=root, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"runbook serve did not start: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.1)
            deliveries = _alerts(args.alerts, args.hosts, args.duplicates, args.seed)
            start = time.perf_counter()
            latencies, errors = _post_all(url, deliveries, args.concurrency)
            posting = time.perf_counter() - start
            final = _settled(url, time.monotonic() + args.timeout)
            total = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        db = sqlite3.connect(root / ".runbook" / "serve.db")
        stored = {row[0] for row in db.execute("SELECT fingerprint FROM alerts")}
        db.close()
    sent = {a["fingerprint"] for a in deliveries}
    runs = [r for r in final["runs"] if r["state"] in ("succeeded", "failed")]
    pairs = {(a["labels"]["instance"].split(":")[0]) for a in deliveries}
    return {
        "alerts_posted": len(deliveries), "distinct_alerts": len(sent), "hosts": args.hosts, "concurrency": args.concurrency,
        "http_errors": errors, "lost": len(sent - stored),
        "runs": len(runs), "runs_failed": sum(r["state"] == "failed" for r in runs), "distinct_rule_host_pairs": len(pairs),
        "suppressed": sum(r["state"] == "suppressed" for r in final["runs"]),
        "coalesced_alerts": sum(max(0, r["alerts"] - 1) for r in final["runs"]),
        "accept_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "accept_p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "accept_max_ms": round(max(latencies) * 1000, 2),
        "posting_s": round(posting, 3), "alerts_per_s": round(len(deliveries) / posting, 1),
        "until_all_remediated_s": round(total, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its figures and whether every check held."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--alerts", type=int, default=1000)
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--duplicates", type=float, default=0.9, help="share of deliveries that repeat an alert (default 0.9)")
    p.add_argument("--concurrency", type=int, default=8, help="clients posting at once (default 8)")
    p.add_argument("--runs-at-once", type=int, default=4, help="the server's remediation limit (default 4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every remediation")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    figures = run(args)
    checks = {"0 lost": figures["lost"] == 0 and figures["http_errors"] == 0,
              "runs == distinct (rule, host) pairs": figures["runs"] == figures["distinct_rule_host_pairs"]}
    figures["checks"] = checks
    print(f"runbook serve: {figures['alerts_posted']} alerts ({figures['distinct_alerts']} distinct, {figures['hosts']} hosts), "
          f"{figures['concurrency']} clients")
    for key in ("accept_p50_ms", "accept_p99_ms", "accept_max_ms", "alerts_per_s", "posting_s", "until_all_remediated_s",
                "runs", "distinct_rule_host_pairs", "suppressed", "coalesced_alerts", "lost", "http_errors"):
        print(f"  {key:<26} {figures[key]}")
    for name, ok in checks.items():
        print(f"  check: {name:<34} {'ok' if ok else 'FAILED'}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
