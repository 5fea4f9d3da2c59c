"""Opening the Dask client for a run: a local cluster of N worker processes, or a running scheduler."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from runbook.cluster.address import ClusterSpec, zone_of_resources
from runbook.cluster.routing import WorkerInfo
from runbook.cluster.settings import dask_settings
from runbook.errors import RunbookError

CONNECT_TIMEOUT = 10.0   # seconds to reach the scheduler before the run is refused
NANNY_POLL = 0.005       # seconds between a local nanny's looks for its worker's start (Dask's own: 0.05)
LOCAL_SETTINGS: dict[str, object] = {
    "distributed.worker.multiprocessing-method": "fork",
    # No HTTP routes on a local cluster's scheduler and workers: their loopback ports are never shown,
    # so nothing could read them, and their modules (Prometheus's client among them) take ~20 ms to load.
    "distributed.scheduler.http.routes": [],
    "distributed.worker.http.routes": [],
}


@contextlib.contextmanager
def open_client(spec: ClusterSpec, threads_per_worker: int = 1) -> Iterator[Any]:
    """A connected `distributed.Client` for the run (the current one, as actors need); `local:N` starts and stops with it.

    `direct_to_workers`: task orders, secrets and results go straight between the controller and the
    worker; the scheduler only places the run's actors.
    """
    with _dask_defaults_parsed_by_libyaml(), _collector_paused():
        import dask
        from distributed import Client, LocalCluster

    cluster = None
    try:
        if spec.local_workers is not None:
            # Forked, the workers start with the engine already imported (about 2 s sooner on 2 cores than
            # a fresh interpreter each); nothing of the run is open yet (audit trail, run state, hosts).
            sys.stdout.flush()
            sys.stderr.flush()
            gc.freeze()   # the workers' collector then leaves the inherited objects (and their pages) alone
            try:
                _versions_known_before_fork()
                with _workers_ignore_sigint(), _nanny_polls_often(), dask.config.set({**dask_settings(os.environ),
                                                                                      **LOCAL_SETTINGS}):
                    # The terminal's Ctrl-C reaches its whole process group: the workers must leave it to the
                    # controller, which stops the run as an in-process run stops (running tasks finish).
                    # The scheduler's HTTP server (no routes: LOCAL_SETTINGS) on a free loopback port:
                    # not 0.0.0.0:8787, nor a warning on the console when that port is taken.
                    cluster = LocalCluster(n_workers=spec.local_workers, threads_per_worker=threads_per_worker,
                                           processes=True, host="127.0.0.1", dashboard_address=None,
                                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                                           silence_logs=logging.ERROR, preload=["runbook.cluster.worker"],
                                           memory_limit=0)   # no nanny restarts a worker for its memory mid-run
            finally:
                gc.unfreeze()
            client = Client(cluster, direct_to_workers=True)
        else:
            client = Client(spec.address, timeout=CONNECT_TIMEOUT, direct_to_workers=True)
    except Exception as exc:   # refused, timed out, TLS settings missing or wrong: the run cannot start
        if cluster is not None:
            cluster.close()
        raise RunbookError(f"cannot reach the cluster scheduler at {spec}: {exc}",
                           hint="start it (dask scheduler) and its workers (runbook worker ADDRESS), or check the "
                                "address; for tls:// see docs/cluster.md") from None
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)   # a lost worker or scheduler is reported by the run itself, once, clearly
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
        quiet.setLevel(level)


def _dask_defaults_parsed_by_libyaml() -> contextlib.AbstractContextManager[None]:
    """While Dask is first imported, `yaml.safe_load` is libyaml's safe loader (same data, no positions).

    Importing `distributed` parses its bundled defaults (15 KB of YAML) with PyYAML's pure-Python
    loader: about 45 ms of a run's start on the controller, 5 ms with libyaml.
    """
    import yaml

    if "distributed" in sys.modules or not getattr(yaml, "__with_libyaml__", False):
        return contextlib.nullcontext()
    return _patched(yaml, "safe_load", lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection inside the block: `distributed`'s first import makes ~100 k objects that all live on.

    Collecting among them while they are being made finds nothing to free (about 15 ms of the import).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _versions_known_before_fork() -> None:
    """Dask's package versions looked up once here, so each forked worker has them for its registration.

    Every worker sends them to the scheduler as it registers, and the scheduler compares them with
    its own: about 10 ms of metadata lookups (and a `uname -p`) in each process, unless inherited.
    """
    from distributed.versions import get_versions

    get_versions()


def _nanny_polls_often() -> contextlib.AbstractContextManager[None]:
    """While `local:N` starts, each nanny looks for its worker's "started" message every 5 ms, not every 50.

    The workers are up in about 0.2 s; Dask's 50 ms poll adds 25 ms on average to each start.
    The attribute is Dask's own (a class attribute of its worker process handle); without it, nothing changes.
    """
    from distributed.nanny import WorkerProcess

    if not hasattr(WorkerProcess, "_init_msg_interval"):
        return contextlib.nullcontext()
    return _patched(WorkerProcess, "_init_msg_interval", NANNY_POLL)


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` inside the block, and what it was again after it."""
    usual = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, usual)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Worker processes started meanwhile inherit an ignored SIGINT (Python then installs no handler of its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def workers_of(client: Any) -> list[WorkerInfo]:
    """The scheduler's workers now, each with its zone (the `zone:NAME` resource)."""
    info = client.scheduler_info(n_workers=-1)
    return sorted((WorkerInfo(address, str(w.get("name", address)), zone_of_resources(w.get("resources")))
                   for address, w in info.get("workers", {}).items()), key=lambda w: w.address)
