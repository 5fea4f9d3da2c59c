"""Running a prepared run on a cluster: reach it, route the hosts, set up the workers, then execute."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from runbook.cluster.address import parse_cluster
from runbook.cluster.client import open_client, workers_of
from runbook.cluster.hostkeys import KnownHostsSink
from runbook.cluster.remote import ClusterRun
from runbook.cluster.routing import Router, host_zone
from runbook.cluster.secrets import SecretNeeds
from runbook.cluster.sources import Shipments, collect_sources, step_templates
from runbook.cluster.wire import CREDENTIAL_VARS, SessionSetup
from runbook.engine.options import ExecOptions
from runbook.results import RunResult

if TYPE_CHECKING:
    from runbook.runner import Prepared, RunRequest


def worker_options(options: ExecOptions) -> ExecOptions:
    """The run's options as a worker gets them: no callables, no secrets (they travel with the tasks), no delegates."""
    return dataclasses.replace(options, ask=None, connect=None, window_guard=None, stop=None, pool=None, registers={},
                               secrets={}, inventory_hosts={}, handle_signals=False, interactive=False)


def execute_on_cluster(prepared: Prepared, request: RunRequest, options: ExecOptions, sudo_password: str | None,
                       execute: Callable[[], RunResult]) -> RunResult:
    """Execute with the tasks of every remote host on the cluster `request.cluster`; local hosts stay here."""
    spec = parse_cluster(str(request.cluster))
    remote = [h for h in prepared.hosts if not h.is_local]
    if not remote:
        return execute()   # nothing to send: every host is the control machine itself
    zones = [(h.name, host_zone(h.name, h.vars)) for h in remote]
    with open_client(spec) as client:
        router = Router(workers_of(client), zones)   # a zone without a worker is refused here, before anything runs
        known = KnownHostsSink(request.known_hosts, {h.name: (h.address, h.port) for h in remote})
        width = max((len(layer) for layer in prepared.steps.layers()), default=1)
        threads = max(1, min((options.concurrency or prepared.playbook.concurrency) * width, 256))
        hosts = [dataclasses.replace(h, vars={k: v for k, v in h.vars.items() if k not in CREDENTIAL_VARS}, origins={})
                 for h in prepared.hosts]
        setup = SessionSetup(prepared.playbook, hosts, prepared.info, worker_options(options), known.text(),
                             prepared.info.host_key_checking, request.connect_timeout, threads)
        shipments = Shipments(collect_sources(prepared.playbook), step_templates(prepared.playbook))
        cluster = ClusterRun.start(client, router, setup, SecretNeeds(prepared.playbook, prepared.secrets),
                                   sudo_password, known, shipments)
        try:
            options.pool = cluster.pool
            return execute()
        finally:
            cluster.close()
