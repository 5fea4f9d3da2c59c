"""Dask settings of the cluster processes runbook starts itself (`runbook worker`, `--cluster local:N`).

Each periodic job below runs on a worker's event loop, the thread that also carries the run's
channel, whether or not anybody reads its figures; runbook reads none of them. A DASK_* variable
in the operator's environment still decides its key (a Dask config file does not: these win over it).
"""

from __future__ import annotations

from collections.abc import Mapping

DASK_SETTINGS: dict[str, object] = {
    # The statistical profiler samples every thread's stack every 10 ms; a runbook worker has a thread per
    # running task and per SSH connection, so it costs about as much CPU as the tasks themselves.
    "distributed.worker.profile.enabled": False,
    # The dashboard's monitors (CPU, memory, network and disk I/O, every 0.5 s): no dashboard reads them.
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.disk": False,
    # The event-loop health check (every 20 ms) only times the warning about a blocked loop.
    "distributed.admin.tick.interval": "500ms",
    # Spill and pause thresholds, checked every 100 ms: runbook's tasks keep no data on the worker.
    "distributed.worker.memory.monitor-interval": "1s",
}


def dask_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with DASK_SETTINGS as DASK_* variables, for a worker started with exec; what `env` sets wins."""
    return {**{_variable(key): _text(value) for key, value in DASK_SETTINGS.items()}, **env}


def dask_settings(env: Mapping[str, str]) -> dict[str, object]:
    """DASK_SETTINGS but the keys `env` sets (a DASK_* variable), for `dask.config.set` in this process."""
    return {key: value for key, value in DASK_SETTINGS.items() if _variable(key) not in env}


def _variable(key: str) -> str:
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def _text(value: object) -> str:
    return str(value)   # Dask reads False as the boolean (literal_eval); "5s" stays text
