"""Dry run on the local machine: the read-only connection, predictions per action, plan files and their refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from runbook.audit import read_records
from runbook.connections.local import LocalConnection
from runbook.errors import PlanFileError, ReadOnlyViolation
from runbook.connections import ReadOnlyConnection
from runbook.plan import canonical, load_plan, sha256_text
from runbook.runner import run
from tests.helpers import run_main as cli


def tree(root: Path) -> dict[str, tuple]:
    """Path -> (size, mode, mtime_ns, bytes) for everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_size, st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


# --- the read-only connection ------------------------------------------------------------------

def test_read_only_connection_refuses_every_write(tmp_path: Path) -> None:
    inner = LocalConnection("local")
    inner.open()
    (tmp_path / "f").write_text("data")
    ro = ReadOnlyConnection(inner)
    with pytest.raises(ReadOnlyViolation, match="may not write"):
        ro.put(b"x", str(tmp_path / "new"), 0o644)
    with pytest.raises(ReadOnlyViolation, match="may not run"):
        ro.run(f"touch {tmp_path / 'ran'}")
    with pytest.raises(ReadOnlyViolation, match="may not run"):
        ro.run(["touch", str(tmp_path / "ran")], sudo=True)
    with pytest.raises(ReadOnlyViolation, match="only fetch in read_only"):
        ro.get(str(tmp_path / "f"), str(tmp_path / "copy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    # Reads pass through.
    assert ro.read(str(tmp_path / "f")) == b"data"
    st = ro.stat(str(tmp_path / "f"))
    assert st.exists and st.size == 4
    # Granted read-only execution (guards, read_only steps): commands run, put still never.
    guarded = ReadOnlyConnection(inner, allow_run=True)
    assert guarded.run(["cat", str(tmp_path / "f")]).stdout == "data"
    with pytest.raises(ReadOnlyViolation):
        guarded.put(b"x", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    inner.close()


# --- predictions on the local machine ---------------------------------------------------------

PREDICT_PB = """\
runbook: local-predictions
vars: {d: "{{ playbook_dir }}/target"}
steps:
  - name: probe
    read_only: true
    shell: cat {{ d | quote }}/level
    register: level
  - name: when false
    when: level.stdout | int > 5
    shell: echo high > {{ d | quote }}/high
  - name: guard creates
    shell: touch {{ d | quote }}/made
    creates: "{{ d }}/made"
  - name: guard removes
    shell: rm {{ d | quote }}/old
    removes: "{{ d }}/old"
  - name: guard unless
    shell: echo 3 > {{ d | quote }}/level
    unless: grep -qx 3 {{ d | quote }}/level
  - name: guard only_if
    shell: echo fix >> {{ d | quote }}/fixes
    only_if: test -f {{ d | quote }}/broken
  - name: unguarded
    shell: echo x >> {{ d | quote }}/log
  - name: quiet
    command: [cat, "{{ d }}/level"]
    changed_when: false
  - name: text upload
    upload: {src: files/conf.txt, dest: "{{ d }}/conf.txt", mode: "0600"}
  - name: same upload
    upload: {src: files/same.txt, dest: "{{ d }}/same.txt"}
  - name: mode only
    upload: {src: files/same.txt, dest: "{{ d }}/mode.txt", mode: "0640"}
  - name: binary upload
    upload: {src: files/blob.bin, dest: "{{ d }}/blob.bin"}
  - name: rendered
    template: {src: files/t.j2, dest: "{{ d }}/t.txt"}
  - name: fetch it
    fetch: {src: "{{ d }}/same.txt", dest: "{{ playbook_dir }}/fetched"}
  - name: wait file
    wait_for: {path: "{{ d }}/same.txt", timeout: 1}
  - name: check
    assert: {that: "level.stdout | int == 4", msg: "level is {{ level.stdout | trim }}"}
"""


@pytest.fixture
def local_pb(tmp_path: Path) -> Path:
    """A playbook over a target directory in a known state."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "conf.txt").write_text("a = 1\nb = 2\n")
    (files / "same.txt").write_text("same\n")
    (files / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (files / "t.j2").write_text("level={{ level.stdout | trim }}\n")
    d = tmp_path / "target"
    d.mkdir()
    (d / "level").write_text("4\n")
    (d / "made").write_text("")
    (d / "conf.txt").write_text("a = 1\nb = 1\n")
    (d / "same.txt").write_text("same\n")
    (d / "mode.txt").write_text("same\n")
    (d / "mode.txt").chmod(0o644)
    (d / "blob.bin").write_bytes(b"\xff" * 10)
    (d / "t.txt").write_text("level=3\n")
    pb = tmp_path / "pb.yml"
    pb.write_text(PREDICT_PB)
    return pb


def test_local_predictions_per_action(local_pb: Path, tmp_path: Path) -> None:
    before = tree(tmp_path / "target")
    result = run(local_pb, None, mode="plan", audit_log=tmp_path / "audit" / "a.jsonl")
    got = {r.step_id: (r.prediction, r.message) for r in result.results}
    kinds = {sid: kind for sid, (kind, _) in got.items()}
    assert kinds == {
        "probe": "ok", "when-false": "skip", "guard-creates": "skip", "guard-removes": "skip",
        "guard-unless": "change", "guard-only-if": "skip", "unguarded": "unknown", "quiet": "ok",
        "text-upload": "change", "same-upload": "ok", "mode-only": "change", "binary-upload": "change",
        "rendered": "change", "fetch-it": "change", "wait-file": "ok", "check": "ok"}
    assert got["when-false"][1] == "when: `level.stdout | int > 5` is false"
    assert got["guard-creates"][1].startswith("creates: ") and got["guard-creates"][1].endswith("made exists")
    assert got["guard-removes"][1].endswith("old does not exist")
    assert got["guard-unless"][1].startswith("would run: unless: `grep -qx 3")
    assert got["guard-only-if"][1].startswith("only_if: `test -f") and "failed (rc=1)" in got["guard-only-if"][1]
    assert "cannot be predicted without running it" in got["unguarded"][1]
    assert got["quiet"][1].startswith("changed_when: false")
    assert got["text-upload"][1] == "content differs, mode 0644 -> 0600"
    assert got["mode-only"][1] == "mode 0644 -> 0640"
    assert got["same-upload"][1] == "checksum and mode match"
    assert got["fetch-it"][1].startswith("would fetch 5 bytes")
    assert got["check"][1] == "all assertions passed"
    diffs = {r.step_id: r.diff for r in result.results}
    assert diffs["text-upload"].splitlines()[2:] == ["@@ -1,2 +1,2 @@", " a = 1", "-b = 1", "+b = 2"]
    assert diffs["binary-upload"].startswith(f"binary or large file {tmp_path}/target/blob.bin: 10 bytes, sha256 ")
    assert "-> 300 bytes" in diffs["binary-upload"]
    assert "-level=3\n+level=4\n" in diffs["rendered"]      # read_only register fed the template
    assert tree(tmp_path / "target") == before
    assert not (tmp_path / "fetched").exists()


def test_assert_that_would_fail_and_gates_are_predicted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: gates\nvars: {n: 3}\nsteps:\n"
                  "  - name: ask\n    approve: {prompt: \"proceed with {{ n }}?\"}\n"
                  "  - name: check\n    assert: {that: n > 5, msg: \"n is only {{ n }}\"}\n"
                  "  - name: after\n    shell: echo hi\n")
    code, out, err = cli(capsys, "plan", pb, "--audit-log", tmp_path / "a.jsonl")
    assert code == 2, err
    lines = [ln for ln in out.splitlines() if ln.startswith("  ") and not ln.startswith("   ")]
    assert lines[0] == '  ! ask  gate — gate: the real run stops here and asks "proceed with 3?"'
    assert lines[1] == "  ! check  would fail — would fail: n is only 3"
    assert lines[2] == "  · after  not reached — upstream step `check` would fail"


# --- plan files: the refusals ------------------------------------------------------------------

WRITE_PB = """\
runbook: write
steps:
  - name: write
    shell: echo ran >> {{ playbook_dir }}/ran.txt
    creates: "{{ playbook_dir }}/never"
"""


@pytest.fixture
def saved(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh plan file of a playbook that appends to ran.txt when it runs."""
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    pb = tmp_path / "pb.yml"
    pb.write_text(WRITE_PB)
    code, out, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert "+ write  change" in out
    return tmp_path / "plan.json"


def rehash(doc: dict) -> dict:
    """Recompute a plan's hash (over everything but the hash and the signature), as a tool forging a consistent file would."""
    doc["hash"] = sha256_text(canonical({k: v for k, v in doc.items() if k not in ("hash", "signature")}))
    return doc


def refused(capsys: pytest.CaptureFixture[str], plan: Path, *extra: str) -> str:
    """Apply a plan that must be refused: exit 4, nothing run, nothing started in the audit trail."""
    audit = Path(os.environ["RUNBOOK_AUDIT_LOG"])
    started = len([r for r in read_records(audit) if r.get("event") == "run.started"])
    code, out, err = cli(capsys, "apply", plan, "-y", *extra)
    assert code == 4, err
    assert not (plan.parent / "ran.txt").exists()
    assert len([r for r in read_records(audit) if r.get("event") == "run.started"]) == started
    return err


def test_a_good_plan_applies(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "apply", saved, "-y")
    assert code == 0, err
    assert (saved.parent / "ran.txt").read_text() == "ran\n"
    started = [r for r in read_records(Path(os.environ["RUNBOOK_AUDIT_LOG"])) if r.get("event") == "run.started"]
    assert started[-1]["mode"] == "apply" and started[-1]["plan_hash"] == json.loads(saved.read_text())["hash"]


def test_corrupt_plan_is_refused(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved.write_text(saved.read_text()[:200])
    err = refused(capsys, saved)
    assert "corrupt plan file" in err and str(saved) in err


def test_foreign_files_are_refused(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved.write_text(json.dumps({"predictions": []}))
    assert "not a runbook plan file" in refused(capsys, saved)
    assert "plan file not found" in refused(capsys, saved.with_name("missing.json"))


@pytest.mark.parametrize("field,value", [("runbook_version", "0.0.1-other"), ("version", 99)])
def test_plan_from_another_version_is_refused(saved: Path, capsys: pytest.CaptureFixture[str],
                                              field: str, value: object) -> None:
    doc = json.loads(saved.read_text())
    doc[field] = value
    saved.write_text(json.dumps(rehash(doc)))
    err = refused(capsys, saved)
    assert "plan made by runbook" in err and str(value) in err and "plan again with this version" in err


def test_plan_edited_by_hand_is_refused(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A reviewer's "no change" turned into "change" after the review, or the reverse: both refused.
    doc = json.loads(saved.read_text())
    doc["predictions"][0]["prediction"] = "skip"
    saved.write_text(json.dumps(doc))
    assert "modified after it was made (hash mismatch)" in refused(capsys, saved)


def test_old_plan_is_refused_with_its_age_and_the_limit(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(saved.read_text())
    doc["created_ts"] -= 30 * 3600
    saved.write_text(json.dumps(rehash(doc)))
    err = refused(capsys, saved)
    assert "plan is 30.0 h old (limit 24 h)" in err and "--max-age" in err
    err = refused(capsys, saved, "--max-age", "2h")
    assert "(limit 2 h)" in err
    assert "--max-age" in refused(capsys, saved, "--max-age", "soon")
    # A longer limit accepts it, and it runs.
    code, _, err = cli(capsys, "apply", saved, "-y", "--max-age", "48h")
    assert code == 0, err
    assert (saved.parent / "ran.txt").read_text() == "ran\n"


def test_load_plan_age_uses_the_given_clock(saved: Path) -> None:
    doc = load_plan(str(saved))
    assert load_plan(str(saved), now=doc["created_ts"] + 3600, max_age=3601)["hash"] == doc["hash"]
    with pytest.raises(PlanFileError, match="old"):
        load_plan(str(saved), now=doc["created_ts"] + 3600, max_age=3599)


def test_show_renders_a_saved_plan_even_when_old(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(saved.read_text())
    doc["created_ts"] -= 90 * 24 * 3600
    saved.write_text(json.dumps(rehash(doc)))
    code, out, _ = cli(capsys, "show", saved)
    assert code == 0
    assert "Plan for write" in out and "+ write  change" in out and "Plan: 1 change, 0 unknown" in out
    # But an edited one is refused by show too.
    doc["operator"] = "someone-else"
    saved.write_text(json.dumps(doc))
    code, _, err = cli(capsys, "show", saved)
    assert code == 4 and "hash mismatch" in err


def test_apply_refuses_when_an_uploaded_file_changed_after_the_review(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The reviewed diff was made from the old content; applying the new one would send unreviewed bytes.
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.conf").write_text("workers = 8\n")
    (tmp_path / "files" / "motd.j2").write_text("hi {{ inventory_hostname }}\n")
    (tmp_path / "app.conf").write_text("workers = 4\n")
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: up\nsteps:\n"
                  "  - name: conf\n    upload: {src: files/app.conf, dest: \"{{ playbook_dir }}/app.conf\"}\n"
                  "  - name: motd\n    template: {src: files/motd.j2, dest: \"{{ playbook_dir }}/motd\"}\n")
    code, out, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0 and "+workers = 8" in out, err
    (tmp_path / "files" / "app.conf").write_text("workers = 666\n")
    (tmp_path / "files" / "motd.j2").write_text("owned\n")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 4
    assert f"file {tmp_path}/files/app.conf changed since the plan" in err
    assert f"file {tmp_path}/files/motd.j2 changed since the plan" in err
    assert (tmp_path / "app.conf").read_text() == "workers = 4\n" and not (tmp_path / "motd").exists()
    (tmp_path / "files" / "app.conf").write_text("workers = 8\n")
    (tmp_path / "files" / "motd.j2").write_text("hi {{ inventory_hostname }}\n")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert (tmp_path / "app.conf").read_text() == "workers = 8\n"


def test_a_plan_file_missing_a_field_is_refused_naming_it(tmp_path: Path) -> None:
    from runbook import __version__
    from runbook.documents import PLAN_FORMAT, PLAN_VERSION
    from runbook.errors import PlanFileError

    body = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "runbook_version": __version__, "created_ts": 0}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**body, "hash": sha256_text(canonical(body))}))
    with pytest.raises(PlanFileError, match="malformed plan file: `created_at`"):
        load_plan(str(path), max_age=float("inf"))


# --- saved plans are tamper-proof: the kept playbook, signatures, safety settings, -e hashes ---------

EVIL_PB = WRITE_PB.replace("echo ran", "echo owned")
KEY = "plan-key-0123456789abcdef-rbp"


def key_file(path: Path, value: str = KEY, mode: int = 0o600) -> Path:
    """A plan key file the way an operator makes one (`openssl rand -hex 32 > key`: a trailing newline)."""
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def edit(plan: Path, change: Callable[[dict], object], *, rehash_it: bool = True) -> dict:
    """Change a saved plan in place, rehashing it as a forger would; returns the new document."""
    doc = json.loads(plan.read_text())
    change(doc)
    if rehash_it:
        rehash(doc)
    plan.write_text(json.dumps(doc))
    return doc


def resign(doc: dict, secret: str, key_id: str | None = None) -> dict:
    """Sign a document with a key of the forger's (HMAC-SHA256 over the canonical document, as documented)."""
    from runbook.plan import PlanKey

    body = canonical({k: v for k, v in doc.items() if k != "signature"})
    value = hmac.new(secret.encode(), b"runbook plan signature v2\0" + body.encode(), hashlib.sha256).hexdigest()
    doc["signature"] = {"alg": "hmac-sha256", "key_id": key_id or PlanKey(secret.encode(), "x").key_id, "value": value}
    return doc


@pytest.fixture
def signed(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A fresh plan of WRITE_PB signed with the key in key.txt: (plan file, key file)."""
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    (tmp_path / "pb.yml").write_text(WRITE_PB)
    key = key_file(tmp_path / "key.txt")
    code, out, err = cli(capsys, "plan", tmp_path / "pb.yml", "--out", tmp_path / "plan.json", "--sign-key", key)
    assert code == 0, err
    assert "(signed, key id " in out
    return tmp_path / "plan.json", key


def test_a_plan_keeps_the_reviewed_playbook_text_and_show_prints_it(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(saved.read_text())
    assert doc["version"] == 2 and doc["playbook"]["text"] == WRITE_PB
    assert doc["playbook"]["hash"] == hashlib.sha256(WRITE_PB.encode()).hexdigest()
    assert "signature" not in doc
    code, out, err = cli(capsys, "show", saved, "--playbook")
    assert code == 0 and out == WRITE_PB
    assert "signature: none" in err


def test_a_signed_plan_shows_and_applies_with_its_key(signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.plan import plan_key

    plan, key = signed
    doc = json.loads(plan.read_text())
    key_id = plan_key(str(key)).key_id
    assert doc["signature"]["alg"] == "hmac-sha256" and doc["signature"]["key_id"] == key_id
    # HMAC-SHA256 under the key over the canonical document without its signature, recomputed here.
    assert doc["signature"] == resign(dict(doc), KEY)["signature"]
    assert KEY not in plan.read_text()
    code, out, err = cli(capsys, "show", plan, "--sign-key", key)
    assert code == 0 and f"signature: good (key id {key_id})" in err and "+ write  change" in out
    assert KEY not in out + err
    code, _, err = cli(capsys, "apply", plan, "-y", "--sign-key", key)
    assert code == 0, err
    assert (plan.parent / "ran.txt").read_text() == "ran\n"


def _playbook_rewritten(doc: dict) -> None:
    doc["playbook"].update(text=EVIL_PB, hash=hashlib.sha256(EVIL_PB.encode()).hexdigest())


TAMPERING: dict[str, Callable[[dict], object]] = {
    "playbook text and hash": _playbook_rewritten,
    "hosts": lambda d: d.update(hosts=["local", "db1"]),
    "host key checking": lambda d: d.update(host_key_checking="off"),
    "a prediction": lambda d: d["predictions"][0].update(prediction="skip"),
    "the age": lambda d: d.update(created_ts=d["created_ts"] + 3600),
}


@pytest.mark.parametrize("what", list(TAMPERING))
def test_any_edit_of_a_signed_plan_is_refused_even_rehashed(
        signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str], what: str) -> None:
    plan, key = signed
    (plan.parent / "pb.yml").write_text(EVIL_PB)     # the edited playbook is on disk too
    edit(plan, TAMPERING[what])
    assert "plan signature does not match" in refused(capsys, plan, "--sign-key", key)
    code, _, err = cli(capsys, "show", plan, "--sign-key", key)
    assert code == 4 and "plan signature does not match" in err
    assert not (plan.parent / "ran.txt").exists()


def test_a_replayed_restripped_or_forged_signature_is_refused(
        signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.plan import plan_key

    plan, key = signed
    original = plan.read_text()
    # Replayed: a plan signed with another team's (or an attacker's own) key.
    edit(plan, lambda d: resign(rehash(d), "someone-elses-key-0123456789"), rehash_it=False)
    err = refused(capsys, plan, "--sign-key", key)
    assert "plan was signed with another key" in err and plan_key(str(key)).key_id in err
    # Forged: the right key id, a value computed with another key.
    edit(plan, lambda d: resign(rehash(d), "someone-elses-key-0123456789", plan_key(str(key)).key_id), rehash_it=False)
    assert "plan signature does not match" in refused(capsys, plan, "--sign-key", key)
    # Stripped: the signature removed and the hash made consistent.
    plan.write_text(original)
    edit(plan, lambda d: d.pop("signature"))
    err = refused(capsys, plan, "--sign-key", key)
    assert "plan is not signed, and a plan key is configured" in err
    # Malformed.
    plan.write_text(original)
    edit(plan, lambda d: d.update(signature={"alg": "none", "value": ""}))
    assert "malformed plan signature" in refused(capsys, plan, "--sign-key", key)


def test_with_a_key_configured_unsigned_plans_are_refused_by_apply_and_show(
        saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    key = key_file(tmp_path / "key.txt")
    err = refused(capsys, saved, "--sign-key", key)
    assert "plan is not signed, and a plan key is configured" in err and str(key) in err
    code, out, err = cli(capsys, "show", saved, "--sign-key", key)
    assert code == 4 and "plan is not signed" in err and out == ""
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", KEY)
    assert "plan is not signed, and a plan key is configured ($RUNBOOK_PLAN_KEY)" in refused(capsys, saved)
    with pytest.raises(PlanFileError, match="not signed"):
        load_plan(str(saved))        # the library reads the same variable
    assert KEY not in refused(capsys, saved)


def test_the_plan_key_can_come_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", KEY)
    (tmp_path / "pb.yml").write_text(WRITE_PB)
    code, _, err = cli(capsys, "plan", tmp_path / "pb.yml", "--out", tmp_path / "plan.json")
    assert code == 0, err
    plan = tmp_path / "plan.json"
    assert json.loads(plan.read_text())["signature"] == resign(json.loads(plan.read_text()), KEY)["signature"]
    # Another key in the environment: refused. None: apply refuses (it cannot check), show shows, saying so.
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", "another-key-0123456789abcdef")
    assert "plan was signed with another key" in refused(capsys, plan)
    monkeypatch.delenv("RUNBOOK_PLAN_KEY")
    assert "plan is signed, but no plan key is configured" in refused(capsys, plan)
    code, out, err = cli(capsys, "show", plan)
    assert code == 0 and "signature: NOT CHECKED" in err and "+ write  change" in out
    # A key file beats the environment.
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", "another-key-0123456789abcdef")
    code, _, err = cli(capsys, "apply", plan, "-y", "--sign-key", key_file(tmp_path / "k"))
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


@pytest.mark.parametrize("value,mode,message", [
    ("short-rbp", 0o600, "is too short (9 bytes, at least 16)"),
    (KEY, 0o640, "is accessible by other users (mode 0640)"),
    (KEY, 0o604, "is accessible by other users (mode 0604)"),
    ("x" * 5000, 0o600, "is larger than 4096 bytes"),
    ("", 0o600, "is too short (0 bytes"),
])
def test_a_weak_or_exposed_key_file_is_refused_before_anything_runs(
        saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, mode: int, message: str) -> None:
    key = key_file(tmp_path / "bad.key", value, mode)
    for args in (["plan", tmp_path / "pb.yml", "--out", tmp_path / "other.json"], ["show", saved], ["apply", saved, "-y"]):
        code, out, err = cli(capsys, *args, "--sign-key", key)
        assert code == 4 and message in err and str(key) in err, (args, err)
        assert value[:9] not in out + err or not value
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "ran.txt").exists()


def test_odd_key_sources_are_refused(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli(capsys, "apply", saved, "-y", "--sign-key", "/dev/zero")
    assert code == 4 and "is not a regular file" in err
    code, _, err = cli(capsys, "apply", saved, "-y", "--sign-key", tmp_path / "missing.key")
    assert code == 4 and "cannot read plan key file" in err
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", "")
    assert "plan key from $RUNBOOK_PLAN_KEY is too short" in refused(capsys, saved)
    monkeypatch.setenv("RUNBOOK_PLAN_KEY", "k" * 5000)
    assert "RUNBOOK_PLAN_KEY is longer than 4096 bytes" in refused(capsys, saved)


def test_the_rewritten_playbook_attack_is_refused_without_a_key(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The attack of the issue: edit the playbook, record its hash in the plan, rehash the plan.
    pb = saved.parent / "pb.yml"
    pb.write_text(EVIL_PB)
    edit(saved, lambda d: d["playbook"].update(hash=hashlib.sha256(EVIL_PB.encode()).hexdigest()))
    err = refused(capsys, saved)
    assert "the playbook text kept in the plan does not match the plan's playbook sha256" in err
    code, _, err = cli(capsys, "show", saved)       # show no longer displays it as the reviewed plan
    assert code == 4 and "does not match the plan's playbook sha256" in err
    # The kept text edited but not the hash: refused the same way.
    edit(saved, lambda d: d["playbook"].update(text=EVIL_PB, hash=hashlib.sha256(WRITE_PB.encode()).hexdigest()))
    assert "does not match the plan's playbook sha256" in refused(capsys, saved)
    assert not (saved.parent / "ran.txt").exists()


def test_apply_runs_the_kept_text_with_the_original_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The playbook file is gone on the applying machine: the reviewed text runs, its relative files
    # resolve next to the original path, and their checksums are still checked.
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.conf").write_text("workers = 8\n")
    pb = tmp_path / "pb.yml"
    pb.write_text(WRITE_PB + "  - name: conf\n    upload: {src: files/app.conf, dest: \"{{ playbook_dir }}/app.conf\"}\n")
    code, _, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0, err
    pb.unlink()
    (tmp_path / "files" / "app.conf").write_text("workers = 666\n")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 4 and f"file {tmp_path}/files/app.conf changed since the plan" in err
    (tmp_path / "files" / "app.conf").write_text("workers = 8\n")
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "ran\n" and (tmp_path / "app.conf").read_text() == "workers = 8\n"
    # An edited file on disk is not run silently either: apply says so (plan again to review the edit).
    pb.write_text(EVIL_PB)
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 4 and f"playbook {pb} changed since the plan" in err
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


def test_a_kept_text_that_fails_to_load_gives_a_located_error(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = WRITE_PB.replace("shell:", "shel:")
    edit(saved, lambda d: d["playbook"].update(text=bad, hash=hashlib.sha256(bad.encode()).hexdigest()))
    (saved.parent / "pb.yml").write_text(bad)
    err = refused(capsys, saved)
    assert f"{saved.parent / 'pb.yml'}:3:" in err and "Traceback" not in err


@pytest.mark.parametrize("level", ["off", "accept-new"])
def test_a_plan_cannot_lower_host_key_checking_without_the_flag(
        saved: Path, capsys: pytest.CaptureFixture[str], level: str) -> None:
    edit(saved, lambda d: d.update(host_key_checking=level))
    err = refused(capsys, saved)
    assert f"the plan sets host_key_checking: {level}" in err and f"--host-key-checking {level}" in err
    assert "Traceback" not in err
    # Said on the command line, it is the operator's choice (recorded in the audit trail).
    code, _, err = cli(capsys, "apply", saved, "-y", "--host-key-checking", level)
    assert code == 0, err
    started = [r for r in read_records(Path(os.environ["RUNBOOK_AUDIT_LOG"])) if r.get("event") == "run.started"]
    assert started[-1]["host_key_checking"] == level


def test_a_plan_may_raise_host_key_checking_and_garbage_is_refused(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.errors import ValidationError
    from runbook.plan import host_key_level

    assert host_key_level(None, None) == host_key_level("strict", None) == "strict"
    assert host_key_level("off", "off") == "off"
    assert host_key_level("off", "accept-new") == "accept-new"       # the flag raises a weak plan
    assert host_key_level("strict", "off") == "strict"               # the plan raises a weak flag
    assert host_key_level("accept-new", "off") == "accept-new"
    with pytest.raises(ValidationError, match="host_key_checking: accept-new"):
        host_key_level("accept-new", None)
    with pytest.raises(ValidationError, match="unknown host_key_checking"):
        host_key_level("banana", "off")
    original = saved.read_text()
    edit(saved, lambda d: d.update(host_key_checking="banana"))
    assert "malformed plan file: `host_key_checking`" in refused(capsys, saved)
    saved.write_text(original)
    code, _, err = cli(capsys, "apply", saved, "-y", "--host-key-checking", "off")
    assert code == 0, err
    started = [r for r in read_records(Path(os.environ["RUNBOOK_AUDIT_LOG"])) if r.get("event") == "run.started"]
    assert started[-1]["host_key_checking"] == "strict"


def test_an_older_plan_format_is_refused_with_a_plan_again_message(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def as_v1(doc: dict) -> None:
        doc["version"] = 1
        del doc["playbook"]["text"], doc["extra_vars_salt"], doc["extra_vars_scheme"]
        doc["extra_vars_hash"] = sha256_text(canonical({}))

    edit(saved, as_v1)
    err = refused(capsys, saved)
    assert "plan format 1" in err and "plan again" in err and "older plan formats do not keep the reviewed playbook" in err


SECRET_VAR = "hunter2-rbp-0xC0FFEE"
VARS_PB = "runbook: vars\nsteps:\n  - name: write\n    shell: echo {{ release }} >> {{ playbook_dir }}/ran.txt\n"


def _vars_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> dict:
    code, _, err = cli(capsys, "plan", tmp_path / "pb.yml", "-e", "release=7", "-e", f"db_password={SECRET_VAR}",
                       "--out", tmp_path / name, *extra)
    assert code == 0, err
    return json.loads((tmp_path / name).read_text())


def test_the_extra_vars_hash_is_salted_and_the_same_values_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from runbook.plan import extra_vars_digest

    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    (tmp_path / "pb.yml").write_text(VARS_PB)
    one, two = _vars_plan(tmp_path, capsys, "one.json"), _vars_plan(tmp_path, capsys, "two.json")
    right = {"release": "7", "db_password": SECRET_VAR}
    assert SECRET_VAR not in (tmp_path / "one.json").read_text()
    assert one["extra_vars_scheme"] == "scrypt" and len(one["extra_vars_salt"]) == 32
    # Same values, two plans: nothing in common, so one plan says nothing about another's values.
    assert one["extra_vars_salt"] != two["extra_vars_salt"] and one["extra_vars_hash"] != two["extra_vars_hash"]
    # The right guess cannot be confirmed the old way (unsalted sha256) nor with another salt.
    assert one["extra_vars_hash"] != sha256_text(canonical(right))
    assert one["extra_vars_hash"] != extra_vars_digest(right, two["extra_vars_salt"], "scrypt", None)
    # (With this plan's salt it can, at one scrypt per guess: only a plan key stops that; see below.)
    assert one["extra_vars_hash"] == extra_vars_digest(right, one["extra_vars_salt"], "scrypt", None)
    # apply: the redacted value is needed again; a wrong one is refused; the same ones apply.
    err = refused(capsys, tmp_path / "one.json")
    assert "extra vars (-e) differ from the plan's; the plan stores db_password redacted" in err
    assert "extra vars (-e) differ" in refused(capsys, tmp_path / "one.json", "-e", "release=7", "-e", "db_password=guess")
    code, _, err = cli(capsys, "apply", tmp_path / "one.json", "-y", "-e", "release=7", "-e", f"db_password={SECRET_VAR}")
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "7\n"
    # No secret among the -e values: a fast salted hash (every value is in the plan in clear anyway).
    code, _, err = cli(capsys, "plan", tmp_path / "pb.yml", "-e", "release=8", "--out", tmp_path / "three.json")
    assert code == 0, err
    three = json.loads((tmp_path / "three.json").read_text())
    assert three["extra_vars_scheme"] == "salted" and three["extra_vars_hash"] != sha256_text(canonical({"release": "8"}))
    code, _, err = cli(capsys, "apply", tmp_path / "three.json", "-y")
    assert code == 0, err


def test_with_a_plan_key_the_extra_vars_hash_is_keyed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from runbook.plan import extra_vars_digest, plan_key

    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    (tmp_path / "pb.yml").write_text(VARS_PB)
    key = key_file(tmp_path / "key.txt")
    doc = _vars_plan(tmp_path, capsys, "plan.json", "--sign-key", str(key))
    right = {"release": "7", "db_password": SECRET_VAR}
    assert doc["extra_vars_scheme"] == "keyed"
    # The right guess, with the salt, cannot be confirmed by any computation that lacks the key.
    for scheme in ("salted", "scrypt"):
        assert doc["extra_vars_hash"] != extra_vars_digest(right, doc["extra_vars_salt"], scheme, None)
    assert doc["extra_vars_hash"] != sha256_text(canonical(right))
    assert doc["extra_vars_hash"] == extra_vars_digest(right, doc["extra_vars_salt"], "keyed", plan_key(str(key)))
    err = refused(capsys, tmp_path / "plan.json", "--sign-key", key, "-e", "release=7", "-e", "db_password=guess")
    assert "extra vars (-e) differ" in err
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y", "--sign-key", key,
                       "-e", "release=7", "-e", f"db_password={SECRET_VAR}")
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "7\n"


def test_a_playbook_holding_a_secret_value_is_not_kept_and_runs_checked_from_disk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    pb = tmp_path / "pb.yml"
    pb.write_text(f"# the old token was {SECRET_VAR}\n" + WRITE_PB)
    extra = ["-e", f"api_token={SECRET_VAR}"]
    code, _, err = cli(capsys, "plan", pb, *extra, "--out", tmp_path / "plan.json")
    assert code == 0, err
    text = (tmp_path / "plan.json").read_text()
    assert SECRET_VAR not in text and json.loads(text)["playbook"]["text"] is None
    code, out, _ = cli(capsys, "show", tmp_path / "plan.json", "--playbook")
    assert code == 0 and out.startswith("(not kept: the playbook held a secret value") and SECRET_VAR not in out
    original = pb.read_text()
    pb.write_text(original.replace("echo ran", "echo owned"))
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y", *extra)
    assert code == 4 and f"playbook {pb} changed since the plan" in err
    pb.write_text(original)
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y", *extra)
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


def test_a_secret_named_playbook_var_keeps_the_text_out_of_the_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RUNBOOK_PLAN_KEY", raising=False)
    pb = tmp_path / "pb.yml"
    pb.write_text(WRITE_PB.replace("steps:", f"vars: {{db_password: {SECRET_VAR}}}\nsteps:"))
    code, _, err = cli(capsys, "plan", pb, "--out", tmp_path / "plan.json")
    assert code == 0, err
    text = (tmp_path / "plan.json").read_text()
    assert SECRET_VAR not in text and json.loads(text)["playbook"]["text"] is None
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


# --- predicted `changed`/`skipped` of upstream steps reach `when` --------------------------------

RELOAD_PB = """\
runbook: reload
hosts: localhost
steps:
  - name: config
    upload: {src: app.conf, dest: "{{ playbook_dir }}/live/app.conf", mode: "0644"}
    register: config
  - name: reload
    when: config.changed
    shell: echo reloaded >> {{ playbook_dir | quote }}/reloads
  - name: report
    needs: [config]
    when: config.stdout == ''
    shell: echo {{ playbook_dir | quote }}
  - name: skipped-gate
    needs: []
    shell: echo never
    creates: "{{ playbook_dir }}/app.conf"
    register: gate
  - name: after-gate
    needs: [skipped-gate]
    when: gate.skipped
    shell: echo gated >> {{ playbook_dir | quote }}/gated
    creates: "{{ playbook_dir }}/gated"
  - name: judged
    needs: []
    shell: "true"
    creates: "{{ playbook_dir }}/never"
    changed_when: result.rc == 7
    register: judged
  - name: after-judged
    needs: [judged]
    when: not judged.changed
    shell: "true"
"""


def _reload_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                 live: str | None) -> dict[str, dict]:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    (tmp_path / "app.conf").write_text("listen 80\n")
    (tmp_path / "live").mkdir(exist_ok=True)
    if live is not None:
        (tmp_path / "live" / "app.conf").write_text(live)
        os.chmod(tmp_path / "live" / "app.conf", 0o644)
    (tmp_path / "pb.yml").write_text(RELOAD_PB)
    code, out, err = cli(capsys, "plan", tmp_path / "pb.yml", "--format", "json", "--out", tmp_path / "plan.json")
    assert code == 0, err
    return {p["step_id"]: p for p in json.loads(out)["predictions"]}


def test_when_config_changed_is_decided_when_config_is_predicted_no_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    p = _reload_plan(tmp_path, capsys, monkeypatch, live="listen 80\n")
    assert p["config"]["prediction"] == "ok"
    assert p["reload"]["prediction"] == "skip" and p["reload"]["reason"] == "when: `config.changed` is false"
    # Its output is still unknown: reading it keeps the prediction unknown, and says why.
    assert p["report"]["prediction"] == "unknown"
    assert p["report"]["reason"] == ("needs `config.stdout`, registered by `config`, which cannot run in a dry run "
                                     "(only whether it changes is predicted)")
    # A skipped upstream step is known completely; a `changed_when` expression leaves `changed` unknown.
    assert p["skipped-gate"]["prediction"] == "skip"
    assert p["after-gate"]["prediction"] == "change" and p["after-gate"]["reason"].startswith("would run: creates")
    assert p["judged"]["prediction"] == "change"
    assert p["after-judged"]["prediction"] == "unknown" and "needs `judged.changed`" in p["after-judged"]["reason"]
    # apply does what the plan said: no reload.
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert not (tmp_path / "reloads").exists()


def test_when_config_changed_follows_a_predicted_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    p = _reload_plan(tmp_path, capsys, monkeypatch, live="listen 8080\n")
    assert p["config"]["prediction"] == "change"
    assert p["reload"]["prediction"] != "skip"       # the condition holds: the step is predicted on its own terms
    assert "config" not in p["reload"]["reason"]
    code, _, err = cli(capsys, "apply", tmp_path / "plan.json", "-y")
    assert code == 0, err
    assert (tmp_path / "reloads").read_text() == "reloaded\n"
