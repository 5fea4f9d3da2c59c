"""Helpers for the `runbook serve` tests: local-connection hosts, recording playbooks, payloads, a live server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO, cli_env

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# A playbook that appends one line per run to OUT/HOST.log: "<tag> <alert value> start <t> end <t>".
RECORD = """\
runbook: {name}
hosts: all
vars: {{out: {out}, tag: {name}, value: "-", hold: "0"}}
steps:
  - name: record
    shell: >-
      s=$(date +%s.%N); sleep {{{{ hold | quote }}}};
      echo {{{{ tag | quote }}}} {{{{ value | quote }}}} start "$s" end "$(date +%s.%N)" >> {{{{ out | quote }}}}/{{{{ host.name | quote }}}}.log
"""


@dataclass
class Site:
    """A directory with an inventory of local hosts, recording playbooks and a rules file."""

    root: Path
    out: Path
    inventory: Path

    @property
    def rules(self) -> Path:
        """The rules file."""
        return self.root / "rules.yml"

    def playbook(self, name: str, extra: str = "") -> Path:
        """Write a recording playbook NAME.yml (plus extra top-level YAML, e.g. a window)."""
        path = self.root / f"{name}.yml"
        path.write_text(RECORD.format(name=name, out=json.dumps(str(self.out))) + extra)
        return path

    def write_rules(self, rules: list[dict[str, Any]] | str, **top: Any) -> Path:
        """Write rules.yml from data (or text)."""
        self.rules.write_text(rules if isinstance(rules, str) else yaml.safe_dump({"rules": rules, **top}, sort_keys=False))
        return self.rules

    def lines(self, host: str) -> list[list[str]]:
        """The recorded runs on a host, each split into words."""
        path = self.out / f"{host}.log"
        return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []

    def tags(self, host: str) -> list[str]:
        """Which playbooks ran on a host, in order."""
        return [ln[0] for ln in self.lines(host)]


def make_site(root: Path, hosts: tuple[str, ...] = ("web01", "web02", "db01")) -> Site:
    """Local-connection hosts (no SSH): each gets ansible_host 10.0.0.N so address mapping can be tested."""
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    inv = {"all": {"children": {"web": {"hosts": {h: {"ansible_connection": "local", "ansible_host": f"10.0.0.{i + 1}"}
                                                  for i, h in enumerate(hosts)}}}}}
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inv))
    site = Site(root, out, path)
    for name in ("fix", "verify", "escalate"):
        site.playbook(name)
    return site


def am_alert(name: str = "DiskFull", instance: str = "web01:9100", *, status: str = "firing", fingerprint: str | None = None,
             starts: str = "2026-11-30T10:00:00Z", labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """One alert as Alertmanager sends it."""
    labels = {"alertname": name, "instance": instance, "severity": "critical", **(labels or {})}
    fp = fingerprint or hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    return {"status": status, "labels": labels, "annotations": annotations or {}, "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-30T10:05:00Z",
            "generatorURL": "http://prometheus.example/graph", "fingerprint": fp}


def am_payload(*alerts: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """An Alertmanager webhook notification (version 4) holding the alerts."""
    status = status or ("firing" if any(a["status"] == "firing" for a in alerts) else "resolved")
    return {"version": "4", "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0, "status": status,
            "receiver": "runbook", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager.example", "alerts": list(alerts)}


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until the predicate is truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def records(path: Path) -> list[dict[str, Any]]:
    """Every audit record."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


@contextmanager
def live(site: Site, *, token: str | None = TOKEN, concurrency: int | None = None, max_body: int = 1024 * 1024,
         hooks: dict[str, Any] | None = None) -> Iterator[tuple[Any, Any]]:
    """An in-process server (real queue, worker and engine) behind Starlette's test client."""
    with warnings.catch_warnings():
        # Starlette's test client now prefers httpx2; httpx (the declared test dependency) still works.
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from runbook.serve import bridge
    from runbook.serve.app import ServeConfig, Server, create_app
    from runbook.serve.auth import hook_auth
    from runbook.serve.rules import load_rules

    rules = load_rules(site.rules)
    config = ServeConfig(rules, bridge.load_inventory([str(site.inventory)]), site.root / ".runbook" / "serve.db",
                         site.root / ".runbook" / "audit.jsonl", token, hooks if hooks is not None else hook_auth(rules),
                         max_body=max_body, concurrency=concurrency, quiet=True, poll=0.1)
    server = Server(config)
    with TestClient(create_app(server)) as client:
        yield client, server


def settle(server: Any, timeout: float = 30.0) -> None:
    """Wait until the worker has nothing running and nothing due."""
    time.sleep(0.15)
    wait_for(server.worker.idle, timeout, "the worker to go idle")


# --- a `runbook serve` subprocess ---------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeProcess:
    """A running `runbook serve` subprocess."""

    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What it wrote to stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_serve(site: Site, *extra: str, port: int | None = None, env: dict[str, str] | None = None,
                inventory: Path | None = None) -> ServeProcess:
    """Start `runbook serve` in the site's directory and wait for /healthz."""
    import httpx

    port = port or free_port()
    log = site.root / f"serve-{port}-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "runbook", "serve", "--rules", str(site.rules), "-i", str(inventory or site.inventory),
            "--listen", f"127.0.0.1:{port}", *extra]
    with log.open("w") as err:
        proc = subprocess.Popen(argv, cwd=site.root, stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True,
                                env=cli_env(RUNBOOK_SERVE_TOKEN=TOKEN, **(env or {})), start_new_session=True)
    sp = ServeProcess(proc, port, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"runbook serve exited {proc.returncode}:\n{sp.output()}")
        try:
            return httpx.get(sp.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "runbook serve to answer /healthz")
    return sp


def stop_serve(sp: ServeProcess, sig: int = 15, timeout: float = 60) -> int:
    """Signal the server (its own process only) and wait for it to exit."""
    if sp.proc.poll() is None:
        os.kill(sp.proc.pid, sig)
    return sp.proc.wait(timeout=timeout)


__all__ = ["AUTH", "REPO", "TOKEN", "Site", "am_alert", "am_payload", "live", "make_site", "records", "settle",
           "start_serve", "stop_serve", "wait_for"]
