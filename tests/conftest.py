"""Shared fixtures: real sshd test hosts on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.results import RunResult
from tests.helpers import EventRecorder, InventoryWriter, PlaybookWriter

from tests.sshd import SSHDHarness, SSHDUnavailable, SSHHost, find_sshd, write_inventory, write_known_hosts


def pytest_configure(config: pytest.Config) -> None:
    """Started as a background job (`cmd &` without job control), the suite inherits an ignored SIGINT,
    and so would every runbook it starts (Python keeps an inherited SIG_IGN): the interrupt tests
    need the default. A Python handler is not inherited across exec, so children start with SIG_DFL."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--ssh-hosts", type=int, default=int(os.environ.get("RUNBOOK_TEST_SSH_HOSTS", "3")),
                     help="how many real sshd test hosts to start (default 3)")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def sshd_harness(request: pytest.FixtureRequest) -> Iterator[SSHDHarness]:
    """Start the sshd test hosts once per session; skip without sshd, except in CI where it fails."""
    if find_sshd() is None:
        message = "sshd is not installed (install openssh-server to run the real-host tests)"
        if _in_ci():
            pytest.fail(message + "; CI=true forbids skipping them")
        pytest.skip(message)
    # Its own temp dir, not pytest's: the test users must traverse it (pytest's is 0700).
    harness = SSHDHarness(count=request.config.getoption("--ssh-hosts"))
    try:
        harness.start()
    except SSHDUnavailable as exc:
        if _in_ci():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(scope="session")
def ssh_hosts(sshd_harness: SSHDHarness) -> list[SSHHost]:
    """The running test hosts (name, address, port, user, home, key_file, host_public_key)."""
    return sshd_harness.hosts


@pytest.fixture
def clean_ssh_hosts(ssh_hosts: list[SSHHost]) -> list[SSHHost]:
    """The test hosts with their home directories emptied before the test."""
    for host in ssh_hosts:
        host.clear_home()
    return ssh_hosts


@pytest.fixture
def ssh_host(clean_ssh_hosts: list[SSHHost]) -> SSHHost:
    """The first test host, with an empty home."""
    return clean_ssh_hosts[0]


@pytest.fixture
def known_hosts(tmp_path: Path, ssh_hosts: list[SSHHost]) -> Path:
    """A known_hosts file (0600) that trusts every test host."""
    return write_known_hosts(tmp_path / "known_hosts", ssh_hosts)


@pytest.fixture
def ssh_inventory(tmp_path: Path, clean_ssh_hosts: list[SSHHost]) -> Path:
    """An Ansible YAML inventory listing every test host by name (h0, h1, ...)."""
    return write_inventory(tmp_path / "inventory.yml", clean_ssh_hosts)


# --- writers and recorders shared by the tests ------------------------------------------------------

@pytest.fixture
def write_playbook(tmp_path: Path) -> PlaybookWriter:
    """`write_playbook(steps, directory=tmp_path, name="pb.yml", **top_level_keys)` writes a playbook, returns its path."""

    def write(steps: list[dict[str, Any]], directory: Path | None = None, name: str = "pb.yml", **top: Any) -> Path:
        path = (directory or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"runbook": "t", **top, "steps": steps}, sort_keys=False))
        return path

    return write


@pytest.fixture
def local_inventory(tmp_path: Path) -> InventoryWriter:
    """`local_inventory(names=["a", "b"], host_vars=None, directory=tmp_path)`: local hosts, each with its own `dir`."""

    def write(names: list[str] | None = None, host_vars: dict[str, dict] | None = None,
              directory: Path | None = None, name: str = "inventory.yml") -> Path:
        base = directory or tmp_path
        hosts: dict[str, dict[str, Any]] = {}
        for n in names or ["a", "b"]:
            d = base / "hosts" / n
            d.mkdir(parents=True, exist_ok=True)
            hosts[n] = {"ansible_connection": "local", "dir": str(d), **(host_vars or {}).get(n, {})}
        path = base / name
        path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
        return path

    return write


@pytest.fixture
def go(tmp_path: Path, write_playbook: PlaybookWriter, local_inventory: InventoryWriter) -> Callable[..., RunResult]:
    """`go(steps, hosts=["a"], host_vars=None, top=None, **run_kwargs)`: run over local hosts, trail and state in tmp_path
    (a module may define its own `go`)."""

    def run_it(steps: list[dict[str, Any]], hosts: list[str] | None = None, host_vars: dict[str, dict] | None = None,
               top: dict[str, Any] | None = None, **kw: Any) -> RunResult:
        inv = local_inventory(hosts or ["a"], host_vars)
        pb = write_playbook(steps, **(top or {}))
        return run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"), **kw)

    return run_it


@pytest.fixture
def event_recorder() -> EventRecorder:
    """An observer that records every event of a run."""
    return EventRecorder()
