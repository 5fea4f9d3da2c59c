"""The `runbook serve` and `runbook approvals` commands (the server loads only when they run)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from runbook.errors import EXIT_INVALID, Location, RunbookError, ValidationError

DEFAULT_DB = ".runbook/serve.db"
DEFAULT_LISTEN = "127.0.0.1:9095"


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (loopback) into a host and a port."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError(f"--listen {text!r}: expected HOST:PORT", hint=f"for example --listen {DEFAULT_LISTEN}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a port in use is a clear error rather than a server log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValidationError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              hint="choose another --listen address or stop what uses the port") from None
    # Accepted connections inherit this; uvicorn re-wraps a given socket in a way that skips asyncio's own
    # TCP_NODELAY, and without it every reply waits ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _audit_path(audit_log: str | None) -> Path:
    from runbook.audit import default_audit_path

    return Path(audit_log) if audit_log else default_audit_path(None)


def _load(rules_path: str, inventory: tuple[str, ...], token_file: str | None, insecure: bool) -> dict[str, Any]:
    """Everything the server checks before it starts; raises a located error for the first file that is wrong."""
    from runbook.serve import bridge
    from runbook.serve.auth import hook_auth, load_token
    from runbook.serve.rules import RulesError, load_rules, validate_rules_file

    report = validate_rules_file(rules_path)
    for p in report.warnings:
        _echo_err(p.render())
    if report.errors:
        raise RulesError(report.problems)
    rules = load_rules(rules_path)
    inv = bridge.load_inventory(list(inventory) or None)
    for w in inv.warnings:
        _echo_err(w.render())
    token, notes = (None, []) if insecure else load_token(token_file)
    for note in notes:
        _echo_err(f"warning: {note}")
    return {"rules": rules, "inventory": inv, "token": token, "hooks": hook_auth(rules)}


@click.command()
@click.option("--rules", "rules_path", required=True, type=click.Path(dir_okay=False), help="The rules file (rules.yml).")
@click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory file, directory or `a,b,` list (repeatable).")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to listen on.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the token (default: $RUNBOOK_SERVE_TOKEN).")
@click.option("--insecure-no-auth", is_flag=True, help="Accept requests without credentials (loopback addresses only).")
@click.option("--db", default=DEFAULT_DB, show_default=True, type=click.Path(dir_okay=False), help="The durable queue (SQLite).")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG",
              help="Audit trail of the server and its runs (default: ./.runbook/audit.jsonl).")
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), help="Remediations at once (default: the rules file's, 4).")
@click.option("--max-body", type=click.IntRange(1024, 64 * 1024 * 1024), default=1024 * 1024, show_default=True,
              help="Largest request body in bytes.")
@click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]))
@click.option("--known-hosts", type=click.Path(dir_okay=False))
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve HTTPS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The certificate's private key (PEM).")
@click.option("--shutdown-timeout", type=float, default=300.0, show_default=True,
              help="On SIGTERM, seconds to wait for running remediations to finish or checkpoint.")
@click.option("--check", is_flag=True, help="Validate the rules, their playbooks, the inventory and the credentials, then exit.")
@click.option("-q", "--quiet", is_flag=True, help="No event lines on stderr (the audit trail still gets every one).")
def serve(rules_path: str, inventory: tuple[str, ...], listen: str, token_file: str | None, insecure_no_auth: bool,
          db: str, audit_log: str | None, concurrency: int | None, max_body: int, host_key_checking: str | None,
          known_hosts: str | None, tls_cert: str | None, tls_key: str | None, shutdown_timeout: float, check: bool,
          quiet: bool) -> None:
    """Alert-driven remediation: turn Alertmanager alerts and signed webhooks into safe, audited playbook runs."""
    host, port = parse_listen(listen)
    if insecure_no_auth and not is_loopback(host):
        raise ValidationError(f"--insecure-no-auth on {host}: anyone who can reach it could run remediations",
                              hint="listen on 127.0.0.1 or give a token (--token-file or RUNBOOK_SERVE_TOKEN)")
    if bool(tls_cert) != bool(tls_key):
        raise ValidationError("--tls-cert and --tls-key go together")
    loaded = _load(rules_path, inventory, token_file, insecure_no_auth)
    rules, inv = loaded["rules"], loaded["inventory"]
    if check:
        click.echo(f"{rules_path}: ok — {len(rules.rules)} rule(s): {', '.join(r.name for r in rules.rules)}")
        click.echo(f"inventory: ok — {len(inv.hosts)} host(s) from {inv.source}")
        click.echo("auth: " + ("token" if loaded["token"] else "none (--insecure-no-auth)")
                   + (f"; signed hooks: {', '.join(sorted(loaded['hooks']))}" if loaded["hooks"] else ""))
        return
    sys.exit(_run_server(loaded, host, port, db, audit_log, concurrency, max_body, host_key_checking, known_hosts,
                         tls_cert, tls_key, shutdown_timeout, quiet,
                         reload=lambda: _load(rules_path, inventory, token_file, insecure_no_auth)))


def _run_server(loaded: dict[str, Any], host: str, port: int, db: str, audit_log: str | None, concurrency: int | None,
                max_body: int, host_key_checking: str | None, known_hosts: str | None, tls_cert: str | None,
                tls_key: str | None, shutdown_timeout: float, quiet: bool,
                reload: Callable[[], dict[str, Any]] | None = None) -> int:
    import uvicorn

    from runbook.serve.app import ServeConfig, Server, create_app

    config = ServeConfig(loaded["rules"], loaded["inventory"], Path(db).resolve(), _audit_path(audit_log).resolve(),
                         loaded["token"], loaded["hooks"], max_body, concurrency, host_key_checking, known_hosts,
                         shutdown_timeout, quiet)
    server = Server(config)
    sock = _bind(host, port)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="on",
                                       timeout_graceful_shutdown=10, ssl_certfile=tls_cert, ssl_keyfile=tls_key))
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place that
    # re-raise is a no-op and the process exits 0 after a clean, checkpointed stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if reload is not None:
        signal.signal(signal.SIGHUP, _reloader(server, reload))
    scheme = "https" if tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host
    _echo_err(f"runbook serve: listening on {scheme}://{shown}:{sock.getsockname()[1]} — {len(config.rules.rules)} rule(s), "
              f"{len(config.inventory.hosts)} host(s), auth: {'token' if config.token else 'NONE'}, queue {config.db}")
    uv.run(sockets=[sock])
    return 0 if uv.started else EXIT_INVALID


def _reloader(server: Any, load: Callable[[], dict[str, Any]]) -> Callable[..., None]:
    """A SIGHUP handler: read and check the rules, inventory and credentials again, off the event loop.

    All or nothing: a file that does not check leaves the server on what it had, and says why.
    """
    lock = threading.Lock()

    def reload_now() -> None:
        with lock:   # two signals in a row: one reload after the other, never interleaved
            try:
                loaded = load()
            except RunbookError as exc:
                server.rec.event("serve.reload_failed", error=str(exc), kept=str(server.config.rules.path))
                _echo_err(f"runbook serve: reload refused, still serving the previous rules and inventory:\n{exc}")
                return
            except Exception as exc:   # a bug in loading must not end the server either
                server.rec.event("serve.reload_failed", error=f"{type(exc).__name__}: {exc}")
                return
            server.reload(loaded["rules"], loaded["inventory"], loaded["token"], loaded["hooks"])

    return lambda *_: threading.Thread(target=reload_now, name="runbook-serve-reload", daemon=True).start()


# --- approvals ---------------------------------------------------------------------------------

@click.group()
def approvals() -> None:
    """Remediations in plan mode waiting for a decision: list, show, approve, reject."""


def _queue(db: str):
    from runbook.serve.queue import Queue

    if not Path(db).exists():
        raise ValidationError("no server queue here", location=Location(db),
                              hint="run this where `runbook serve` runs, or pass --db PATH")
    return Queue(db)


_db_option = click.option("--db", default=DEFAULT_DB, show_default=True, type=click.Path(dir_okay=False))


@approvals.command("list")
@_db_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def approvals_list(db: str, fmt: str) -> None:
    """Remediations waiting for approval."""
    from runbook.serve.queue import AWAITING

    jobs = _queue(db).jobs(1000, AWAITING)
    if fmt == "json":
        click.echo(json.dumps([j.as_dict() for j in jobs], indent=2, default=str))
        return
    if not jobs:
        click.echo("no remediation is waiting for approval")
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(j.started_at or j.created_at))
        click.echo(f"{j.id:>6}  {j.rule}  on {j.host}  {Path(j.playbook).name}  planned {when}  plan {j.plan_path}")


@approvals.command("show")
@click.argument("approval_id", type=int)
@_db_option
def approvals_show(approval_id: int, db: str) -> None:
    """The plan of one pending remediation (what approving it would change)."""
    from runbook.serve import bridge

    job = _queue(db).job(approval_id)
    if job is None or not job.plan_path:
        raise ValidationError(f"no planned remediation {approval_id}", hint="`runbook approvals list` shows them")
    plan = bridge.plan_summary(job.plan_path)
    click.echo(f"remediation {job.id}: rule {job.rule} on {job.host}, state {job.state}, plan {plan['hash'][:12]}")
    for p in plan["predictions"]:
        click.echo(f"  {p['prediction']:<9} {p['step_id']}: {p['reason'] or ''}")


def _decide(approval_id: int, approve: bool, db: str, reason: str | None, audit_log: str | None) -> None:
    from runbook.audit import AuditTrail, operator_name

    by = operator_name(None)
    job = _queue(db).decide(approval_id, approve, by, reason)
    if job is None:
        raise ValidationError(f"no remediation {approval_id} is waiting for approval",
                              hint="`runbook approvals list` shows the pending ones")
    AuditTrail(_audit_path(audit_log)).append(f"approvals-{os.getpid()}-{os.urandom(3).hex()}",
                                              "approval.granted" if approve else "approval.rejected",
                                              {"job_id": job.id, "rule": job.rule, "host": job.host, "by": by,
                                               "reason": reason, "plan": job.plan_path, "via": "cli"})
    click.echo(f"remediation {job.id} ({job.rule} on {job.host}) "
               + ("approved: the server applies the plan next" if approve else "rejected"))


@approvals.command("approve")
@click.argument("approval_id", type=int)
@_db_option
@click.option("--reason", help="Recorded with the decision.")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG")
def approvals_approve(approval_id: int, db: str, reason: str | None, audit_log: str | None) -> None:
    """Approve a planned remediation: the server applies exactly that plan (refusing drift)."""
    _decide(approval_id, True, db, reason, audit_log)


@approvals.command("reject")
@click.argument("approval_id", type=int)
@_db_option
@click.option("--reason", help="Recorded with the decision.")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="RUNBOOK_AUDIT_LOG")
def approvals_reject(approval_id: int, db: str, reason: str | None, audit_log: str | None) -> None:
    """Reject a planned remediation: nothing runs."""
    _decide(approval_id, False, db, reason, audit_log)


# --- `runbook validate` of a rules file ----------------------------------------------------------

def is_rules_file(path: str) -> bool:
    """`rules.yml`, `rules.yaml` or `NAME.rules.yml`: what `runbook validate` checks as a rules file."""
    name = Path(path).name
    return name in ("rules.yml", "rules.yaml") or name.endswith((".rules.yml", ".rules.yaml"))


def validate_rules(path: str) -> Any:
    """The validation report of a rules file and the playbooks it names."""
    from runbook.serve.rules import validate_rules_file

    return validate_rules_file(path)
