"""runbook's Dask settings for its own workers: as Dask reads them from the environment of an exec'd worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask

from runbook.cluster.settings import DASK_SETTINGS, dask_environment, dask_settings

READ_BACK = "import json, sys, dask, distributed; print(json.dumps({k: dask.config.get(k) for k in json.loads(sys.argv[1])}))"


def _as_dask_reads_them(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", READ_BACK, json.dumps(list(DASK_SETTINGS))], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_an_execd_worker_reads_every_setting_as_given() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    read = _as_dask_reads_them(dask_environment(clean))
    assert read == DASK_SETTINGS
    defaults = _as_dask_reads_them(clean)
    assert all(defaults[k] != v for k, v in DASK_SETTINGS.items())   # each one changes something


def test_the_operators_own_dask_variable_wins() -> None:
    env = dask_environment({"PATH": os.environ.get("PATH", ""), "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "True"})
    assert _as_dask_reads_them(env)["distributed.worker.profile.enabled"] is True


def test_the_settings_are_dask_keys() -> None:
    import distributed  # noqa: F401  (its defaults join dask's config)

    for key in DASK_SETTINGS:
        assert dask.config.get(key, default=KeyError) is not KeyError, key


def test_in_process_settings_leave_out_what_the_environment_sets() -> None:
    assert dask_settings({}) == DASK_SETTINGS
    left = dask_settings({"DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "20ms"})
    assert "distributed.admin.tick.interval" not in left and len(left) == len(DASK_SETTINGS) - 1
