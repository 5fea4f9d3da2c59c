"""Preparing a run: secrets, host-key policy, run identity (no SSH needed)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from runbook.errors import PlaybookError
from runbook.inventory import Inventory
from runbook.loader import parse_playbook
from runbook.runner import RunRequest, host_key_mode, new_run_id, prepare, resolve_secrets


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RB_T_TOKEN", "tok-123")
    write(tmp_path / "pw.txt", "s3cret-pw\n")
    pb = parse_playbook(textwrap.dedent("""\
        runbook: t
        secrets: {token: env:RB_T_TOKEN, pw: file:pw.txt}
        steps: [{name: a, shell: "true"}]
        """), str(tmp_path / "pb.yml"))
    assert resolve_secrets(pb) == {"token": "tok-123", "pw": "s3cret-pw"}   # file relative to the playbook


def test_missing_secret_sources_are_located_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RB_T_MISSING", raising=False)
    pb = parse_playbook(textwrap.dedent("""\
        runbook: t
        secrets:
          token: env:RB_T_MISSING
          pw: file:nope.txt
        steps: [{name: a, shell: "true"}]
        """), str(tmp_path / "pb.yml"))
    with pytest.raises(PlaybookError) as exc:
        resolve_secrets(pb)
    probs = exc.value.problems
    assert [(p.location.line, "RB_T_MISSING" in p.message or "nope.txt" in p.message) for p in probs] == [(3, True), (4, True)]
    assert "export RB_T_MISSING" in (probs[0].hint or "")


def test_host_key_mode_precedence(tmp_path: Path) -> None:
    inv = Inventory.from_text("all:\n  hosts:\n    a: {host_key_checking: accept-new}\n")
    hosts = inv.select("all")
    plain = parse_playbook("runbook: t\nsteps: [{name: a, shell: 'true'}]\n", "pb.yml")
    strict_pb = parse_playbook("runbook: t\nhost_key_checking: strict\nsteps: [{name: a, shell: 'true'}]\n", "pb.yml")
    assert host_key_mode(RunRequest(), plain, []) == "strict"                      # the safe default
    assert host_key_mode(RunRequest(), plain, hosts) == "accept-new"               # inventory setting
    assert host_key_mode(RunRequest(), strict_pb, hosts) == "strict"               # playbook beats inventory
    assert host_key_mode(RunRequest(host_key_checking="off"), strict_pb, hosts) == "off"   # the flag beats both


def test_prepare_redacts_secret_looking_extra_vars(tmp_path: Path) -> None:
    pb = write(tmp_path / "pb.yml", """\
        runbook: t
        hosts: all
        steps: [{name: a, shell: "true"}]
        """)
    inv = write(tmp_path / "inv.yml", """\
        all:
          hosts:
            local1: {ansible_connection: local, db_password: hunter22}
        """)
    prepared = prepare(pb, str(inv), RunRequest(extra_vars={"api_token": "tok-999", "n": 3}, operator="alice"))
    info = prepared.info
    assert info.extra_vars == {"api_token": "***", "n": 3} and info.operator == "alice"
    assert info.hosts == ["local1"] and info.host_key_checking == "strict" and len(info.playbook_hash) == 64
    assert prepared.redactor.redact_text("pw hunter22 tok tok-999") == "pw *** tok ***"
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", info.run_id)


def test_run_ids_are_unique_and_sortable() -> None:
    ids = [new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(a[:16] <= b[:16] for a, b in zip(ids, ids[1:]))
