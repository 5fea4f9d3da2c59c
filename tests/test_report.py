"""The report's model, SVG and HTML without a browser: escaping, CSP, redaction, layout, reading documents."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from runbook.audit import Redactor
from runbook.errors import ValidationError
from runbook.report import data, svg
from runbook.report.model import AuditCheck, RunHeader, RunReport, StepInfo, TaskEntry, prediction_mismatch
from runbook.report.render import OUTPUT_KEEP, clip, embed_json, fmt_duration, render_run, split_hint

HOSTILE = '</script><script>window.__pwned=1</script><!-- <b>&amp; \u2028\u2029 "\' <img src=x onerror=alert(1)>'


def report(hosts: int = 2, steps: int = 3, *, text: str = "", **task_fields: object) -> RunReport:
    """A small synthetic run report: every task ok except the last step on the last host, which failed."""
    infos = [StepInfo(id=f"s{j}", name=f"step {j}{text}", action="shell", index=j, needs=[f"s{j - 1}"] if j else [])
             for j in range(steps)]
    tasks = []
    for i in range(hosts):
        for j in range(steps):
            failed = i == hosts - 1 and j == steps - 1
            tasks.append(TaskEntry(host=f"h{i}{text}", step_id=f"s{j}", action="shell", status="failed" if failed else "ok",
                                   attempts=1, started_at=1000.0 + j, finished_at=1000.5 + j, duration=0.5,
                                   command=f"echo {j}{text}", stdout=f"out {j}{text}", stderr="disk full" if failed else "",
                                   message="exit code 3" if failed else "", **task_fields))  # type: ignore[arg-type]
    header = RunHeader(run_id="20261123T180003Z-abcdef", mode="run", status="failed", playbook_name=f"pb{text}",
                       started_at=1000.0, finished_at=1000.0 + steps, exit_code=2, operator=f"alice{text}")
    return data.assemble(header, [f"h{i}{text}" for i in range(hosts)], infos, tasks, [], None, None)


class Scripts(HTMLParser):
    """Collects every element's tag and the text of each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._in: dict[str, str | None] | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in, self._buf = dict(attrs), []

    def handle_data(self, text: str) -> None:
        if self._in is not None:
            self._buf.append(text)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._in is not None:
            self.scripts.append((self._in, "".join(self._buf)))
            self._in = None


def parse(page: str) -> Scripts:
    p = Scripts()
    p.feed(page)
    return p


# --- embedding: nothing in the data can leave its <script type="application/json"> -------------------

def test_embedded_json_cannot_break_out_and_reads_back_the_same() -> None:
    payload = {"s": HOSTILE, "k" + HOSTILE: [HOSTILE, 1, None]}
    text = embed_json(payload)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == payload


def test_hostile_strings_everywhere_leave_exactly_three_scripts() -> None:
    page = render_run(report(text=HOSTILE))
    p = parse(page)
    assert [a.get("type") for a, _ in p.scripts] == ["application/json", None, "application/json"]
    assert page.count("</script>") == 3
    assert "<!--" not in page
    assert not any(tag in ("img", "iframe", "object", "embed", "base", "form") for tag, _ in p.tags)
    doc = json.loads(p.scripts[0][1])
    assert doc["hosts"][0] == "h0" + HOSTILE          # the data survives intact, as data
    assert doc["steps"][0]["name"] == "step 0" + HOSTILE
    details = json.loads(p.scripts[2][1])
    out = details["det"][0]["o"]
    assert (details["strs"][out] if isinstance(out, int) else out) == "out 0" + HOSTILE


def test_content_security_policy_allows_only_the_page_own_inline_code() -> None:
    page = render_run(report())
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert meta is not None
    policy = dict(part.strip().split(" ", 1) for part in meta.group(1).split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'none'" and policy["img-src"] == "data:"
    assert policy["base-uri"] == "'none'" and policy["form-action"] == "'none'"
    p = parse(page)
    script = p.scripts[1][1]
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)  # type: ignore[union-attr]

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert policy["script-src"] == digest(script) and policy["style-src"] == digest(style)
    assert "unsafe-inline" not in meta.group(1) and "unsafe-eval" not in meta.group(1)
    assert ' style="' not in page   # inline style attributes would be blocked by the policy


def test_page_names_no_network_resource() -> None:
    page = render_run(report())
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(?!data:|#)[a-z]+:""", page, re.I)
    assert "@import" not in page and "url(http" not in page


def test_a_url_in_the_data_stays_text() -> None:
    page = render_run(report(text=' see https://evil.example/x.js'))
    p = parse(page)
    for _, attrs in p.tags:
        assert not any(v and "evil.example" in v for k, v in attrs.items() if k in ("src", "href", "action"))


# --- redaction ------------------------------------------------------------------------------------

def test_every_string_passes_the_redactor_even_across_the_output_clip() -> None:
    secret = "hunter2-very-secret"
    long = "x" * (OUTPUT_KEEP - 5) + secret + "y" * (3 * OUTPUT_KEEP)   # the secret straddles the head's end
    rep = report(text=secret)
    rep.tasks[0].stdout = long
    rep.tasks[0].diff = "+" + "d" * 19990 + secret
    rep.header.extra_vars = {"token": secret}
    rep.header.notes.append(f"note {secret}")
    page = render_run(rep, Redactor([secret]))
    assert secret not in page
    assert "***" in page


# --- the model and documents ----------------------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "status", "mismatch"), [
    ("change", "changed", False), ("change", "ok", True), ("ok", "ok", False), ("ok", "changed", True),
    ("skip", "skipped", False), ("skip", "changed", True), ("unknown", "failed", False), ("fail", "failed", False),
    ("ok", "failed", True), (None, "failed", False),
])
def test_prediction_against_outcome(prediction: str | None, status: str, mismatch: bool) -> None:
    assert prediction_mismatch(prediction, status) is mismatch


def _state(tasks: dict[str, dict]) -> dict:
    return {"version": 1, "run_id": "R1", "mode": "apply", "status": "failed", "playbook_path": "/nowhere/pb.yml",
            "playbook_name": "pb", "hosts": ["a", "b"], "operator": "bob", "started_at": 100.0, "finished_at": 110.0,
            "exit_code": 2, "plan_hash": "abc", "tasks": tasks}


def _task(host: str, step: str, status: str, **kw: object) -> dict:
    return {"host": host, "step_id": step, "action": "shell", "status": status, "changed": status == "changed",
            "rc": 0, "stdout": "", "stderr": "", "command": "true", "message": "", "duration": 1.0, "attempts": 1,
            "started_at": 101.0, "finished_at": 102.0, "diff": None, "data": {}, **kw}


def test_report_from_a_state_file_and_audit_records() -> None:
    state = _state({"one@a": _task("a", "one", "changed"), "one@b": _task("b", "one", "failed", message="boom\n  hint: fix it"),
                    "two@a": _task("a", "two", "ok", data={"from_run": "R0"})})
    records = [
        {"event": "run.started", "run_id": "R1", "control_host": "ctl", "git_commit": "c0ffee", "hosts": ["a", "b"]},
        {"event": "task.finished", "run_id": "R1", **_task("b", "page", "changed", data={"on_failure": True})},
        {"event": "host.unreachable", "run_id": "R1", "host": "c", "reason": "refused", "timestamp": "2026-11-23T18:00:03Z"},
        {"event": "approval.granted", "run_id": "R1", "host": "a", "step_id": "one", "who": "carol"},
        {"event": "run.finished", "run_id": "R1", "exit_code": 2},
        {"event": "task.finished", "run_id": "OTHER", **_task("a", "one", "failed")},
    ]
    plan = {"hash": "abc", "predictions": [{"host": "a", "step_id": "one", "prediction": "ok", "reason": "same"},
                                           {"host": "b", "step_id": "one", "prediction": "change", "reason": "differs"}]}
    rep = data.run_report_from_files(state, records, run_id="R1", audit_path=None, state_dir=None, plan=plan)
    assert rep.header.control_host == "ctl" and rep.header.git_commit == "c0ffee"
    assert [(t.host, t.step_id, t.outcome) for t in rep.tasks] == [
        ("a", "one", "changed"), ("a", "two", "ok"), ("b", "one", "failed"), ("b", "page", "rescued")]
    by = {(t.host, t.step_id): t for t in rep.tasks}
    assert by[("a", "one")].prediction == "ok" and by[("a", "one")].mismatch
    assert by[("b", "one")].mismatch      # predicted change, failed
    assert by[("a", "two")].from_run == "R0"
    assert [e.kind for e in rep.events] == ["unreachable", "approval"]
    assert rep.resume_command == "runbook resume R1"
    assert any("playbook file is not here" in n for n in rep.header.notes)
    assert {s.id for s in rep.steps} == {"one", "two", "page"}
    assert split_hint(by[("b", "one")].message) == ("boom", "fix it")


def test_report_from_the_audit_trail_alone() -> None:
    records = [{"event": "run.started", "run_id": "R2", "mode": "plan", "playbook_name": "pb", "hosts": ["a"]},
               {"event": "task.finished", "run_id": "R2", **_task("a", "one", "unknown")},
               {"event": "run.finished", "run_id": "R2", "exit_code": 0}]
    rep = data.run_report_from_files(None, records, run_id="R2", audit_path=None, state_dir=None)
    assert rep.header.status == "ok" and rep.header.mode == "plan" and rep.resume_command is None
    assert [t.status for t in rep.tasks] == ["unknown"]
    assert any("no run-state file" in n for n in rep.header.notes)


def test_block_rescued_records_of_the_wrong_shape_mark_nothing() -> None:
    """Only a well-formed `block.rescued` record naming a failed task of its host marks it rescued."""
    records = [{"event": "run.started", "run_id": "R3", "mode": "run", "playbook_name": "pb", "hosts": ["a", "b"]},
               {"event": "task.finished", "run_id": "R3", **_task("a", "one", "failed")},
               {"event": "task.finished", "run_id": "R3", **_task("b", "one", "failed")},
               {"event": "task.finished", "run_id": "R3", **_task("a", "two", "ok")},
               {"event": "block.rescued", "run_id": "R3", "host": "a", "block": "g", "steps": ["one", "two"]},
               {"event": "block.rescued", "run_id": "R3", "host": "b", "block": "g", "steps": "one"},
               {"event": "block.rescued", "run_id": "R3", "block": "g", "steps": [{"x": 1}, None]},
               {"event": "run.finished", "run_id": "R3", "exit_code": 0}]
    rep = data.run_report_from_files(None, records, run_id="R3", audit_path=None, state_dir=None)
    assert {(t.host, t.step_id): t.outcome for t in rep.tasks} == {("a", "one"): "rescued", ("b", "one"): "failed",
                                                                    ("a", "two"): "ok"}


def test_unknown_run_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="no run `R9`"):
        data.run_report_from_files(None, [], run_id="R9", audit_path=None, state_dir=None)


@pytest.mark.parametrize("bad", [{"tasks": []}, {"tasks": {"x@a": "text"}},
                                 {"tasks": {"x@a": {**_task("a", "x", "ok"), "status": "<script>"}}},
                                 {"tasks": {"x@a": {**_task("a", "x", "ok"), "attempts": "many"}}}])
def test_malformed_state_is_a_located_error(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        data.state_tasks(bad, tmp_path / "R.json")
    assert str(tmp_path / "R.json") in str(err.value)


@pytest.mark.parametrize("run_id", ["../../etc/passwd", "a/b", "..", "x\ny", "", "-rf", "a" * 200, "R1/../R2"])
def test_run_ids_that_could_name_other_files_are_refused(run_id: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a run id"):
        data.find_state(tmp_path, run_id) if run_id else data.check_run_id(run_id)


def test_find_state_latest_prefix_and_ambiguity(tmp_path: Path) -> None:
    for name in ("20261123T180003Z-aaaaaa", "20261123T180004Z-bbbbbb", "20261124T090000Z-cccccc"):
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / ".20261125T000000Z-tmp.json").write_text("{}")   # a half-written temp file is never "latest"
    assert data.find_state(tmp_path, "latest").stem == "20261124T090000Z-cccccc"  # type: ignore[union-attr]
    assert data.find_state(tmp_path, "20261124").stem == "20261124T090000Z-cccccc"  # type: ignore[union-attr]
    assert data.find_state(tmp_path, "nothing") is None
    with pytest.raises(ValidationError, match="ambiguous"):
        data.find_state(tmp_path, "20261123")


def test_oversize_and_corrupt_documents(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(data.MAX_DOCUMENT_BYTES + 1)     # sparse: no disk used
    with pytest.raises(ValidationError, match="MiB"):
        data.read_json(big, "run state")
    bad = tmp_path / "bad.json"
    bad.write_text('{"tasks": {\n  "x": oops}')
    with pytest.raises(ValidationError) as err:
        data.read_json(bad, "run state")
    assert err.value.location is not None and err.value.location.line == 2


def test_audit_check_reports_ok_broken_and_missing(tmp_path: Path) -> None:
    from runbook.audit import AuditTrail

    trail = tmp_path / "audit.jsonl"
    t = AuditTrail(trail)
    t.append("R1", "run.started", {"hosts": []})
    t.append("R1", "run.finished", {"records": 2})
    assert data.audit_check(trail, "R1").state == "ok"
    assert data.audit_check(trail, "R2").state == "ok"
    t.append("R3", "run.started", {"hosts": []})
    assert data.audit_check(trail, "R3").state == "incomplete"
    lines = trail.read_text().splitlines()
    trail.write_text("\n".join([lines[0].replace('"hosts":[]', '"hosts":["x"]'), *lines[1:]]) + "\n")
    assert data.audit_check(trail, "R1").state == "broken"
    assert data.audit_check(tmp_path / "none.jsonl", "R1").state == "missing"
    assert data.audit_check(None, "R1") == AuditCheck(state="not_checked", detail="no audit trail for this run")


# --- the step graph ---------------------------------------------------------------------------------------

def _boxes_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) < svg.NODE_W and abs(a[1] - b[1]) < svg.NODE_H


def test_layered_layout_puts_each_step_below_what_it_needs() -> None:
    steps = [StepInfo(id="root", name="r"), StepInfo(id="left", name="l", needs=["root"]),
             StepInfo(id="right", name="r2", needs=["root"]), StepInfo(id="join", name="j", needs=["left", "right"]),
             StepInfo(id="undo", name="u", section="on_failure")]
    lay = svg.layout(steps)
    for s in steps:
        for n in s.needs:
            assert lay.pos[n][1] < lay.pos[s.id][1]
    ids = list(lay.pos)
    assert not any(_boxes_overlap(lay.pos[a], lay.pos[b]) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert lay.pos["left"][1] == lay.pos["right"][1]
    assert [b.label for b in lay.bands] == [None, "on_failure"]


def test_blocks_become_clusters_that_do_not_overlap() -> None:
    steps = [StepInfo(id="a", name="a"), StepInfo(id="b1", name="b1", needs=["a"], cluster="backup"),
             StepInfo(id="b2", name="b2", needs=["b1"], cluster="backup"), StepInfo(id="c", name="c", needs=["a"]),
             StepInfo(id="d1", name="d1", needs=["a"], cluster="deploy"), StepInfo(id="z", name="z", needs=["b2", "c", "d1"])]
    lay = svg.layout(steps)
    bands = {b.label: b for b in lay.bands}
    assert set(bands) == {None, "backup", "deploy"}
    spans = sorted((b.x0 - svg.BAND_PAD, b.x0 + b.width + svg.BAND_PAD) for b in lay.bands)
    assert all(left[1] <= right[0] for left, right in zip(spans, spans[1:]))
    for sid in ("b1", "b2"):
        b = bands["backup"]
        assert b.x0 <= lay.pos[sid][0] <= b.x0 + b.width
    page = svg.graph_svg(steps, {}, ["ok"], str)
    assert page.count('class="cluster"') == 2 and page.count('class="node ') == len(steps)


def test_graph_has_a_node_per_step_coloured_by_outcomes() -> None:
    rep = report(hosts=3, steps=4)
    page = render_run(rep)
    nodes = re.findall(r'<g class="node worst-(\w+)" data-step="(\w+)"', page)
    assert [s for _, s in nodes] == ["s0", "s1", "s2", "s3"]
    assert dict((s, w) for w, s in nodes) == {"s0": "ok", "s1": "ok", "s2": "ok", "s3": "failed"}
    assert page.count('class="edge"') == 3


def test_helpers() -> None:
    assert fmt_duration(0.25) == "250 ms" and fmt_duration(12.34) == "12.3 s" and fmt_duration(245) == "4 min 05 s"
    assert fmt_duration(3720) == "1 h 02 min" and fmt_duration(None) == "—"
    assert clip("abc", 10) == ("abc", None, 0)
    head, tail, omitted = clip("a" * 100 + "b" * 500 + "c" * 100, 100)
    assert head == "a" * 100 and tail == "c" * 100 and omitted == 500
    assert split_hint("plain") == ("plain", None)


def _payload(page: str) -> dict:
    scripts = parse(page).scripts
    return {**json.loads(scripts[0][1]), **json.loads(scripts[2][1])}


def test_outputs_share_a_budget_so_big_runs_stay_small(monkeypatch: pytest.MonkeyPatch) -> None:
    from runbook.report import render

    monkeypatch.setattr(render, "OUTPUT_BUDGET", 20_000)
    rep = report(hosts=10, steps=10)
    for i, t in enumerate(rep.tasks):
        t.stdout = f"start {i} " + "z" * 5000 + f" end {i}"
    page = render_run(rep)
    doc = _payload(page)
    assert doc["keep"] == 100
    first = doc["det"][0]
    assert first["o"].startswith("start 0 ") and first["ot"].endswith(" end 0") and first["oo"] > 4000
    assert "shortened to their first and last 100 characters" in page
    assert len(page) < 200_000


def test_repeated_texts_are_stored_once() -> None:
    rep = report(hosts=50, steps=2)
    for t in rep.tasks:
        t.command = "systemctl restart app"
    doc = _payload(render_run(rep))
    assert doc["strs"].count("systemctl restart app") == 1
    assert {d["c"] for d in doc["det"]} == {doc["strs"].index("systemctl restart app")}
    assert "a" not in doc["det"][0]       # the step's action, not repeated per task


def test_unreadable_audit_records_are_left_out_with_a_note() -> None:
    records = [{"event": "run.started", "run_id": "R3", "hosts": ["a"]},
               {"event": "task.finished", "run_id": "R3", **_task("a", "one", "ok")},
               {"event": "task.finished", "run_id": "R3", **_task("a", "two", "ok"), "status": "</script>"},
               {"event": "task.finished", "run_id": "R3", "host": "a"}]
    rep = data.run_report_from_files(None, records, run_id="R3", audit_path=None, state_dir=None)
    assert [t.step_id for t in rep.tasks] == ["one"]
    assert any("2 task record(s) of the audit trail could not be read" in n for n in rep.header.notes)
