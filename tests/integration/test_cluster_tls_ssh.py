"""A cluster over TLS (docs/cluster.md): scheduler, worker and controller with certificates; without them, refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cli, cli_env
from tests.integration.test_cluster_ssh import VENV_BIN, Cluster, wait_workers
from tests.sshd import SSHHost, free_port, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and one certificate for 127.0.0.1 that every party (scheduler, worker, client) uses."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runbook test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def tls_env(certs: dict[str, Path]) -> dict[str, str]:
    """The controller's Dask configuration for TLS, as docs/cluster.md gives it."""
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs["ca"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs["cert"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs["key"]),
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "true"}


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Path]]]:
    certs = make_certificates(tmp_path)
    flags = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    scheduler = subprocess.Popen([str(VENV_BIN / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard", *flags],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    worker = subprocess.Popen([sys.executable, "-m", "runbook", "worker", address, "--name", "tls-1", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    cluster = Cluster(address, scheduler, {"tls-1": worker})
    try:
        import dask

        with dask.config.set({"distributed.comm.tls.ca-file": str(certs["ca"]),
                              "distributed.comm.tls.client.cert": str(certs["cert"]),
                              "distributed.comm.tls.client.key": str(certs["key"])}):
            wait_workers(address, {"tls-1"}, [scheduler, worker])
        yield cluster, certs
    finally:
        cluster.stop()


def test_a_run_over_tls_and_a_controller_without_certificates_refused(tls_cluster: tuple[Cluster, dict[str, Path]],
                                                                      clean_ssh_hosts: list[SSHHost],
                                                                      tmp_path: Path) -> None:
    cluster, certs = tls_cluster
    hosts = clean_ssh_hosts[:1]
    (tmp_path / "pb.yml").write_text("runbook: tls\nsteps:\n  - name: one\n    shell: echo over-tls > proof\n")
    write_inventory(tmp_path / "inventory.yml", hosts)
    write_known_hosts(tmp_path / "known_hosts", hosts)
    args = ("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
            str(tmp_path / "audit.jsonl"), "--format", "json", "--cluster", cluster.address)
    refused = cli(*args, cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert "cannot reach the cluster scheduler at tls://" in refused.stderr and "Traceback" not in refused.stderr
    assert not (hosts[0].home / "proof").exists()
    done = cli(*args, env=tls_env(certs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["worker"] for r in json.loads(done.stdout)["results"]] == ["tls-1"]
    assert (hosts[0].home / "proof").read_text() == "over-tls\n"
