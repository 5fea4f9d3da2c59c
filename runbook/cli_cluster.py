"""`runbook worker`: a Dask worker with the engine loaded and, with `--zone`, the resource naming its zone."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import click

from runbook.cluster.address import ZONE_RESOURCE, check_zone, parse_cluster
from runbook.cluster.settings import dask_environment
from runbook.cluster.stopping import DEFAULT_GRACE, GRACE_VAR


def worker_argv(scheduler: str, zone: str | None, nthreads: int, name: str | None, nanny: bool,
                tls: dict[str, str] | None = None) -> list[str]:
    """The `dask worker` command line `runbook worker` becomes (the same process: signals reach it directly)."""
    spec = parse_cluster(scheduler)
    if spec.address is None:
        from runbook.errors import ValidationError
        raise ValidationError(f"runbook worker {scheduler}: a worker joins a running scheduler",
                              hint="give its address: runbook worker tcp://HOST:8786")
    argv = [sys.executable, "-m", "distributed.cli.dask_worker", spec.address, "--nthreads", str(nthreads),
            "--preload", "runbook.cluster.worker", "--nanny" if nanny else "--no-nanny", "--no-dashboard"]
    if zone is not None:
        argv += ["--resources", f"{ZONE_RESOURCE}{check_zone(zone, '--zone')}=1"]
    if name is not None:
        argv += ["--name", check_zone(name, "--name", "worker name")]
    for flag, path in sorted((tls or {}).items()):
        argv += [f"--{flag}", path]
    return argv


@click.command()
@click.argument("scheduler", metavar="tcp://HOST:8786")
@click.option("--zone", help="Serve the hosts whose inventory sets runbook_zone to NAME (hosts without one go to workers without a zone, if any).")
@click.option("--nthreads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Dask threads (runbook runs each run's tasks on threads of its own).")
@click.option("--name", help="The worker's name, recorded in each task result it runs (default: its address).")
@click.option("--nanny/--no-nanny", default=False, show_default=True,
              help="Run under a Dask nanny that restarts the worker if it dies (its running tasks are lost either way).")
@click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False), help="tls://: the CA certificate(s) (PEM).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="tls://: this worker's certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="tls://: this worker's private key (PEM).")
def worker(scheduler: str, zone: str | None, nthreads: int, name: str | None, nanny: bool, tls_ca_file: str | None,
           tls_cert: str | None, tls_key: str | None) -> None:
    """Start a Dask worker for runbook runs, joined to the scheduler at tcp://HOST:8786 (or tls://)."""
    tls = {k: v for k, v in (("tls-ca-file", tls_ca_file), ("tls-cert", tls_cert), ("tls-key", tls_key)) if v}
    argv = worker_argv(scheduler, zone, nthreads, name, nanny, tls)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, worker_environment(os.environ))


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the process `runbook worker` becomes: runbook's Dask settings and its exit grace, unless env sets them."""
    return {GRACE_VAR: f"{DEFAULT_GRACE:g}", **dask_environment(env)}
