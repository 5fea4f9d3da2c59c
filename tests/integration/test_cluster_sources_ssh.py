"""A cluster run's `upload:`/`template:` sources reach the hosts from the controller, not from the workers' disks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import cli, cli_env
from tests.integration.test_cluster_ssh import start_cluster
from tests.sshd import SSHHost, write_inventory, write_known_hosts

pytestmark = pytest.mark.ssh

PLAYBOOK = """\
runbook: shipped-sources
steps:
  - name: gate
    on: controller
    shell: touch "at-gate-{{ inventory_hostname }}"; i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
  - name: motd
    upload: {src: files/motd, dest: "{{ home }}/motd", mode: "0640"}
  - name: conf
    template: {src: templates/app.conf.j2, dest: "{{ home }}/app.conf"}
  - name: per-host
    upload: {src: "files/{{ 'mo' ~ 'td' }}", dest: "{{ home }}/per-host"}
"""


def test_sources_gone_from_disk_before_their_tasks_still_reach_the_hosts(clean_ssh_hosts: list[SSHHost],
                                                                         tmp_path: Path) -> None:
    """The files are removed while every host waits at a controller step; the workers send the copies
    the controller read when the run was set up. A templated path is read when its task is sent (after the
    gate): gone by then from the controller and from the workers' disk (the same one here), it fails."""
    hosts = clean_ssh_hosts
    (tmp_path / "files").mkdir()
    (tmp_path / "templates").mkdir()
    motd = tmp_path / "files" / "motd"
    motd.write_bytes(b"maintenance tonight\n\x00\xff binary too\n")
    conf = tmp_path / "templates" / "app.conf.j2"
    conf.write_text("host={{ inventory_hostname }}\n")
    (tmp_path / "pb.yml").write_text(PLAYBOOK)
    write_inventory(tmp_path / "inventory.yml", hosts, {h.name: {"home": str(h.home)} for h in hosts})
    write_known_hosts(tmp_path / "known_hosts", hosts)
    proc = subprocess.Popen([sys.executable, "-m", "runbook", "run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts",
                             "--audit-log", str(tmp_path / "audit.jsonl"), "--format", "json", "--cluster", "local:2"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"at-gate-{h.name}").exists() for h in hosts):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the hosts did not reach the gate"
            time.sleep(0.05)
        motd.unlink()
        conf.unlink()
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err   # the templated path's tasks failed, nothing else
    results = {(r["host"], r["step_id"]): r for r in json.loads(out)["results"]}
    for h in hosts:
        assert results[(h.name, "motd")]["status"] == "changed" and results[(h.name, "motd")]["worker"]
        assert results[(h.name, "conf")]["status"] == "changed"
        assert (h.home / "motd").read_bytes() == b"maintenance tonight\n\x00\xff binary too\n"
        assert oct((h.home / "motd").stat().st_mode & 0o777) == "0o640"
        assert (h.home / "app.conf").read_text() == f"host={h.name}\n"
        failed = results[(h.name, "per-host")]
        assert failed["status"] == "failed" and "cannot read" in failed["message"], failed
        assert not (h.home / "per-host").exists()


ELSEWHERE = """\
runbook: sources-from-the-controller
steps:
  - name: pick
    shell: echo motd
    register: pick
  - name: motd
    upload: {src: files/motd, dest: "{{ home }}/motd"}
  - name: conf
    template: {src: templates/app.conf.j2, dest: "{{ home }}/app.conf"}
  - name: per-host
    upload: {src: "files/{{ inventory_hostname }}.conf", dest: "{{ home }}/mine.conf"}
  - name: by-register
    copy: {src: "files/{{ pick.stdout | trim }}", dest: "{{ home }}/picked"}
  - name: per-item
    copy: {src: "files/{{ item }}", dest: "{{ home }}/{{ item }}"}
    loop: [a.txt, b.txt]
  - name: by-facts
    upload: {src: "files/{{ facts.user }}.txt", dest: "{{ home }}/by-facts"}
"""


def test_workers_that_cannot_see_the_playbook_directory_get_every_source_from_the_controller(
        clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    """Running workers in mount namespaces where the playbook directory is empty: untemplated sources, and
    templated ones rendered with each task's registers and loop items, all come from the controller. A path
    that reads facts no task has gathered yet is left to the worker, which cannot read it (and says so)."""
    hosts = clean_ssh_hosts
    pbdir = tmp_path / "pb"
    (pbdir / "files").mkdir(parents=True)
    (pbdir / "templates").mkdir()
    (pbdir / "files" / "motd").write_bytes(b"maintenance tonight\n")
    (pbdir / "templates" / "app.conf.j2").write_text("host={{ inventory_hostname }}\n")
    for h in hosts:
        (pbdir / "files" / f"{h.name}.conf").write_text(f"only for {h.name}\n")
        (pbdir / "files" / f"{h.user}.txt").write_text("by facts\n")
    (pbdir / "files" / "a.txt").write_text("item a\n")
    (pbdir / "files" / "b.txt").write_text("item b\n")
    (pbdir / "pb.yml").write_text(ELSEWHERE)
    write_inventory(pbdir / "inventory.yml", hosts, {h.name: {"home": str(h.home)} for h in hosts})
    write_known_hosts(pbdir / "known_hosts", hosts)
    cluster = start_cluster(tmp_path, {"far-1": None, "far-2": None}, hide=pbdir)
    try:
        proc = cli("run", "pb.yml", "-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log",
                   str(tmp_path / "audit.jsonl"), "--format", "json", "--cluster", cluster.address, cwd=pbdir, timeout=180)
    finally:
        cluster.stop()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]   # by-facts failed, nothing else
    results = {(r["host"], r["step_id"]): r for r in json.loads(proc.stdout)["results"]}
    for h in hosts:
        for step in ("motd", "conf", "per-host", "by-register", "per-item"):
            assert results[(h.name, step)]["status"] == "changed", results[(h.name, step)]
            assert results[(h.name, step)]["worker"] in {"far-1", "far-2"}
        assert (h.home / "motd").read_bytes() == b"maintenance tonight\n"
        assert (h.home / "app.conf").read_text() == f"host={h.name}\n"
        assert (h.home / "mine.conf").read_text() == f"only for {h.name}\n"
        assert (h.home / "picked").read_bytes() == b"maintenance tonight\n"
        assert (h.home / "a.txt").read_text() == "item a\n" and (h.home / "b.txt").read_text() == "item b\n"
        failed = results[(h.name, "by-facts")]
        assert failed["status"] == "failed" and "cannot read" in failed["message"], failed
        assert not (h.home / "by-facts").exists()
