"""Shared fixtures: real sshd test hosts on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import SSHDHarness, SSHDUnavailable, SSHHost, find_sshd, write_inventory, write_known_hosts


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
