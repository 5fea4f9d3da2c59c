"""Dry run on the local machine: the read-only connection, predictions per action, plan files and their refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runbook.audit import read_records
from runbook.cli import main
from runbook.connections.local import LocalConnection
from runbook.errors import PlanFileError, ReadOnlyViolation
from runbook.connections import ReadOnlyConnection
from runbook.plan import canonical, load_plan, sha256_text
from runbook.runner import run


def cli(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run `runbook ARGS` in process and return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


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
