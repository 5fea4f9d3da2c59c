"""Secret-named inventory and -e values that are lists or mappings never appear in clear, against real sshd hosts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli, records
from tests.sshd import SSHHost, write_inventory

pytestmark = pytest.mark.ssh

# Each secret is unique and long, so finding it anywhere can only mean a leak.
TOK_A = "tokA-RB-3f9c1e77aa"
TOK_B = "tokB-RB-8d2b6c44bb"
SVC_TOKEN = "svc-RB-51ce0f9d2c"
DB_PW = "dbpw-RB-7a0e3b1f5d"
CERT_BODY = "cert-RB-c0ffee1234"
HOST_PASS = "hostpass-RB-9e8d7c6b"
PIN = 73914628                          # a number under a secret name (8 digits)
X_KEY = "xkey-RB-2468ace0"
NESTED_TOK = "nested-RB-13579bdf"
SECRETS = [TOK_A, TOK_B, SVC_TOKEN, DB_PW, CERT_BODY, HOST_PASS, str(PIN), X_KEY, NESTED_TOK]

PLAYBOOK = """\
runbook: structured-secrets
steps:
  - name: use them
    shell: >-
      printf '%s\\n' {{ api_tokens | quote }} {{ svc.token | quote }} {{ db.users[0].password | quote }}
      {{ tls_secret.cert | quote }} {{ pin_secret | quote }} {{ extra.x_key | quote }}
      {{ extra.more[0].auth_token | quote }} > used.txt
  - name: echo them
    shell: >-
      echo {{ api_tokens | join(',') | quote }} {{ svc | to_json | quote }} {{ db | to_json | quote }}
      {{ tls_secret | to_json | quote }} {{ pin_secret | quote }} {{ extra | to_json | quote }}
    register: echoed
  - name: echo host pass
    shell: echo {{ host_pass | default('none') | quote }}
  - name: reuse register
    shell: echo again {{ echoed.stdout | quote }}
  - name: fail with them
    shell: echo "auth failed:" {{ api_tokens | quote }} {{ svc.token | quote }} >&2; exit 3
    ignore_errors: true
  - name: assert with them
    assert:
      that: ["'nope' in echoed.stdout"]
      msg: "expected {{ svc.token }} and {{ extra.x_key }} in {{ echoed.stdout }}"
"""

INVENTORY_VARS = {
    "api_tokens": [TOK_A, TOK_B],
    "svc": {"token": SVC_TOKEN, "url": "https://svc.example"},
    "db": {"users": [{"name": "app", "password": DB_PW}]},
    "tls_secret": {"cert": CERT_BODY, "chain": []},
    "pin_secret": PIN,
}
EXTRA = {"extra": {"x_key": X_KEY, "more": [{"auth_token": NESTED_TOK}], "note": "visible"}}


def collect_outputs(tmp_path: Path, hosts: list[SSHHost], known_hosts: Path, inventory: Path) -> dict[str, str]:
    """Run, run --output json, plan --out, show, audit show; return every text each produced."""
    playbook = tmp_path / "structured.yml"
    playbook.write_text(PLAYBOOK)
    trail = tmp_path / "audit.jsonl"
    common = [str(playbook), "-i", str(inventory), "--known-hosts", str(known_hosts), "--audit-log", str(trail),
              "-e", json.dumps(EXTRA)]
    outputs: dict[str, str] = {}
    text_run = cli("run", *common, "-v")
    outputs["run stdout+stderr"] = text_run.stdout + text_run.stderr
    json_run = cli("run", *common, "--output", "json")
    outputs["run --output json"] = json_run.stdout
    outputs["run --output json stderr"] = json_run.stderr
    plan_file = tmp_path / "plan.json"
    plan = cli("plan", *common, "--out", str(plan_file))
    outputs["plan"] = plan.stdout + plan.stderr
    outputs["plan file"] = plan_file.read_text()
    shown = cli("show", str(plan_file))
    outputs["show"] = shown.stdout + shown.stderr
    outputs["audit file"] = trail.read_text()
    table = cli("audit", "show", "--audit-log", str(trail))
    outputs["audit show"] = table.stdout + table.stderr
    for f in sorted((tmp_path / "runs").glob("*.json")):
        outputs[f"state {f.name}"] = f.read_text()
    outputs["exit codes"] = f"{text_run.returncode} {json_run.returncode} {plan.returncode}"
    return outputs


def test_structured_secrets_never_appear_in_clear(clean_ssh_hosts: list[SSHHost], known_hosts: Path,
                                                  tmp_path: Path) -> None:
    hosts = clean_ssh_hosts[:2]
    inventory = write_inventory(tmp_path / "inventory.yml", hosts, host_vars={hosts[0].name: {"host_pass": HOST_PASS}},
                                extra=INVENTORY_VARS)
    outputs = collect_outputs(tmp_path, hosts, known_hosts, inventory)

    # The secrets really reached the hosts, so a clean output means redaction, not a run that did nothing.
    for h in hosts:
        assert (h.home / "used.txt").read_text().split() == [TOK_A, TOK_B, SVC_TOKEN, DB_PW, CERT_BODY, str(PIN),
                                                              X_KEY, NESTED_TOK]
    assert outputs["exit codes"] == "2 2 0", outputs          # the assert step fails; the plan succeeds
    result = json.loads(outputs["run --output json"])
    by_step = {(r["host"], r["step_id"]): r for r in result["results"]}
    assert by_step[("h0", "echo-them")]["stdout"] == (
        '***,*** {"token": "***", "url": "https://svc.example"} {"users": [{"name": "app", "password": "***"}]} '
        '{"cert": "***", "chain": []} *** {"more": [{"auth_token": "***"}], "note": "visible", "x_key": "***"}\n')
    assert by_step[("h0", "echo-host-pass")]["stdout"] == "***\n"
    assert by_step[("h1", "echo-host-pass")]["stdout"] == "none\n"
    assert by_step[("h0", "fail-with-them")]["stderr"] == "auth failed: *** *** ***\n"
    assert "expected *** and ***" in by_step[("h0", "assert-with-them")]["message"]
    started = [r for r in records(tmp_path / "audit.jsonl") if r["event"] == "run.started"]
    assert len(started) == 3
    for r in started:
        assert r["extra_vars"] == {"extra": {"x_key": "***", "more": [{"auth_token": "***"}], "note": "visible"}}
    plan = json.loads(outputs["plan file"])
    assert plan["extra_vars"] == started[0]["extra_vars"]
    assert len([k for k in outputs if k.startswith("state ")]) == 2

    for name, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} appears in {name}"


def test_flat_secret_names_are_already_masked(clean_ssh_hosts: list[SSHHost], known_hosts: Path, tmp_path: Path) -> None:
    # The control case: top-level string secrets (masked before this change too) stay masked.
    hosts = clean_ssh_hosts[:1]
    inventory = write_inventory(tmp_path / "inventory.yml", hosts, extra={"db_password": DB_PW})
    playbook = tmp_path / "flat.yml"
    playbook.write_text("runbook: flat\nsteps:\n  - name: echo\n    shell: echo {{ db_password | quote }} {{ x_key | quote }}\n")
    trail = tmp_path / "audit.jsonl"
    run = cli("run", str(playbook), "-i", str(inventory), "--known-hosts", str(known_hosts), "--audit-log", str(trail),
              "-e", f"x_key={X_KEY}", "--output", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = json.loads(run.stdout)["results"]
    assert result["stdout"] == "*** ***\n"
    for text in (run.stdout, run.stderr, trail.read_text()):
        assert DB_PW not in text and X_KEY not in text
