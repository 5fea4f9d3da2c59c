"""A stopping `runbook worker` ends even when Dask's close hangs, after letting its running tasks finish."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runbook.cli_cluster import worker_argv, worker_environment
from runbook.cluster.stopping import DEFAULT_GRACE, GRACE_VAR, RunningTasks, arm, exit_after, grace_from
from tests.helpers import cli_env
from tests.sshd import free_port

# A preload whose task swallows its cancellation: asyncio.run's shutdown then waits for it for good,
# as it does for the Dask task that hangs a real close now and then.
STUBBORN = """
import asyncio

async def _stubborn():
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

def dask_setup(worker):
    worker._runbook_test_stubborn = asyncio.get_running_loop().create_task(_stubborn())
"""


@pytest.mark.parametrize("value", [None, "", "soon", "0", "-1", "nan", "inf"])
def test_no_usable_grace_arms_nothing(value: str | None) -> None:
    env = {} if value is None else {GRACE_VAR: value}
    assert grace_from(env) is None
    assert arm(env, exit_now=lambda code: pytest.fail("exited")) is None


def test_the_watch_waits_the_grace_then_for_running_tasks_then_exits_clean() -> None:
    running = RunningTasks()
    slept: list[float] = []
    exited: list[int] = []
    release = threading.Event()

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:   # the task ends while the watch waits
            release.set()
        time.sleep(0.01)

    def task() -> None:
        with running.task():
            release.wait(10)

    worker = threading.Thread(target=task)
    worker.start()
    while not running.count():
        time.sleep(0.001)
    exit_after(2.5, running, sleep, exited.append)
    worker.join()
    assert slept[0] == 2.5 and len(slept) >= 4   # the grace, then it looked again until the task was done
    assert exited == [0] and running.count() == 0


def test_runbook_worker_sets_its_grace_and_the_operators_value_wins() -> None:
    assert worker_environment({})[GRACE_VAR] == f"{DEFAULT_GRACE:g}"
    assert worker_environment({GRACE_VAR: "30"})[GRACE_VAR] == "30"


def _worker(address: str, name: str, tmp_path: Path, grace: str | None) -> subprocess.Popen[bytes]:
    """The process `runbook worker` becomes, with the stubborn preload added; `grace` None: not armed."""
    (tmp_path / "stubborn_preload.py").write_text(STUBBORN)
    argv = [*worker_argv(address, None, 1, name, False), "--preload", "stubborn_preload"]
    env = worker_environment(cli_env(PYTHONPATH=f"{cli_env()['PYTHONPATH']}:{tmp_path}"))
    if grace is None:
        del env[GRACE_VAR]
    else:
        env[GRACE_VAR] = grace
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _joined(address: str, procs: list[subprocess.Popen[bytes]]) -> None:
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        deadline = time.monotonic() + 60
        while len(client.scheduler_info(n_workers=-1)["workers"]) < len(procs):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the workers did not join"
            time.sleep(0.1)


def test_a_worker_whose_dask_close_hangs_still_exits_after_its_grace(tmp_path: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=cli_env())
    procs = [scheduler]
    try:
        hangs = _worker(address, "hangs", tmp_path, grace=None)
        watched = _worker(address, "watched", tmp_path, grace="1")
        procs += [hangs, watched]
        _joined(address, [hangs, watched])
        hangs.send_signal(signal.SIGTERM)
        watched.send_signal(signal.SIGTERM)
        _, err = watched.communicate(timeout=30)
        assert watched.returncode == 0
        assert b"did not end within 1s; exiting" in err
        with pytest.raises(subprocess.TimeoutExpired):   # without the grace, the same worker is still closing
            hangs.wait(timeout=2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
