"""Opening the run's Dask client: how `local:N` starts faster without changing what Dask reads or does."""

from __future__ import annotations

import json
import subprocess
import sys

from runbook.cluster.address import parse_cluster
from runbook.cluster.client import NANNY_POLL, _nanny_polls_often, open_client, workers_of

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
