"""`runbook serve`: alert-driven remediation.

HTTP (app: Starlette, auth, models) -> durable queue (queue: SQLite) -> rules (rules) ->
safety (safety) -> the worker (worker) -> the engine, only through bridge. Every decision is
recorded in the audit trail and the metrics (record).
"""
