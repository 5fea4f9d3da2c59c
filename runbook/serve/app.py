"""The HTTP side: an ASGI app (Starlette) over the server, which owns the queue, the worker and the records."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pydantic
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runbook.serve import bridge
from runbook.serve.auth import HookAuth, token_matches
from runbook.serve.models import (Alert, AMPayload, ApprovalDecision, HookEvent, alert_from_hook, alerts_from_alertmanager)
from runbook.serve.queue import AWAITING, Accepted, Queue, ServerLock
from runbook.serve.record import Metrics, Recorder
from runbook.serve.rules import RuleSet
from runbook.serve.worker import Worker

MAX_BODY = 1024 * 1024


@dataclass
class ServeConfig:
    """Everything the server needs, already loaded and checked."""

    rules: RuleSet
    inventory: bridge.Inventory
    db: Path
    audit_log: Path
    token: str | None                      # None only with --insecure-no-auth
    hooks: dict[str, HookAuth]
    max_body: int = MAX_BODY
    concurrency: int | None = None
    host_key_checking: str | None = None
    known_hosts: str | None = None
    shutdown_timeout: float = 300.0
    quiet: bool = False
    poll: float = 1.0


class Server:
    """The queue, worker and recorder of one `runbook serve`, started and stopped together."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.lock = ServerLock(config.db)
        self.lock.acquire()
        self.queue = Queue(config.db)
        self.metrics = Metrics(self._depth)
        self.rec = Recorder(config.audit_log, self.metrics, quiet=config.quiet)
        base = config.db.parent
        self.settings = bridge.RunSettings(config.inventory, config.audit_log, config.audit_log.parent / "runs",
                                           base / "plans", threading.Event(), config.host_key_checking, config.known_hosts)
        self.worker = Worker(config.rules, self.queue, self.settings, self.rec, config.concurrency, config.poll)
        self.accepting = False

    def _depth(self) -> float:
        counts = self.queue.counts()
        return float(counts.get("pending_alerts", 0) + counts.get("queued", 0))

    def start(self) -> None:
        """Resume pending work and start accepting."""
        c = self.config
        self.rec.event("serve.started", rules=str(c.rules.path), rules_count=len(c.rules.rules), db=str(c.db),
                       inventory=c.inventory.source, auth="token" if c.token else "none (--insecure-no-auth)",
                       hooks=sorted(c.rules.hook_names), concurrency=self.worker.concurrency)
        self.worker.start()
        self.accepting = True

    def reload(self, rules: RuleSet, inventory: bridge.Inventory, token: str | None, hooks: dict[str, HookAuth]) -> None:
        """Take a new rules file, inventory and credentials, checked by the caller, for what is routed from now on.

        Jobs already queued keep their playbook and host; a job whose rule is gone ends as an error.
        The number of remediations at once stays (its thread pool is sized at start).
        """
        self.config = dataclasses.replace(self.config, rules=rules, inventory=inventory, token=token, hooks=hooks)
        self.settings.inventory = inventory
        self.worker.rules = rules
        wanted = self.config.concurrency or rules.concurrency
        self.rec.event("serve.reloaded", rules=str(rules.path), rules_count=len(rules.rules), inventory=inventory.source,
                       hosts=len(inventory.hosts), auth="token" if token else "none (--insecure-no-auth)",
                       hooks=sorted(rules.hook_names),
                       **({"concurrency_kept": self.worker.concurrency} if wanted != self.worker.concurrency else {}))
        self.worker.wake()   # alerts that matched no rule before are not routed again; new ones see the new rules

    def stop(self) -> None:
        """Stop accepting, let running remediations finish or checkpoint, then close."""
        self.accepting = False
        self.rec.event("serve.stopping", running=sorted(self.worker._busy))
        finished = self.worker.stop(self.config.shutdown_timeout)
        self.rec.event("serve.stopped", clean=finished, queue=self.queue.counts())
        self.queue.close()
        self.lock.release()

    def accept(self, alerts: list[Alert], request_id: str) -> Accepted:
        """Store a delivery durably, count it, record it, and wake the dispatcher."""
        result = self.queue.accept(alerts, request_id)
        for alert, fresh in zip(alerts, result.fresh):
            (self.metrics.received if fresh else self.metrics.deduplicated).labels(alert.source.split(":")[0]).inc()
        if result.new:
            self.rec.event("alert.received", request_id=request_id, alerts=result.new, duplicates=result.duplicates,
                           fingerprints=[a.fingerprint for a in alerts][:50], status=sorted({a.status for a in alerts}))
            self.worker.wake()
        return result


def _reply(code: int, request_id: str, **body: Any) -> JSONResponse:
    return JSONResponse({"request_id": request_id, **body}, status_code=code, headers={"X-Request-Id": request_id})


class _Refused(Exception):
    def __init__(self, status: int, reason: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.reason, self.message, self.extra = status, reason, message, extra


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _Refused(413, "too_large", f"body of {length} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "too_large", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Refused(400, "malformed", f"body is not JSON: {exc}") from None


def _invalid(exc: pydantic.ValidationError) -> _Refused:
    # Never echo the input back: it may carry anything, and the reason is in loc and msg.
    problems = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]
    return _Refused(422, "invalid", "payload does not match the schema", problems=problems)


class Api:
    """The endpoints; each runs inside `guarded`, which turns refusals into recorded 4xx replies."""

    def __init__(self, server: Server):
        self.server = server

    @property
    def cfg(self) -> ServeConfig:
        """The server's configuration now (a reload replaces it whole: token, hooks and rules change together)."""
        return self.server.config

    def authorize(self, request: Request) -> None:
        """Refuse (401) unless the request carries the server token; --insecure-no-auth lets everything in."""
        if self.cfg.token is not None and not token_matches(request.headers.get("authorization"), self.cfg.token):
            raise _Refused(401, "unauthorized", "missing or wrong credentials (bearer token or basic auth)")

    async def guarded(self, request: Request, handler: Any) -> Response:
        """Run a handler with a request id; record and answer refusals."""
        request_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        try:
            if not self.server.accepting and request.method == "POST":
                raise _Refused(503, "stopping", "the server is stopping; retry later")
            response: Response = await handler(request, request_id)
        except _Refused as refused:
            r = refused
            where = {"endpoint": request.url.path[:200], "client": request.client.host if request.client else None,
                     "request_id": request_id, "message": r.message}
            await anyio.to_thread.run_sync(lambda: self.server.rec.rejected(r.reason, **where))
            resp = _reply(r.status, request_id, error=r.message, **r.extra)
            if r.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="runbook"'
            return resp
        if handler in (self.alertmanager, self.hook):
            self.server.metrics.accept.observe(time.perf_counter() - started)
        return response

    async def _intake(self, alerts: list[Alert], request_id: str) -> Response:
        result = await anyio.to_thread.run_sync(self.server.accept, alerts, request_id)
        return _reply(200, request_id, accepted=len(result.new), duplicates=result.duplicates)

    async def alertmanager(self, request: Request, request_id: str) -> Response:
        """POST /alertmanager: an Alertmanager webhook notification (version 4)."""
        self.authorize(request)
        data = _json(await _body(request, self.cfg.max_body))
        try:
            payload = AMPayload.model_validate(data)
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        if payload.truncatedAlerts:
            self.server.rec.event("alert.truncated", request_id=request_id, truncated=payload.truncatedAlerts,
                                  note="Alertmanager left alerts out of this notification (its max_alerts)")
        return await self._intake(alerts_from_alertmanager(payload), request_id)

    async def hook(self, request: Request, request_id: str) -> Response:
        """POST /hooks/NAME: a generic JSON event, signed (HMAC) when the hook has a secret, else with the token."""
        name = request.path_params["name"]
        signed = self.cfg.hooks.get(name)
        if signed is None:
            self.authorize(request)
            if name not in self.cfg.rules.hook_names:
                raise _Refused(404, "unknown_hook", f"no hook named {name[:64]!r} in the rules file")
        body = await _body(request, self.cfg.max_body)
        if signed is not None:
            why = signed.verify({k.lower(): v for k, v in request.headers.items()}, body, time.time())
            if why is not None:
                raise _Refused(401, "bad_signature", why)
        data = _json(body)
        if not isinstance(data, dict):
            raise _Refused(422, "invalid", "a hook's body must be a JSON object")
        try:
            event = HookEvent.model_validate(data)
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        return await self._intake([alert_from_hook(name, event, data)], request_id)

    async def runs(self, request: Request, request_id: str) -> Response:
        """GET /runs?state=&limit=: recent remediations, newest first."""
        self.authorize(request)
        raw = request.query_params.get("limit", "")
        limit = min(int(raw), 1000) if raw.isdigit() else 100
        jobs = await anyio.to_thread.run_sync(lambda: self.server.queue.jobs(limit, request.query_params.get("state")))
        return _reply(200, request_id, runs=[j.as_dict() for j in jobs])

    def _detail(self, key: str) -> dict[str, Any] | None:
        q = self.server.queue
        job = q.job(key)
        if job is None:
            return None
        alerts = [found for found in (q.alert(i) for i in q.job_alert_ids(job.id)) if found]
        out: dict[str, Any] = {"run": job.as_dict(), "alerts": [{**a.to_record(), **meta} for a, meta in alerts]}
        if job.plan_path and Path(job.plan_path).exists():
            out["plan"] = bridge.plan_summary(job.plan_path)
        return out

    async def run_detail(self, request: Request, request_id: str) -> Response:
        """GET /runs/ID: one remediation (by its id or engine run id), its alerts and its plan."""
        self.authorize(request)
        key = request.path_params["id"][:80]
        found = await anyio.to_thread.run_sync(self._detail, key)
        if found is None:
            raise _Refused(404, "not_found", f"no run {key!r}")
        return _reply(200, request_id, **found)

    async def approvals(self, request: Request, request_id: str) -> Response:
        """GET /approvals: remediations waiting for a decision."""
        self.authorize(request)
        jobs = await anyio.to_thread.run_sync(lambda: self.server.queue.jobs(1000, AWAITING))
        return _reply(200, request_id, approvals=[j.as_dict() for j in jobs])

    async def approve(self, request: Request, request_id: str) -> Response:
        """POST /approvals/ID {"decision": "approve"|"reject", "by": ..., "reason": ...}."""
        self.authorize(request)
        key = request.path_params["id"]
        try:
            decision = ApprovalDecision.model_validate(_json(await _body(request, 64 * 1024)))
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        job = None
        if key.isdigit():
            job = await anyio.to_thread.run_sync(self.server.worker.decide, int(key), decision.decision == "approve",
                                                 f"http:{decision.by or 'api'}", decision.reason)
        if job is None:
            raise _Refused(404, "not_found", f"no remediation {key[:20]!r} is waiting for approval")
        return _reply(200, request_id, run=job.as_dict())

    async def healthz(self, request: Request, request_id: str) -> Response:
        """GET /healthz (no authentication; says only whether the server accepts alerts)."""
        ok = self.server.accepting
        return _reply(200 if ok else 503, request_id, status="ok" if ok else "stopping")

    async def metrics(self, request: Request, request_id: str) -> Response:
        """GET /metrics: Prometheus exposition."""
        self.authorize(request)
        body = await anyio.to_thread.run_sync(self.server.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def create_app(server: Server) -> Starlette:
    """The ASGI app; its lifespan starts and stops the server."""
    api = Api(server)

    def route(path: str, handler: Any, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return await api.guarded(request, handler)
        return Route(path, endpoint, methods=[method])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(server.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(server.stop, abandon_on_cancel=True)

    return Starlette(routes=[
        route("/alertmanager", api.alertmanager, "POST"), route("/hooks/{name}", api.hook, "POST"),
        route("/runs", api.runs, "GET"), route("/runs/{id}", api.run_detail, "GET"),
        route("/approvals", api.approvals, "GET"), route("/approvals/{id}", api.approve, "POST"),
        route("/healthz", api.healthz, "GET"), route("/metrics", api.metrics, "GET"),
    ], lifespan=lifespan)
