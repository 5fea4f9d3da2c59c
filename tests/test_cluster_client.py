"""Opening the run's Dask client: how `local:N` starts faster without changing what Dask reads or does."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from runbook.cluster.address import parse_cluster
from runbook.cluster.client import NANNY_POLL, _collector_paused, _nanny_polls_often, open_client, workers_of

# Dask's whole configuration after `import distributed`, as one comparable text; then whether safe_load is PyYAML's own.
CONFIG_AFTER_IMPORT = """
import json, sys, yaml
pure = yaml.safe_load
if sys.argv[1] == "libyaml":
    from runbook.cluster.client import _dask_defaults_parsed_by_libyaml
    with _dask_defaults_parsed_by_libyaml():
        import dask, distributed
else:
    import dask, distributed
print(json.dumps({"config": repr(sorted(dask.config.config.items())), "restored": yaml.safe_load is pure}))
"""


def _import_distributed(how: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CONFIG_AFTER_IMPORT, how], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_dask_defaults_parsed_by_libyaml_are_the_same_configuration() -> None:
    fast, plain = _import_distributed("libyaml"), _import_distributed("pure")
    assert fast["config"] == plain["config"]
    assert "'distributed'" in str(fast["config"])   # the bundled defaults were read at all
    assert fast["restored"] is True and plain["restored"] is True   # yaml.safe_load is PyYAML's own again


def test_a_local_cluster_starts_with_the_quick_nanny_poll_then_puts_dasks_back() -> None:
    from distributed.nanny import WorkerProcess

    usual = WorkerProcess._init_msg_interval
    assert usual != NANNY_POLL
    with _nanny_polls_often():
        assert WorkerProcess._init_msg_interval == NANNY_POLL
    assert WorkerProcess._init_msg_interval == usual
    with open_client(parse_cluster("local:1")) as client:
        assert [w.zone for w in workers_of(client)] == [None]
        assert client.submit(lambda: 41 + 1, pure=False).result(timeout=30) == 42
    assert WorkerProcess._init_msg_interval == usual


def _http_of(node: Any) -> tuple[str, int]:
    return node.http_server.address, node.http_server.port


def _health(address: str, port: int) -> int:
    """The HTTP status of Dask's health route there (404: the server answers, and has no such route)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/health", timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_local_cluster_serves_no_http_routes_and_only_on_loopback() -> None:
    with open_client(parse_cluster("local:1")) as client:
        scheduler = client.run_on_scheduler(lambda dask_scheduler: _http_of(dask_scheduler))
        (worker,) = client.run(lambda dask_worker: _http_of(dask_worker)).values()
        for address, port in (scheduler, worker):
            assert address == "127.0.0.1"
            assert _health(address, port) == 404   # Dask's own routes answer 200 "ok" here


# In a fresh controller (an earlier local cluster in this process would have looked the versions up already).
WORKER_VERSION_LOOKUPS = """
import json
from runbook.cluster.address import parse_cluster
from runbook.cluster.client import open_client

def lookups():
    from distributed.versions import _version_cached
    info = _version_cached.cache_info()
    return info.hits, info.misses

with open_client(parse_cluster("local:1")) as client:
    print(json.dumps(list(client.run(lookups).values())[0]))
"""


def test_a_local_worker_inherits_dasks_package_versions_instead_of_looking_them_up() -> None:
    from distributed.versions import optional_packages, required_packages

    out = subprocess.run([sys.executable, "-c", WORKER_VERSION_LOOKUPS], capture_output=True, text=True, check=True)
    hits, misses = json.loads(out.stdout.splitlines()[-1])   # after the worker's registration, which sends them
    packages = len(set(required_packages) | set(optional_packages))
    assert hits >= packages          # its registration found every version already known
    assert misses <= packages        # the ones looked up before the fork, no more


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_inside_the_block_and_as_it_was_after(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with _collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), _collector_paused():
            raise RuntimeError("the block failed")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
