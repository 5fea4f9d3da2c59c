"""Cluster pieces that need no cluster: addresses, zones, routing, which secrets a task carries, worker host keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.cli_cluster import worker_argv
from runbook.cluster.address import parse_cluster, zone_of_resources
from runbook.cluster.hostkeys import KnownHostsSink
from runbook.cluster.routing import Router, WorkerInfo, host_zone
from runbook.cluster.secrets import SecretNeeds
from runbook.cluster.worker import LoggedRegisters
from runbook.errors import ValidationError
from runbook.loader import parse_playbook


def test_cluster_addresses() -> None:
    assert parse_cluster("local:2").local_workers == 2
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert parse_cluster("tls://sched.example.org:8786").tls
    assert str(parse_cluster(" local:4 ")) == "local:4"


@pytest.mark.parametrize("bad", ["local:0", "local:65", "local:x", "8786", "sched:8786", "tcp://h:99999", "http://h:80",
                                 "tcp://h:8786/../x", "tcp://h;rm -rf /:8786", "tcp://h:8786\nx", "x" * 5000])
def test_bad_cluster_addresses_are_invalid_input(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_cluster(bad)
    assert "local:N" in (err.value.hint or "")
    assert len(str(err.value)) < 300   # an oversize value is not echoed whole


def test_zones_from_inventory_and_resources() -> None:
    assert host_zone("h", {"runbook_zone": "eu-west.1"}) == "eu-west.1"
    assert host_zone("h", {}) is None
    for bad in ("a b", "a=1", "a,b", "../x", "", 3, ["x"], "z" * 64):
        if bad == "":
            assert host_zone("h", {"runbook_zone": bad}) is None
            continue
        with pytest.raises(ValidationError, match="host h: inventory variable runbook_zone"):
            host_zone("h", {"runbook_zone": bad})
    assert zone_of_resources({"zone:east": 1, "GPU": 2}) == "east"
    assert zone_of_resources({"zone:a b": 1}) is None
    assert zone_of_resources(None) is None


def test_worker_command_line() -> None:
    argv = worker_argv("tcp://127.0.0.1:8786", "east", 2, "w1", nanny=False)
    assert argv[1:4] == ["-m", "distributed.cli.dask_worker", "tcp://127.0.0.1:8786"]
    assert argv[argv.index("--resources") + 1] == "zone:east=1"
    assert "--preload" in argv and "runbook.cluster.worker" in argv and "--no-nanny" in argv
    # A zone name cannot smuggle more resources or options into the dask command line.
    for bad in ("east=1,gpu", "east --nanny", "-x"):
        with pytest.raises(ValidationError):
            worker_argv("tcp://127.0.0.1:8786", bad, 1, None, nanny=False)
    with pytest.raises(ValidationError, match="joins a running scheduler"):
        worker_argv("local:2", None, 1, None, nanny=False)
    with pytest.raises(ValidationError, match="invalid worker name"):
        worker_argv("tcp://127.0.0.1:8786", None, 1, "w 1; x", nanny=False)
    tls = worker_argv("tls://127.0.0.1:8786", None, 1, None, nanny=True, tls={"tls-cert": "/c.pem", "tls-key": "/k.pem"})
    assert tls[-4:] == ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"] and "--nanny" in tls


WORKERS = [WorkerInfo("tcp://a:1", "a", "east"), WorkerInfo("tcp://b:1", "b", "east"), WorkerInfo("tcp://c:1", "c", "west"),
           WorkerInfo("tcp://d:1", "d", None), WorkerInfo("tcp://e:1", "e", None)]


def test_routing_by_zone_and_evenly() -> None:
    hosts = [(f"e{i}", "east") for i in range(5)] + [("w0", "west")] + [(f"n{i}", None) for i in range(4)]
    router = Router(WORKERS, hosts)
    east = [router.worker_of(f"e{i}") for i in range(5)]
    assert set(east) == {"tcp://a:1", "tcp://b:1"} and abs(east.count("tcp://a:1") - east.count("tcp://b:1")) <= 1
    assert router.worker_of("w0") == "tcp://c:1"
    plain = [router.worker_of(f"n{i}") for i in range(4)]
    assert sorted(plain) == ["tcp://d:1", "tcp://d:1", "tcp://e:1", "tcp://e:1"]   # workers of no zone, evenly


def test_hosts_without_zone_use_any_worker_when_all_have_zones() -> None:
    router = Router(WORKERS[:3], [("n0", None), ("n1", None), ("n2", None)])
    assert sorted(router.worker_of(h) for h in ("n0", "n1", "n2")) == ["tcp://a:1", "tcp://b:1", "tcp://c:1"]


def test_a_zone_without_worker_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValidationError) as err:
        Router(WORKERS, [("h1", "north"), ("h2", "north"), ("h3", "east")])
    text = str(err.value)
    assert "zone `north` has no worker" in text and "h1, h2" in text and "h3" not in text
    assert "--zone north" in text and "east" in text
    with pytest.raises(ValidationError, match="no worker"):
        Router([], [("h1", None)])


def test_a_lost_workers_hosts_move_within_their_zone() -> None:
    router = Router(WORKERS, [("e0", "east"), ("e1", "east"), ("w0", "west"), ("n0", None)])
    lost = router.worker_of("e0")
    assert lost is not None
    moved = router.worker_lost(lost)
    assert set(moved) == {h for h in ("e0", "e1") if h in moved} and "e0" in moved
    assert all(router.worker_of(h) not in (None, lost) for h in moved)
    assert router.worker_of("e0") in ("tcp://a:1", "tcp://b:1")
    assert router.worker_lost(lost) == {}        # once
    assert router.worker_lost("tcp://c:1") == {"w0": None}   # the zone's only worker: nowhere to go
    assert router.worker_of("w0") is None


def test_a_task_carries_only_the_secrets_its_step_reads() -> None:
    pb = parse_playbook("""
runbook: s
vars:
  url: "https://api/{{ token }}"
secrets: {token: env:T, db_password: env:D, unused: env:U}
steps:
  - name: plain
    shell: echo hello
  - name: db
    shell: "psql -W {{ db_password | quote }}"
  - name: via_vars
    shell: "curl {{ url | quote }}"
  - name: all
    shell: "echo {{ secrets | length }}"
  - name: cond
    shell: echo x
    when: token is defined
""", "pb.yml")
    needs = SecretNeeds(pb, {"token": "t0k", "db_password": "pw", "unused": "u"})
    by_name = {s.name: s for s in pb.steps}
    assert needs.of(by_name["plain"]) == {}
    assert needs.of(by_name["db"]) == {"db_password": "pw"}
    assert needs.of(by_name["via_vars"]) == {"token": "t0k"}
    assert set(needs.of(by_name["all"])) == {"token", "db_password", "unused"}
    assert needs.of(by_name["cond"]) == {"token": "t0k"}


def test_worker_registers_report_every_write_once() -> None:
    regs = LoggedRegisters(["h1", "h2"])
    regs.load("h1", {"earlier": {"rc": 0}}, {}, [])
    assert regs.visible("h1")["earlier"] == {"rc": 0}
    regs.store("h1", "out", {"rc": 1}, shared=False)
    regs.store("h2", "ticket", {"rc": 0}, shared=True)
    assert regs.drain("h1") == [("store", ("h1", "out", {"rc": 1}), {"shared": False})]
    assert regs.drain("h1") == []
    assert regs.drain("h2")[0][2] == {"shared": True}


def test_known_hosts_lines_from_workers_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("[10.0.0.9]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD")   # no newline at the end
    sink = KnownHostsSink(path, {"h1": ("10.0.0.1", 2222), "h2": ("10.0.0.2", 22)}, system=tmp_path / "none")
    good = "[10.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFaBd5rZp1PeXSNaW1YnBRm"
    # A worker may only add the key of the host it connected, under that host's own name.
    assert sink.record("h1", [good, "10.0.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFaBd5rZp1PeXSNaW1Y",
                              "* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFaBd5rZp1PeXSNaW1Y",
                              "@cert-authority [10.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFaBd5",
                              good + "\n* ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"]) == [good]
    assert sink.record("nohost", [good]) == []
    sink.record("h1", [good])   # twice: written once
    lines = path.read_text().splitlines()
    assert lines == ["[10.0.0.9]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD", good]
    assert sink.text().endswith(good + "\n")


def test_every_worker_a_host_may_move_to_gets_the_run() -> None:
    router = Router(WORKERS, [("e0", "east"), ("n0", None)])
    assert router.eligible() == ["tcp://a:1", "tcp://b:1", "tcp://d:1", "tcp://e:1"]   # not west's worker
    assert Router(WORKERS, [("w0", "west")]).eligible() == ["tcp://c:1"]
