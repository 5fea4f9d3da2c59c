"""The shipped playbooks end to end against real sshd hosts: plan, apply, effects, plan ↔ outcome, audit."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.sshd import SSHHost, free_port, write_inventory

pytestmark = pytest.mark.ssh

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
DAY = 86400

# What each prediction must become in the real run ("unknown" is checked separately, per step).
EXPECTED = {"change": {"changed"}, "ok": {"ok"}, "skip": {"skipped"}, "fail": {"failed"}, "not_run": {"not_run"}}


# --- helpers --------------------------------------------------------------------------------------

def put(host: SSHHost, rel: str, data: bytes | str, age_days: float | None = None, mode: int | None = None) -> Path:
    """Write a file into the host's home as the host's user, optionally back-dated."""
    path = host.home / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    if age_days is not None:
        t = time.time() - age_days * DAY
        os.utime(path, (t, t))
    chown_home(host)
    return path


def chown_home(host: SSHHost) -> None:
    """Give everything in the home to the host's user (tests write as root)."""
    entry = pwd.getpwnam(host.user)
    for root, dirs, files in os.walk(host.home):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Runbook:
    """Runs the real CLI (a subprocess, as an operator would) with a test-local audit trail."""

    def __init__(self, tmp: Path, known_hosts: Path):
        self.tmp = tmp
        self.known_hosts = known_hosts
        self.audit = tmp / "audit.jsonl"
        self.env = {**os.environ, "RUNBOOK_AUDIT_LOG": str(self.audit), "NO_COLOR": "1"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook", *args], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=240)

    def plan(self, playbook: Path, inventory: Path, *extra: str) -> dict:
        out = self.tmp / f"plan-{playbook.stem}-{time.monotonic_ns()}.json"
        res = self("plan", str(playbook), "-i", str(inventory), "--known-hosts", str(self.known_hosts),
                   "--out", str(out), *extra)
        assert out.exists(), f"plan failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
        return json.loads(out.read_text()) | {"_path": str(out), "_rc": res.returncode}

    def apply(self, plan: dict, *extra: str) -> tuple[int, dict]:
        res = self("apply", plan["_path"], "--known-hosts", str(self.known_hosts), "--output", "json", *extra)
        assert res.stdout.strip(), f"apply printed no JSON (rc={res.returncode}):\n{res.stderr}"
        return res.returncode, json.loads(res.stdout)

    def verify_audit(self) -> None:
        res = self("audit", "verify", "--audit-log", str(self.audit))
        assert res.returncode == 0, res.stdout + res.stderr


def predictions(plan: dict) -> dict[tuple[str, str], str]:
    """(host, step) -> prediction kind."""
    return {(p["host"], p["step_id"]): p["prediction"] for p in plan["predictions"]}


def statuses(result: dict) -> dict[tuple[str, str], str]:
    """(host, step) -> status of the real run (on_failure steps under their own ids)."""
    return {(r["host"], r["step_id"]): r["status"] for r in result["results"]}


def assert_plan_matched(plan: dict, result: dict, unknown: set[tuple[str, str]]) -> None:
    """Every prediction came true; exactly the expected tasks were unknown, and they ran."""
    got = statuses(result)
    failed_hosts = {host for (host, _), status in got.items() if status == "failed"}
    mismatches = []
    for key, kind in predictions(plan).items():
        status = got.get(key)
        if status == "not_run" and key[0] in failed_hosts:
            continue   # an earlier step of this host failed (the plan said so, or said unknown)
        if kind == "unknown":
            if key not in unknown:
                mismatches.append(f"{key}: unexpectedly unknown (ran as {status})")
            continue
        if key in unknown:
            mismatches.append(f"{key}: expected unknown, predicted {kind}")
        if status not in EXPECTED[kind]:
            why = next((f"{r.get('message')} {r.get('stderr')}" for r in result["results"]
                        if (r["host"], r["step_id"]) == key), "")
            mismatches.append(f"{key}: predicted {kind}, outcome {status}: {why}")
    assert not mismatches, "\n".join(mismatches)


def inventory(tmp: Path, hosts: list[SSHHost], host_vars: dict[str, dict] | None = None,
              extra: dict | None = None) -> Path:
    return write_inventory(tmp / "inventory.yml", hosts, host_vars, extra)


@pytest.fixture
def rb(tmp_path: Path, known_hosts: Path) -> Runbook:
    return Runbook(tmp_path, known_hosts)


# --- monitoring: health-check ---------------------------------------------------------------------

def test_health_check_reports_each_check_per_host(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    closed = free_port()
    inv = inventory(tmp_path, clean_ssh_hosts[:3], {
        h0.name: {"expected_ports": [h0.port]},          # its own sshd: listening
        h1.name: {"expected_ports": [h0.port, closed]},   # one port nobody listens on
        h2.name: {"disk_max_pct": 0},                     # any real disk is above 0%
    }, extra={  # generous limits elsewhere: other test sessions load this machine
        "load_max_per_core": 10000, "mem_min_available_pct": 0, "swap_max_pct": 100, "inode_max_pct": 100,
        "max_clock_skew": 60})
    plan = rb.plan(PLAYBOOKS / "health-check.yml", inv)
    preds = predictions(plan)
    assert preds[(h1.name, "check-expected-ports")] == "fail"
    assert preds[(h2.name, "check-disk-usage")] == "fail"
    assert all(kind in ("ok", "fail") for kind in preds.values()), {
        k: (p["prediction"], p["reason"]) for p in plan["predictions"] for k in [(p["host"], p["step_id"])]
        if p["prediction"] not in ("ok", "fail")}

    rc, result = rb.apply(plan)
    assert rc == 2 and result["exit_code"] == 2
    assert_plan_matched(plan, result, set())

    # A monitoring system reads pass/fail per check per host from the JSON.
    checks: dict[str, dict[str, bool]] = {}
    for r in result["results"]:
        if r["action"] == "assert":
            checks.setdefault(r["host"], {})[r["step_id"]] = r["status"] == "ok"
            assert r["data"]["checks"] and all(isinstance(v, bool) for v in r["data"]["checks"].values())
            assert (r["status"] == "ok") == all(r["data"]["checks"].values())
    assert set(checks[h0.name]) == {"check-disk-usage", "check-inode-usage", "check-memory", "check-load",
                                    "check-systemd-units", "check-expected-ports", "check-clock-skew"}
    assert all(checks[h0.name].values())
    assert [c for c, ok in checks[h1.name].items() if not ok] == ["check-expected-ports"]
    assert [c for c, ok in checks[h2.name].items() if not ok] == ["check-disk-usage"]
    failed_msg = next(r["message"] for r in result["results"]
                      if r["host"] == h1.name and r["step_id"] == "check-expected-ports")
    assert f"not listening: {closed}" in failed_msg and str(h0.port) not in failed_msg.split(":")[1]
    rb.verify_audit()


# --- capacity: disk-pressure ----------------------------------------------------------------------

def test_disk_pressure_frees_space_as_planned(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    log_text = "".join(f"2024-01-01T00:00:{i % 60:02d} GET /item/{i} 200\n" for i in range(8000)).encode()
    random_gz = os.urandom(100_000)
    for h in (h0, h2):
        put(h, "app/logs/old.log", log_text, age_days=10)
        put(h, "app/logs/older.log.gz", random_gz, age_days=40)
        put(h, "app/logs/recent.gz", b"keep me", age_days=1)
        put(h, "app/logs/new.log", "today\n")
        put(h, "app/tmp/stale.bin", os.urandom(60_000), age_days=5)
        put(h, "app/tmp/fresh.bin", b"in use")
    put(h1, "app/logs/old.log", log_text, age_days=10)
    # h0 and h1 are over their 1 MB budget at 20%; h2's budget is so large that it is under.
    inv = inventory(tmp_path, clean_ssh_hosts[:3], {
        h0.name: {"capacity_bytes": 1_000_000}, h1.name: {"capacity_bytes": 1_000_000},
        h2.name: {"capacity_bytes": 1_000_000_000},
    }, extra={"threshold_pct": 20})
    before = {h.name: tree_digest(h.home) for h in (h0, h1, h2)}

    plan = rb.plan(PLAYBOOKS / "disk-pressure.yml", inv)
    assert {h.name: tree_digest(h.home) for h in (h0, h1, h2)} == before, "the dry run changed a host"
    preds = predictions(plan)
    assert [preds[(h0.name, s)] for s in ("delete-compressed", "compress", "clean-scratch")] == ["change"] * 3
    assert [preds[(h1.name, s)] for s in ("delete-compressed", "compress", "clean-scratch")] == ["skip", "change", "skip"]
    assert [preds[(h2.name, s)] for s in ("delete-compressed", "compress", "clean-scratch")] == ["skip"] * 3

    rc, result = rb.apply(plan)
    assert rc == 0, result
    unknown = {(h.name, s) for h in (h0, h1) for s in ("report", "verify")}
    assert_plan_matched(plan, result, unknown)

    for h in (h0, h2):
        logs = h.home / "app/logs"
        if h is h0:
            assert not (logs / "old.log").exists() and not (logs / "older.log.gz").exists()
            assert gzip.decompress((logs / "old.log.gz").read_bytes()) == log_text
            assert not (h.home / "app/tmp/stale.bin").exists()
        else:
            assert tree_digest(h.home) == before[h.name]
        assert (logs / "recent.gz").read_bytes() == b"keep me"
        assert (logs / "new.log").read_text() == "today\n"
        assert (h.home / "app/tmp/fresh.bin").exists()
    assert gzip.decompress((h1.home / "app/logs/old.log.gz").read_bytes()) == log_text

    freed = {r["host"]: int(r["stdout"]) for r in result["results"] if r["step_id"] == "report"}
    # du counts 4 KiB blocks: allow one block of rounding per file.
    gz0 = (h0.home / "app/logs/old.log.gz").stat().st_size
    assert freed[h0.name] >= len(log_text) - gz0 + len(random_gz) + 60_000 - 3 * 4096
    assert len(log_text) - gz0 - 4096 <= freed[h1.name] < freed[h0.name]
    assert freed[h2.name] == 0
    verify = {r["host"]: r for r in result["results"] if r["step_id"] == "verify"}
    assert all(v["status"] == "ok" for v in verify.values())
    assert f"{freed[h0.name]} bytes freed" in verify[h0.name]["message"]
    rb.verify_audit()


# --- backup and restore ---------------------------------------------------------------------------

def test_backup_then_restore_round_trip(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    backups = tmp_path / "backups"
    for i, h in enumerate((h0, h1, h2)):
        put(h, "app/config/app.conf", f"name = {h.name}\nworkers = {i + 2}\n")
        put(h, "app/config/certs/key.bin", os.urandom(3000 + i))
        put(h, "app/config/with space.txt", "spaces survive\n")
    originals = {h.name: tree_digest(h.home / "app/config") for h in (h0, h1, h2)}
    # Three older backups of h0 exist; with keep: 2 the oldest two go, the newest old one stays.
    for stamp in ("20200101T000000Z-aaaaaa", "20200102T000000Z-bbbbbb", "20200103T000000Z-cccccc"):
        (backups / stamp / h0.name).mkdir(parents=True)
        (backups / stamp / h0.name / "backup.tar.gz").write_bytes(b"old")
    inv = inventory(tmp_path, clean_ssh_hosts[:3], extra={"backup_dir": str(backups), "keep": 2})

    plan = rb.plan(PLAYBOOKS / "backup.yml", inv)
    preds = predictions(plan)
    assert preds[(h0.name, "retention")] == "change"
    assert preds[(h1.name, "retention")] == preds[(h2.name, "retention")] == "skip"
    assert all(preds[(h.name, "archive")] == "change" for h in (h0, h1, h2))
    rc, result = rb.apply(plan)
    assert rc == 0, json.dumps(result["results"], indent=1)[:4000]
    unknown = {(h.name, s) for h in (h0, h1, h2)
               for s in ("fetch-archive", "fetch-manifest", "fetch-checksums", "verify-copy")}
    # cleanup is a `file: absent` of the staging directory the `staging-dir` step creates: exact
    # ("change") wherever the plan can decide its `when: not archive.skipped`, else unknown.
    cleanup = {(h.name, "cleanup") for h in (h0, h1, h2)}
    assert {preds[k] for k in cleanup} <= {"change", "unknown"}
    unknown |= {k for k in cleanup if preds[k] == "unknown"}
    assert all(preds[(h.name, "staging-dir")] == "change" for h in (h0, h1, h2))
    assert_plan_matched(plan, result, unknown)

    run_id = result["run_id"]
    assert sorted(p.name for p in backups.iterdir()) == ["20200103T000000Z-cccccc", run_id]
    for h in (h0, h1, h2):
        d = backups / run_id / h.name
        assert sorted(p.name for p in d.iterdir()) == ["backup.manifest", "backup.sha256", "backup.tar.gz"]
        assert subprocess.run(["sha256sum", "-c", "--quiet", "backup.sha256"], cwd=d).returncode == 0
        manifest = (d / "backup.manifest").read_text().splitlines()
        assert len(manifest) == 3 and all(str(h.home / "app/config") in line for line in manifest)
        assert not (h.home / ".cache/runbook-backup" / run_id).exists(), "staging files left on the host"

    # Damage: h0 edits a file, h1 loses one; h2 stays intact.
    put(h0, "app/config/app.conf", "name = broken\n")
    (h1.home / "app/config/certs/key.bin").unlink()
    put(h1, "app/config/unrelated.txt", "not in the backup\n")

    plan = rb.plan(PLAYBOOKS / "restore.yml", inv)
    preds = predictions(plan)
    assert [preds[(h.name, "extract")] for h in (h0, h1, h2)] == ["change", "change", "skip"]
    rc, result = rb.apply(plan)
    assert rc == 0, json.dumps(result["results"], indent=1)[:4000]
    unknown = {(h.name, s) for h in (h0, h1, h2) for s in ("verify-archive", "cleanup")}
    unknown |= {(h.name, "verify-files") for h in (h0, h1)}
    assert_plan_matched(plan, result, unknown)
    for h in (h0, h1, h2):
        now = tree_digest(h.home / "app/config")
        now.pop("unrelated.txt", None)
        assert now == originals[h.name], f"{h.name} not restored byte for byte"
        assert not (h.home / ".cache/runbook-restore/backup.tar.gz").exists()
    assert (h1.home / "app/config/unrelated.txt").read_text() == "not in the backup\n"
    extract = {r["host"]: r["stdout"] for r in result["results"] if r["step_id"] == "extract"}
    assert "app.conf: FAILED" in extract[h0.name] and "key.bin: FAILED" in extract[h1.name]

    # A corrupted copy on the control machine is refused before anything reaches a host.
    latest = backups / run_id / h2.name / "backup.tar.gz"
    latest.write_bytes(latest.read_bytes()[:-10] + b"0123456789")
    res = rb("run", str(PLAYBOOKS / "restore.yml"), "-i", str(inv), "--known-hosts", str(rb.known_hosts),
             "-l", h2.name, "--output", "json")
    assert res.returncode == 2
    assert statuses(json.loads(res.stdout))[(h2.name, "choose")] == "failed"
    rb.verify_audit()


# --- troubleshooting: diagnostics -----------------------------------------------------------------

def test_diagnostics_snapshot_is_read_only(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    put(h0, "app/logs/app.log", "".join(f"line {i}\n" for i in range(500)))
    put(h1, "app/logs/app.log", "only line\n")
    out = tmp_path / "diag"
    inv = inventory(tmp_path, clean_ssh_hosts[:3], extra={
        "diagnostics_dir": str(out), "log_files": ["~/app/logs/app.log"], "log_lines": 20})
    before = {h.name: tree_digest(h.home) for h in (h0, h1, h2)}

    plan = rb.plan(PLAYBOOKS / "diagnostics.yml", inv)
    assert set(predictions(plan).values()) == {"ok"}
    rc, result = rb.apply(plan)
    assert rc == 0, result
    assert_plan_matched(plan, result, set())
    assert {h.name: tree_digest(h.home) for h in (h0, h1, h2)} == before, "diagnostics changed a host"

    run_dir = out / result["run_id"]
    assert sorted(run_dir.joinpath("index.txt").read_text().split()[::2]) == sorted(h.name for h in (h0, h1, h2))
    for h in (h0, h1, h2):
        d = run_dir / h.name
        index = (d / "index.txt").read_text()
        for section in ("system", "disk", "memory", "processes", "sockets", "logs", "kernel"):
            text = (d / f"{section}.txt").read_text()
            assert f"{section}.txt {len(text.encode())} bytes" in index
        assert "Linux" in (d / "system.txt").read_text()
        assert "%CPU" in (d / "processes.txt").read_text()
        assert f":{h.port}" in (d / "sockets.txt").read_text()
    logs0 = (run_dir / h0.name / "logs.txt").read_text()
    assert "line 499" in logs0 and "line 479" not in logs0 and "line 480" in logs0
    assert "only line" in (run_dir / h1.name / "logs.txt").read_text()
    assert "(missing or not readable)" in (run_dir / h2.name / "logs.txt").read_text()
    # The dry run made the same reads: its own snapshot exists too.
    assert (out / plan["run_id"] / h0.name / "logs.txt").read_text() == logs0
    rb.verify_audit()


# --- security: ssh-hardening ----------------------------------------------------------------------

def _sshd_setup(h: SSHHost, settings: str, key_mode: int = 0o600) -> None:
    key = h.home / "sshd/hostkey"
    key.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(h.host_key_file, key)
    put(h, "sshd/sshd_config", f"Include {h.home}/sshd/conf.d/*.conf\nHostKey {key}\n{settings}")
    (h.home / "sshd/conf.d").mkdir(exist_ok=True)
    chown_home(h)
    key.chmod(key_mode)


ROLE = "ssh-hardening/"   # the playbook's work is the role roles/ssh-hardening; its step ids are namespaced


def _controls(result: dict, step: str) -> dict[str, dict[str, dict]]:
    """Per host, the results of one looped control step by setting (`ssh-hardening/audit[permitrootlogin]`)."""
    out: dict[str, dict[str, dict]] = {}
    for r in result["results"]:
        if r.get("parent") == ROLE + step:
            out.setdefault(r["host"], {})[r["item_label"]] = r
    return out


def test_ssh_hardening_audit_then_enforce_with_rollback(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    _sshd_setup(h0, "PermitRootLogin yes\nX11Forwarding yes\n")
    _sshd_setup(h1, "PermitRootLogin no\nPasswordAuthentication no\nMaxAuthTries 3\n"
                    "Ciphers aes256-gcm@openssh.com,aes128-ctr\n")
    _sshd_setup(h2, "PermitRootLogin no\nPasswordAuthentication no\nMaxAuthTries 3\n"
                    "Ciphers aes256-gcm@openssh.com\n", key_mode=0o640)
    dropins = {h.name: h.home / "sshd/conf.d/50-runbook-hardening.conf" for h in (h0, h1, h2)}
    reloads = {h.name: h.home / "sshd/reloads.log" for h in (h0, h1, h2)}
    inv = inventory(tmp_path, clean_ssh_hosts[:3], {h.name: {"dropin_path": str(dropins[h.name])} for h in (h0, h1, h2)},
                    extra={"sshd_config": "~/sshd/sshd_config",
                           # The handler's command: what it would tell sshd, written where the test can count it.
                           "reload_command": "echo reload >> ~/sshd/reloads.log"})

    # Audit: one result per control per host; exit 2 because two hosts are non-compliant.
    plan = rb.plan(PLAYBOOKS / "ssh-hardening.yml", inv)
    rc, result = rb.apply(plan)
    assert rc == 2
    assert_plan_matched(plan, result, set())
    audit = _controls(result, "audit")
    settings = {"permitrootlogin", "passwordauthentication", "permitemptypasswords", "x11forwarding", "maxauthtries",
                "ciphers", "bad_permissions"}
    assert set(audit) == {h0.name, h1.name, h2.name} and all(set(c) == settings for c in audit.values())
    assert all(r["status"] == "ok" for r in audit[h1.name].values())
    failing = {h: sorted(s for s, r in c.items() if r["status"] == "failed") for h, c in audit.items()}
    assert failing[h0.name] == ["maxauthtries", "passwordauthentication", "permitrootlogin", "x11forwarding"]
    assert failing[h2.name] == ["bad_permissions"] and "hostkey:640" in audit[h2.name]["bad_permissions"]["message"]
    assert "non-compliant: permitrootlogin is 'yes', expected equal 'no'" in audit[h0.name]["permitrootlogin"]["message"]
    assert not any(p.exists() for p in dropins.values()), "audit mode wrote a file"
    assert statuses(result)[(h1.name, "handler:" + ROLE + "reload")] == "skipped"   # nothing notified it

    # Enforce: h0 gets the drop-in; h1 already has it; h2's other drop-in breaks the whole config,
    # so its previous drop-in is rolled back byte for byte and the host stays failed.
    h2.home.joinpath("sshd/sshd_config").chmod(0o644)
    (h2.home / "sshd/hostkey").chmod(0o600)
    rendered = (PLAYBOOKS / "roles/ssh-hardening/templates/sshd-hardening.conf.j2").read_text()
    old_h2 = b"# hand-made\nMaxAuthTries 2\n"
    put(h2, "sshd/conf.d/50-runbook-hardening.conf", old_h2)
    put(h2, "sshd/conf.d/99-broken.conf", "ThisIsNotAnOption yes\n")
    first = rb.apply(rb.plan(PLAYBOOKS / "ssh-hardening.yml", inv, "-l", h1.name, "-e", "mode=enforce"))
    assert first[0] == 0, [(r["step_id"], r["status"], r["message"], r["stderr"]) for r in first[1]["results"]]
    h1_dropin = dropins[h1.name].read_bytes()
    assert b"PermitRootLogin no" in h1_dropin and b"MaxAuthTries 4" in h1_dropin
    assert reloads[h1.name].read_text() == "reload\n", "the drop-in changed: the handler reloads once"

    plan = rb.plan(PLAYBOOKS / "ssh-hardening.yml", inv, "-e", "mode=enforce")
    install = {p["host"]: p for p in plan["predictions"] if p["step_id"] == ROLE + "install"}
    assert install[h0.name]["prediction"] == "change" and "+PermitRootLogin no" in install[h0.name]["diff"]
    assert install[h1.name]["prediction"] == "ok"
    assert "-MaxAuthTries 2" in install[h2.name]["diff"] and "+MaxAuthTries 4" in install[h2.name]["diff"]
    handler = {p["host"]: p for p in plan["predictions"] if p["step_id"] == "handler:" + ROLE + "reload"}
    assert handler[h0.name]["prediction"] == "change" and "install drop-in" in handler[h0.name]["reason"]
    assert handler[h1.name]["prediction"] == "skip", handler[h1.name]   # nothing to change: no reload
    rc, result = rb.apply(plan)
    assert rc == 2
    # The candidate is rendered anew on every host (the last run removed it), so its check is unknown,
    # as is what the probe reads after that change (verify) and h2's whole-config check after its
    # install; with a block step unknown, whether the rescue runs is unknown too.
    unknown = {(h.name, ROLE + s) for h in (h0, h1, h2)
               for s in ("validate-candidate", "remove-candidate", "verify", "rollback", "enforce-failed")}
    unknown |= {(h2.name, ROLE + "validate")}
    assert_plan_matched(plan, result, unknown)
    got = statuses(result)
    assert got[(h0.name, ROLE + "verify")] == "ok" and got[(h1.name, ROLE + "verify")] == "ok"
    assert got[(h2.name, ROLE + "validate")] == "failed" and got[(h2.name, ROLE + "rollback")] == "changed"
    assert got[(h2.name, ROLE + "enforce-failed")] == "failed", "a rolled-back host is not compliant: it stays failed"
    assert "rescued_hosts" not in result   # rolled back is not rescued
    assert dropins[h0.name].read_bytes() == dropins[h1.name].read_bytes() == h1_dropin
    assert not Path(str(dropins[h0.name]) + ".candidate").exists()
    assert dropins[h2.name].read_bytes() == old_h2, "h2 was not rolled back"
    assert Path(str(dropins[h2.name]) + ".bak").read_bytes() == old_h2
    assert not Path(str(dropins[h2.name]) + ".candidate").exists()
    # The handler ran where the config changed and held (h0), not where nothing changed (h1), and
    # never on the failed host (h2), whose running sshd keeps its old settings.
    assert reloads[h0.name].read_text() == "reload\n" and reloads[h1.name].read_text() == "reload\n"
    assert not reloads[h2.name].exists(), "\n".join(f"{r['step_id']} {r['status']} {r['message']}" for r in result["results"] if r["host"] == h2.name)
    assert got[(h2.name, "handler:" + ROLE + "reload")] == "not_run"
    assert "PermitRootLogin {{ permit_root_login }}" in rendered
    rb.verify_audit()


# --- maintenance: rolling-restart -----------------------------------------------------------------

RESTART_SCRIPT = """#!/bin/sh
cd "$HOME/svc" || exit 1
if [ -f pid ] && kill -0 "$(cat pid)" 2>/dev/null; then kill "$(cat pid)"; fi
date +%s.%N >> restarts.log
nohup {server} </dev/null >server.log 2>&1 &
echo $! > pid
sleep 0.3
kill -0 "$(cat pid)" 2>/dev/null
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rolling_restart_in_batches_stops_at_max_failures(rb: Runbook, clean_ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    h0, h1, h2 = clean_ssh_hosts[:3]
    # A copy of the playbook beside a windows.yml whose `maintenance` window is always open.
    shutil.copy(PLAYBOOKS / "rolling-restart.yml", tmp_path / "rolling-restart.yml")
    (tmp_path / "windows.yml").write_text('windows:\n  maintenance: {cron: "* * * * *", duration: 2h}\n')
    ports = {h.name: free_port() for h in (h0, h1, h2)}
    for h in (h0, h1, h2):
        server = (f"python3 -m http.server {ports[h.name]} --bind 127.0.0.1 --directory \"$HOME/svc\""
                  if h is not h1 else "python3 -c 'import sys; sys.exit(1)'")   # h1's service cannot start
        put(h, "svc/restart.sh", RESTART_SCRIPT.format(server=server), mode=0o755)
        put(h, "svc/index.html", f"hello from {h.name}\n")
    drain = tmp_path / "drain"
    inv = inventory(tmp_path, clean_ssh_hosts[:3], {h.name: {"health_port": ports[h.name]} for h in (h0, h1, h2)},
                    extra={"drain_dir": str(drain), "restart_command": "sh ~/svc/restart.sh"})
    try:
        plan = rb.plan(tmp_path / "rolling-restart.yml", inv)
        preds = predictions(plan)
        for h in (h0, h1, h2):
            assert [preds[(h.name, s)] for s in ("drain", "restart", "undrain")] == ["change"] * 3
            assert preds[(h.name, "health")] == "unknown"   # nothing listens yet
        assert not drain.exists(), "the dry run ran a hook"

        rc, result = rb.apply(plan)
        assert rc == 2
        assert result["stop_reason"].startswith("max_failures exceeded")
        got = statuses(result)
        assert [got[(h0.name, s)] for s in ("drain", "restart", "health", "undrain")] == ["changed", "changed", "ok", "changed"]
        assert [got[(h1.name, s)] for s in ("drain", "restart", "health", "undrain")] == ["changed", "failed", "not_run", "not_run"]
        assert all(got[(h2.name, s)] == "not_run" for s in ("drain", "restart", "health", "undrain"))
        ran = {k: v for k, v in plan["predictions"] and predictions(plan).items() if got[k] != "not_run"}
        for key, kind in ran.items():
            if kind != "unknown" and key != (h1.name, "restart"):
                assert got[key] in EXPECTED[kind], (key, kind, got[key])

        # h0 serves again; h1 stays drained (never put back broken); h2 was never touched.
        body = urllib.request.urlopen(f"http://127.0.0.1:{ports[h0.name]}/index.html", timeout=5).read()
        assert body == f"hello from {h0.name}\n".encode()
        assert _pid_alive(int((h0.home / "svc/pid").read_text()))
        assert not (drain / h0.name).exists() and (drain / h1.name).exists() and not (drain / h2.name).exists()
        assert not (h2.home / "svc/restarts.log").exists()
        # One host at a time: h0 was back in rotation before h1 was drained.
        events = [line.split() for line in (drain / "events.log").read_text().splitlines()]
        assert [(e[1], e[2]) for e in events] == [(h0.name, "drain"), (h0.name, "undrain"), (h1.name, "drain")]
        assert float(events[0][0]) < float(events[1][0]) < float(events[2][0])
        rb.verify_audit()
    finally:
        for h in (h0, h1, h2):
            pidfile = h.home / "svc/pid"
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
