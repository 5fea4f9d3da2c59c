"""The self-contained HTML page: server-rendered summary, inline CSS and JS, the data as embedded JSON.

Every text that reaches the page passes through one of two doors: `_Text.esc` (redacted, then
HTML-escaped) for the server-rendered part, `_Text.red` for the JSON payload, which is then
escaped by `embed_json` so that nothing inside it can end the `<script>` element.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from runbook.audit import Redactor
from runbook.report import svg
from runbook.report.model import (
    PLAN_LABELS, PLAN_PREDICTIONS, RUN_STATUSES, SHOWN_STATUSES, PlanReview, RunReport, TaskEntry,
)

OUTPUT_KEEP = 3000          # characters kept from each end of stdout/stderr (the middle is omitted)
OUTPUT_BUDGET = 8_000_000   # characters of stdout and stderr in one report; past it every output keeps less
DIFF_KEEP = 20000           # characters of a diff
NOSCRIPT_ROWS = 200         # failed tasks listed for readers without JavaScript
HOSTS_SHOWN = 200           # host bars drawn server-side (most troubled first); the strip above shows every host
_FLAG_RESCUE, _FLAG_IGNORED, _FLAG_FROM_RUN, _FLAG_MISMATCH, _FLAG_CHANGED, _FLAG_LOOP = 1, 2, 4, 8, 16, 32


def asset(name: str) -> str:
    """The text of a packaged asset (CSS, JS) under runbook/report/assets/."""
    return resources.files("runbook.report").joinpath("assets", name).read_text(encoding="utf-8")


def embed_json(data: Any) -> str:
    """JSON safe inside `<script type="application/json">`: no `<`, `>`, `&` or line separators in clear."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    # Inside JSON these only occur in strings, where the \\u escapes mean the same characters.
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(script: str, style: str) -> str:
    """A policy that allows only this page's own inline script and style and forbids every request."""
    return (f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; img-src data:; "
            "connect-src 'none'; font-src 'none'; media-src 'none'; object-src 'none'; frame-src 'none'; "
            "worker-src 'none'; manifest-src 'none'; base-uri 'none'; form-action 'none'")


class _Text:
    """Redaction and escaping, the one way text gets into the page."""

    def __init__(self, redactor: Redactor | None):
        self._r = redactor if redactor is not None and redactor.secrets else None

    def red(self, value: Any) -> str:
        """Redacted text (None as empty)."""
        text = "" if value is None else str(value)
        return self._r.redact_text(text) if self._r else text

    def opt(self, value: Any) -> str | None:
        """Redacted text, or None for empty values (keeps the payload small)."""
        return self.red(value) if value not in (None, "") else None

    def esc(self, value: Any) -> str:
        """Redacted and HTML-escaped."""
        return html.escape(self.red(value), quote=True)


def fmt_time(ts: float | None) -> str:
    """Epoch seconds as `2026-11-23 18:00:03Z`."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "—"


def fmt_duration(seconds: float | None) -> str:
    """A duration for people: 850 ms, 12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def split_hint(message: str) -> tuple[str, str | None]:
    """A located error message and its hint (`...\\n  hint: ...`), as RunbookError renders them."""
    error, sep, hint = message.partition("\n  hint: ")
    return (error, hint) if sep else (message, None)


def clip(text: str, keep: int) -> tuple[str, str | None, int]:
    """Head, tail (None when the text is short) and the number of characters omitted between them."""
    if len(text) <= 2 * keep + 200:
        return text, None, 0
    return text[:keep], text[-keep:], len(text) - 2 * keep


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _code(text: str) -> str:
    return f"<code>{text}</code>" if text else "—"


def _counts_html(totals: Mapping[str, int], order: Sequence[str], always: Sequence[str], labels: Mapping[str, str]) -> str:
    chips = [f'<button type="button" class="count st-{k}" data-status="{k}"><b>{totals.get(k, 0)}</b> {labels.get(k, k)}</button>'
             for k in order if totals.get(k) or k in always]
    return '<div class="counts">' + "".join(chips) + "</div>"


def _host_section(hosts: Sequence[str], per_host: Mapping[str, Counter[str]], order: Sequence[str], t: _Text,
                  labels: Mapping[str, str]) -> str:
    rank = {k: i for i, k in enumerate(order)}
    position = {h: i for i, h in enumerate(hosts)}

    def badness(h: str) -> tuple[int, int]:
        worst = min((rank[k] for k, n in per_host.get(h, {}).items() if n), default=len(order))
        return (worst, position[h])

    ordered = sorted(hosts, key=badness)
    shown = ordered[:HOSTS_SHOWN]
    more, strip = "", ""
    if len(ordered) > len(shown):
        # Thousands of text rows cost the browser seconds; the strip (drawn by the script) shows every host.
        strip = '<div id="hoststrip" class="hoststrip"></div>'
        more = (f'<p class="note">The {len(shown)} most troubled of {len(ordered)} hosts; the strip above has every '
                "host (point at it, click to filter), and the table filters by host.</p>")
    return (f'<h3>Per host <span class="note">({len(hosts)} hosts, most troubled first)</span></h3>{strip}'
            f'<div class="hostbox">{svg.host_bars_svg(shown, per_host, order, t.red, labels)}</div>{more}')


def _document(title: str, kind: str, body: str, payload: dict[str, Any]) -> str:
    script, style = asset("report.js"), asset("report.css")
    # Task details (outputs, diffs: most of the bytes) come after the script, so the page is usable
    # while the browser still reads them; the script takes them up once the document is parsed.
    details = {"strs": payload.pop("strs"), "det": payload.pop("det")}
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{content_security_policy(script, style)}">'
            '<meta name="referrer" content="no-referrer"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="runbook"><title>{title}</title><link rel="icon" href="data:,">'
            f"<style>{style}</style></head>\n<body class=\"kind-{kind}\">\n{body}\n"
            f'<script type="application/json" id="report-data">{embed_json(payload)}</script>\n'
            f"<script>{script}</script>\n"
            f'<script type="application/json" id="report-details">{embed_json(details)}</script>\n</body></html>\n')


# --- the run report --------------------------------------------------------------------------------

def render_run(report: RunReport, redactor: Redactor | None = None) -> str:
    """The run report as one self-contained HTML document."""
    t = _Text(redactor)
    h = report.header
    counted = [task for task in report.tasks if task.counted]   # as the console's recap counts
    totals = Counter(task.outcome for task in counted)
    per_host: dict[str, Counter[str]] = {host: Counter() for host in report.hosts}
    per_step: dict[str, Counter[str]] = {s.id: Counter() for s in report.steps}
    for task in counted:
        per_host[task.host][task.outcome] += 1
        per_step[task.step][task.outcome] += 1
    order = [*RUN_STATUSES, *sorted(set(totals) - set(RUN_STATUSES))]
    labels = {k: k.replace("_", " ") for k in order}
    title = t.esc(f"{h.playbook_name} · run {h.run_id} · {h.status}")
    payload = run_payload(report, t, order, labels)
    notes = [] if payload["keep"] >= OUTPUT_KEEP else [
        f"outputs are shortened to their first and last {payload['keep']} characters to keep this file small; "
        "the run-state file and the audit trail have more"]
    body = "".join([
        _run_header(report, t, notes),
        '<main>',
        f'<section id="summary"><h2>Outcome</h2>{_counts_html(totals, order, SHOWN_STATUSES, labels)}'
        f'{svg.total_bar_svg(totals, order)}{_host_section(report.hosts, per_host, order, t, labels)}</section>',
        _commands(report, t), _events(report, t),
        f'<section id="graph"><h2>Step graph <span class="note">each step coloured by its outcome on every host; '
        f'click a step to filter the table</span></h2><div class="graphbox">'
        f'{svg.graph_svg(report.steps, per_step, order, t.red, labels)}</div></section>',
        '<section id="timeline"><h2>Timeline <span class="note">one row per host, a bar per task</span></h2>'
        '<div id="timeline-box"><noscript><p class="note">The timeline needs JavaScript.</p></noscript></div></section>',
        '<section id="results"><h2>Results</h2><div id="filters"></div><div id="table"></div>'
        f'<noscript>{_noscript_failed(report, t)}</noscript><div id="detail" hidden></div></section>',
        '</main>', _footer(report.runbook_version, report.generated_at),
    ])
    return _document(title, "run", body, payload)


def _run_header(report: RunReport, t: _Text, extra_notes: Sequence[str] = ()) -> str:
    h = report.header
    audit = h.audit
    exit_text = "—" if h.exit_code is None else f'<b class="exit exit-{h.exit_code}">{h.exit_code}</b> {t.esc(h.exit_meaning)}'
    rows = [
        ("playbook", f"<b>{t.esc(h.playbook_name)}</b> {_code(t.esc(h.playbook_path))}"),
        ("run", f"{_code(t.esc(h.run_id))} {t.esc(h.mode)}" + (f" of {_code(t.esc(h.resumed_from))}" if h.resumed_from else "")),
        ("operator", t.esc(h.operator) + (f" on {t.esc(h.control_host)}" if h.control_host else "")),
        ("inventory", _code(t.esc(h.inventory_source)) + f" ({len(report.hosts)} hosts)"),
        ("started", fmt_time(h.started_at)), ("finished", fmt_time(h.finished_at)),
        ("duration", fmt_duration(h.duration)), ("exit code", exit_text),
        ("window", t.esc(h.window or "none") + (f' <span class="warn">{t.esc(h.window_note)}</span>' if h.window_note else "")),
        ("plan", _code(t.esc(h.plan_hash)) if h.plan_hash else "—"),
        ("audit chain", f'<span class="audit audit-{audit.state}">{audit.state.replace("_", " ")}</span> {t.esc(audit.detail)}'),
        ("host keys", t.esc(h.host_key_checking or "—")),
    ]
    if h.stop_reason:
        rows.append(("stopped", f'<span class="warn">{t.esc(h.stop_reason)}</span>'))
    if h.git_commit:
        rows.append(("git commit", _code(t.esc(h.git_commit))))
    if h.limit or h.tags or h.skip_tags:
        rows.append(("selection", t.esc(" ".join(filter(None, [f"--limit {h.limit}" if h.limit else "",
                                                                *[f"--tags {x}" for x in h.tags],
                                                                *[f"--skip-tags {x}" for x in h.skip_tags]])))))
    if h.extra_vars:
        rows.append(("extra vars", _code(t.esc(", ".join(f"{k}={v}" for k, v in h.extra_vars.items())))))
    notes = "".join(f'<p class="note warn">{t.esc(n)}</p>' for n in [*h.notes, *extra_notes])
    return (f'<header><h1><span class="badge status-{t.esc(h.status)}">{t.esc(h.status)}</span> {t.esc(h.playbook_name)}'
            f' <span class="sub">run report</span></h1>{_kv(rows)}{notes}</header>')


def _commands(report: RunReport, t: _Text) -> str:
    if not report.resume_command:
        return ""
    return ('<section id="commands"><h2>Continue this run</h2><p>Failed, unreachable, deferred and never started '
            f'tasks run again; finished ones are skipped:</p><pre class="cmd">{t.esc(report.resume_command)}</pre></section>')


def _events(report: RunReport, t: _Text) -> str:
    if not report.events:
        return ""
    items = [f'<li class="ev ev-{e.level}"><span class="when">{fmt_time(e.at)}</span> <b>{e.kind}</b>'
             + (f" {t.esc(e.host)}" if e.host else "") + (f" · {t.esc(e.step_id)}" if e.step_id else "")
             + f": {t.esc(e.message)}</li>" for e in report.events[:300]]
    more = f"<li>… {len(report.events) - 300} more in the audit trail</li>" if len(report.events) > 300 else ""
    return f'<section id="events"><h2>Events</h2><ul class="events">{"".join(items)}{more}</ul></section>'


def _noscript_failed(report: RunReport, t: _Text) -> str:
    failed = [x for x in report.tasks if x.status in ("failed", "drift", "unreachable")][:NOSCRIPT_ROWS]
    if not failed:
        return '<p class="note">No task failed. The interactive table needs JavaScript.</p>'
    rows = "".join(f"<tr><td>{t.esc(x.host)}</td><td>{t.esc(x.step_id)}</td><td>{x.status}</td>"
                   f"<td><pre>{html.escape(split_hint(t.red(x.message))[0] or t.red(x.stderr)[-500:])}</pre></td></tr>" for x in failed)
    return ('<p class="note">Failed tasks (the interactive table needs JavaScript):</p><table class="plain">'
            f"<tr><th>host</th><th>step</th><th>status</th><th>error</th></tr>{rows}</table>")


def _footer(version: str, generated: float) -> str:
    return f'<footer>runbook {html.escape(version)} · generated {fmt_time(generated)} · self-contained: no network</footer>'


def output_keep(outputs: Sequence[tuple[str, str]]) -> int:
    """Characters kept from each end of an output, so that all outputs of a report fit its budget."""
    total = sum(len(a) + len(b) for a, b in outputs)
    if total <= OUTPUT_BUDGET:
        return OUTPUT_KEEP
    count = sum(bool(a) + bool(b) for a, b in outputs)
    return max(100, min(OUTPUT_KEEP, OUTPUT_BUDGET // max(1, 2 * count)))


def _task_detail(task: TaskEntry, t: _Text, step_action: str, out: str, err: str, keep: int) -> dict[str, Any] | None:
    """The detail of one task, with only the fields it has (most tasks have few: the payload stays small)."""
    d: dict[str, Any] = {}
    if task.action != step_action:
        d["a"] = task.action
    if task.command:
        d["c"] = t.red(task.command)
    if task.rc is not None:
        d["rc"] = task.rc
    if task.message:
        d["m"], hint = split_hint(t.red(task.message))
        if hint:
            d["hi"] = hint
    for text, (head_key, tail_key, omitted_key) in ((out, ("o", "ot", "oo")), (err, ("e", "et", "eo"))):
        if text:
            head, tail, omitted = clip(text, keep)
            d[head_key] = head
            if tail is not None:
                d[tail_key], d[omitted_key] = tail, omitted
    if task.diff:
        d["df"] = t.red(task.diff)[:DIFF_KEEP]
    if task.from_run:
        d["fr"] = t.red(task.from_run)
    if task.prediction:
        d["p"] = task.prediction
        if task.prediction_reason:
            d["pr"] = t.red(task.prediction_reason)
    return d or None


# Detail fields whose repeated values are stored once in the payload's string table.
_INTERNED = ("c", "m", "hi", "o", "ot", "e", "et", "df", "pr", "r")
_INTERNED_SET = frozenset(_INTERNED)


def intern_details(details: list[dict[str, Any] | None]) -> list[str]:
    """Replace text that occurs in more than one detail by its index in a shared table (commands, messages repeat per host)."""
    seen: Counter[str] = Counter()
    for d in details:
        if d:
            seen.update(v for k, v in d.items() if k in _INTERNED_SET)
    index: dict[str, int] = {}
    table: list[str] = []
    for d in details:
        if not d:
            continue
        for k, v in d.items():
            if k in _INTERNED_SET and seen[v] > 1:
                if v not in index:
                    index[v] = len(table)
                    table.append(v)
                d[k] = index[v]
    return table


def run_payload(report: RunReport, t: _Text, order: Sequence[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """The data the page's script works on: columns for the table and timeline, details per task."""
    code = {k: i for i, k in enumerate(order)}
    host_ix = {h: i for i, h in enumerate(report.hosts)}
    step_ix = {s.id: i for i, s in enumerate(report.steps)}
    t0 = report.header.started_at or min((x.started_at for x in report.tasks if x.started_at), default=0.0)
    cols: dict[str, list[int]] = {"h": [], "s": [], "st": [], "a": [], "b": [], "d": [], "f": [], "it": []}
    item_ix: dict[str, int] = {}   # loop items' labels, each stored once
    details = []
    outputs = [(t.red(x.stdout), t.red(x.stderr)) for x in report.tasks]   # redacted before any cut
    keep = output_keep(outputs)
    for x, (out, err) in zip(report.tasks, outputs):
        cols["h"].append(host_ix[x.host])
        cols["s"].append(step_ix[x.step])
        cols["it"].append(item_ix.setdefault(x.item_label, len(item_ix)) if x.parent is not None and x.item_label else -1)
        cols["st"].append(code[x.outcome])
        cols["a"].append(x.attempts)
        cols["b"].append(round((x.started_at - t0) * 1000) if x.started_at and not x.from_run else -1)
        cols["d"].append(round(x.duration * 1000))
        cols["f"].append((_FLAG_RESCUE if x.rescue else 0) | (_FLAG_IGNORED if x.ignored else 0)
                         | (_FLAG_FROM_RUN if x.from_run else 0) | (_FLAG_MISMATCH if x.mismatch else 0)
                         | (_FLAG_CHANGED if x.changed else 0) | (0 if x.counted else _FLAG_LOOP))
        details.append(_task_detail(x, t, report.steps[step_ix[x.step]].action, out, err, keep))
    h = report.header
    end = (h.finished_at - t0) * 1000 if h.finished_at and t0 else max(
        (b + d for b, d in zip(cols["b"], cols["d"]) if b >= 0), default=0)
    return {"v": 1, "kind": "run", "statuses": list(order), "labels": dict(labels),
            "hosts": [t.red(x) for x in report.hosts], "steps": _steps_payload(report.steps, t),
            "t0": t0, "span": max(1, round(end)), "run_id": t.red(h.run_id), "mode": h.mode,
            "predicted": any(x.prediction for x in report.tasks), "keep": keep, "cols": cols,
            "items": [t.red(label) for label in item_ix],
            "strs": intern_details(details), "det": details}


def _steps_payload(steps: Sequence[Any], t: _Text) -> list[dict[str, Any]]:
    return [{"id": t.red(s.id), "name": t.red(s.name), "action": s.action, "section": s.section} for s in steps]


# --- the plan review page -------------------------------------------------------------------------

def render_plan(review: PlanReview, redactor: Redactor | None = None) -> str:
    """The plan review page as one self-contained HTML document."""
    t = _Text(redactor)
    labels = [e.label for e in review.entries]
    totals = Counter(labels)
    per_host: dict[str, Counter[str]] = {h: Counter() for h in review.hosts}
    per_step: dict[str, Counter[str]] = {s.id: Counter() for s in review.steps}
    for e, label in zip(review.entries, labels):
        per_host[e.host][label] += 1
        per_step[e.step_id][label] += 1
    order = [*PLAN_PREDICTIONS, *sorted(set(totals) - set(PLAN_PREDICTIONS))]
    names = {k: PLAN_LABELS.get(k, k.replace("_", " ")) for k in order}
    h = review.header
    body = "".join([
        _plan_header(review, t, totals),
        "<main>",
        f'<section id="summary"><h2>Predictions</h2>{_counts_html(totals, order, ("change", "unknown"), names)}'
        f"{svg.total_bar_svg(totals, order)}{_unreachable(review, t)}{_host_section(review.hosts, per_host, order, t, names)}</section>",
        '<section id="commands"><h2>Apply exactly this plan</h2><p>apply refuses when the playbook, inventory, '
        f'extra vars or hosts changed since the plan:</p><pre class="cmd">{t.esc(review.apply_command)}</pre></section>',
        f'<section id="graph"><h2>Step graph <span class="note">each step coloured by its predictions across hosts</span></h2>'
        f'<div class="graphbox">{svg.graph_svg(review.steps, per_step, order, t.red, names)}</div></section>',
        '<section id="results"><h2>Per host and step</h2><div id="filters"></div><div id="table"></div>'
        f'<noscript>{_noscript_changes(review, t)}</noscript><div id="detail" hidden></div></section>',
        "</main>", _footer(review.runbook_version, review.generated_at),
    ])
    title = t.esc(f"plan review · {h.playbook_name} · {h.created_at}")
    return _document(title, "plan", body, plan_payload(review, t, order, names))


def _plan_header(review: PlanReview, t: _Text, totals: Mapping[str, int]) -> str:
    h = review.header
    rows = [
        ("playbook", f"<b>{t.esc(h.playbook_name)}</b> {_code(t.esc(h.playbook_path))}"),
        ("planned by", f"{t.esc(h.operator)} on {t.esc(h.control_host)}, {t.esc(h.created_at)}"),
        ("plan file", _code(t.esc(h.plan_file)) + ' <span class="audit audit-ok">hash verified</span>'),
        ("plan hash", _code(t.esc(h.plan_hash))), ("playbook hash", _code(t.esc(h.playbook_hash))),
        ("inventory", _code(t.esc(h.inventory_source)) + f" ({len(review.hosts)} hosts), hash {_code(t.esc(h.inventory_hash))}"),
        ("extra vars hash", _code(t.esc(h.extra_vars_hash))),
        ("host keys", t.esc(h.host_key_checking or "—")), ("dry run", _code(t.esc(h.run_id))),
    ]
    if h.limit or h.tags or h.skip_tags:
        rows.append(("selection", t.esc(" ".join(filter(None, [f"--limit {h.limit}" if h.limit else "",
                                                                *[f"--tags {x}" for x in h.tags],
                                                                *[f"--skip-tags {x}" for x in h.skip_tags]])))))
    if h.extra_vars:
        rows.append(("extra vars", _code(t.esc(", ".join(f"{k}={v}" for k, v in h.extra_vars.items())))))
    for path, digest in sorted(h.local_files.items()):
        rows.append(("local file", f"{_code(t.esc(path))} sha256 {_code(t.esc(digest[:16]))}"))
    changes = totals.get("change", 0)
    status = "changes" if changes else "no-changes"
    return (f'<header><h1><span class="badge status-{status}">{changes} change(s)</span> {t.esc(h.playbook_name)}'
            f' <span class="sub">plan review</span></h1>{_kv(rows)}</header>')


def _unreachable(review: PlanReview, t: _Text) -> str:
    if not review.unreachable:
        return ""
    items = "".join(f"<li><b>{t.esc(h)}</b>: {t.esc(r)}</li>" for h, r in review.unreachable.items())
    return f'<h3>Unreachable during the dry run</h3><ul class="events">{items}</ul>'


def _noscript_changes(review: PlanReview, t: _Text) -> str:
    rows = [e for e in review.entries if e.label in ("change", "fail", "unknown", "gate")][:NOSCRIPT_ROWS]
    body = "".join(f"<tr><td>{t.esc(e.host)}</td><td>{t.esc(e.step_id)}</td><td>{PLAN_LABELS.get(e.label, e.label)}</td>"
                   f"<td>{t.esc(e.reason)}</td></tr>" for e in rows)
    return ('<p class="note">Changes, gates and unknowns (the interactive table needs JavaScript):</p><table class="plain">'
            f"<tr><th>host</th><th>step</th><th>prediction</th><th>reason</th></tr>{body}</table>")


def plan_payload(review: PlanReview, t: _Text, order: Sequence[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """The plan page's data: host, step and prediction columns, and each prediction's reason, command and diff."""
    code = {k: i for i, k in enumerate(order)}
    host_ix = {h: i for i, h in enumerate(review.hosts)}
    step_ix = {s.id: i for i, s in enumerate(review.steps)}
    cols: dict[str, list[int]] = {"h": [], "s": [], "st": []}
    details: list[dict[str, Any] | None] = []
    for e in review.entries:
        cols["h"].append(host_ix[e.host])
        cols["s"].append(step_ix[e.step_id])
        cols["st"].append(code[e.label])
        d = {"a": e.action if e.action != review.steps[step_ix[e.step_id]].action else None, "r": t.opt(e.reason), "c": t.opt(e.command),
             "df": t.red(e.diff)[:DIFF_KEEP] if e.diff else None, "ro": e.read_only or None}
        details.append({k: v for k, v in d.items() if v is not None} or None)
    return {"v": 1, "kind": "plan", "statuses": list(order), "labels": dict(labels),
            "hosts": [t.red(x) for x in review.hosts], "steps": _steps_payload(review.steps, t),
            "run_id": t.red(review.header.run_id), "cols": cols, "strs": intern_details(details), "det": details}


def write_html(text: str, path: str, announce: Callable[[str], None] | None = None) -> None:
    """Write a page atomically (readers never see half of it)."""
    from pathlib import Path

    from runbook.state import write_atomic

    write_atomic(Path(path), text)
    if announce is not None:
        announce(path)
