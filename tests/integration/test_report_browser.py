"""Reports of real runs on sshd test hosts, opened in a real browser (Debian's headless Chromium).

One browser for the module; each test opens its page in a fresh context and fails on any console
error, uncaught exception or request other than the page file itself. Screenshots are saved under
$RUNBOOK_TEST_ARTIFACTS (or a pytest tmp dir) for people to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.audit import Redactor
from runbook.cli import main
from runbook.report.render import render_run
from tests.helpers import cli
from tests.sshd import SSHHost, write_inventory, write_known_hosts
from tests.test_report import HOSTILE, report

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SECRET = "tok-9f8e7d6c5b4a-report"

PLAYBOOK = {
    "runbook": "report-demo",
    "secrets": {"api_token": "env:REPORT_DEMO_TOKEN"},
    "steps": [
        {"name": "greet", "shell": 'echo "deploying with {{ api_token }}"'},
        {"name": "write config", "template": {"src": "app.conf.j2", "dest": "{{ dir }}/app.conf"}},
        {"name": "flaky", "needs": ["greet"], "retries": 2, "delay": "0.1s",
         "shell": "test -e {{ dir | quote }}/.flaky || { touch {{ dir | quote }}/.flaky; echo first attempt fails >&2; exit 1; }"},
        {"name": "optional", "needs": ["greet"], "when": "host.name == 'nohost'", "shell": "echo never"},
        {"name": "disk check", "needs": ["flaky"],
         "shell": 'if [ {{ host.name | quote }} = h1 ]; then echo "disk full on /var ({{ api_token }})" >&2; exit 3; fi; echo fine'},
        {"name": "finish", "needs": ["disk-check", "write-config"], "shell": "echo done"},
    ],
    "on_failure": [{"name": "page on-call", "on": "controller", "shell": "echo paging for {{ host.name | quote }}"}],
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from /usr/bin (never a downloaded build), one for the module, with a fresh profile."""
    missing = None if os.access(CHROMIUM, os.X_OK) else f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "the playwright package is not installed (pip install -e '.[dev]')"
    if missing:
        if _in_ci():
            pytest.fail(missing + "; CI=true forbids skipping the browser tests")
        pytest.skip(missing)
    with sync_playwright() as p:
        # launch() gives the browser a new temporary --user-data-dir of its own, removed on close.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $RUNBOOK_TEST_ARTIFACTS, else a pytest tmp dir."""
    target = os.environ.get("RUNBOOK_TEST_ARTIFACTS")
    path = Path(target) / "report" if target else tmp_path_factory.mktemp("report-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Watched:
    """A page with everything that went wrong on it: console errors, exceptions, requests."""

    page: Any
    url: str
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.problems == []
        assert [u for u in self.requests if u != self.url] == []


def open_page(browser: Any, path: Path, *, javascript: bool = True, **context: Any) -> Watched:
    """Open a report file in a fresh context and watch it."""
    ctx = browser.new_context(java_script_enabled=javascript, viewport={"width": 1280, "height": 900}, **context)
    page = ctx.new_page()
    w = Watched(page, path.resolve().as_uri())
    page.on("console", lambda m: w.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: w.problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (w.problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: w.requests.append(r.url))
    page.goto(w.url)
    if javascript:
        page.wait_for_selector("body[data-ready]", timeout=15000)
    return w


def close(w: Watched) -> None:
    w.page.context.close()


@pytest.fixture(scope="module")
def real_runs(ssh_hosts: list[SSHHost], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run with a failure, a retry, a skip, a diff and a secret on the sshd hosts; its reports and plan page."""
    for h in ssh_hosts:
        h.clear_home()
    work = tmp_path_factory.mktemp("report-run")
    write_inventory(work / "inventory.yml", ssh_hosts, host_vars={h.name: {"dir": str(h.home)} for h in ssh_hosts})
    write_known_hosts(work / "known_hosts", ssh_hosts)
    (work / "app.conf.j2").write_text("listen = 8080\nserver_name = {{ host.name }}\n")
    (work / "demo.yml").write_text(yaml.safe_dump(PLAYBOOK, sort_keys=False))
    common = ["-i", "inventory.yml", "--known-hosts", "known_hosts", "--audit-log", str(work / "trail" / "audit.jsonl")]
    env = {"REPORT_DEMO_TOKEN": SECRET}

    def ok(proc: Any, *codes: int) -> None:
        assert proc.returncode in codes, proc.stderr

    ok(cli("plan", "demo.yml", *common, "--out", "plan.json", env=env, cwd=work), 0)
    ok(cli("run", "demo.yml", *common, "--report", "run.html", env=env, cwd=work), 2)
    # The commands that only read files run in this process (no SSH, and a second less each).
    assert main(["show", str(work / "plan.json"), "--html", str(work / "plan.html")]) == 0
    assert main(["report", "latest", "--audit-log", str(work / "trail" / "audit.jsonl"), "-o", str(work / "files.html")]) == 0
    return {"run": work / "run.html", "files": work / "files.html", "plan": work / "plan.html", "work": work}


@pytest.mark.ssh
def test_run_report_filter_failed_and_read_its_stderr(browser: Any, real_runs: dict[str, Path], artifacts: Path) -> None:
    text = real_runs["run"].read_text()
    assert SECRET not in text and "http://" not in text and "https://" not in text
    w = open_page(browser, real_runs["run"])
    page = w.page
    assert page.locator("svg.graph g.node").count() == len(PLAYBOOK["steps"]) + len(PLAYBOOK["on_failure"])
    assert page.locator("header").inner_text().count("report-demo") >= 1
    page.screenshot(path=str(artifacts / "run-report.png"), full_page=True)
    page.click("#filters button[data-status=failed]")
    rows = page.locator("#table .row:visible")
    assert rows.count() == 1
    assert "h1" in rows.first.inner_text() and "disk-check" in rows.first.inner_text()
    rows.first.click()
    stderr = page.locator("#detail pre.stderr").inner_text()
    assert "disk full on /var (***)" in stderr
    assert "exit code 3" in page.locator("#detail").inner_text()
    assert SECRET not in page.content()
    page.locator("#detail").screenshot(path=str(artifacts / "run-report-failed-task.png"))
    w.assert_clean()
    close(w)


@pytest.mark.ssh
def test_report_from_files_shows_retry_diff_skip_and_the_audit_chain(browser: Any, real_runs: dict[str, Path],
                                                                     artifacts: Path) -> None:
    w = open_page(browser, real_runs["files"])
    page = w.page
    assert "chain intact" in page.locator("header").inner_text()
    assert "runbook resume " in page.locator("#commands").inner_text()
    page.select_option("#f-step", label="flaky")
    flaky = page.locator("#table .row:visible")
    assert flaky.count() == 3 and "2 ×" in flaky.first.inner_text()
    page.select_option("#f-step", label="write-config — write config")
    page.locator("#table .row:visible").first.click()
    assert page.locator("#detail pre.diff .add").first.inner_text().startswith("+listen = 8080")
    page.click("#filters .reset")
    page.fill("#f-search", "when:")
    page.locator("#f-count", has_text="3 of").wait_for()
    assert "skipped" in page.locator("#table .row:visible").first.inner_text()
    page.click("#filters .reset")
    page.click(".counts .count[data-status=rescued]")
    assert page.locator("#table .row:visible").count() == 1
    # The timeline: find h1's failed bar by pointing along its row (row 2: axis 20 px, rows 22 px), then click it.
    page.click("#filters .reset")
    page.locator("#timeline-box canvas").scroll_into_view_if_needed()
    box = page.locator("#timeline-box canvas").bounding_box()
    y = box["y"] + 20 + 22 + 11
    found = None
    for x in range(int(box["x"] + box["width"]) - 2, int(box["x"] + 150), -3):   # from the end: it failed late
        page.mouse.move(x, y)
        tip = page.locator("#timeline-box .tip")
        if tip.is_visible() and tip.inner_text().startswith("h1 · disk-check"):
            found = x
            break
    assert found is not None, "no bar for h1's failed task on the timeline"
    assert "failed" in page.locator("#timeline-box .tip").inner_text()
    page.mouse.click(found, y)
    assert page.locator("#detail h3").inner_text().startswith("disk check on h1")
    page.screenshot(path=str(artifacts / "run-report-from-files.png"), full_page=True)
    w.assert_clean()
    close(w)


@pytest.mark.ssh
def test_plan_review_page(browser: Any, real_runs: dict[str, Path], artifacts: Path) -> None:
    assert SECRET not in real_runs["plan"].read_text()
    w = open_page(browser, real_runs["plan"])
    page = w.page
    assert f"runbook apply {real_runs['work'] / 'plan.json'}" in page.locator("#commands").inner_text()
    assert "hash verified" in page.locator("header").inner_text()
    page.click("#filters button[data-status=change]")
    page.locator("#table .row:visible").first.click()
    assert page.locator("#detail pre.diff .add").count() >= 1
    page.screenshot(path=str(artifacts / "plan-review.png"), full_page=True)
    w.assert_clean()
    close(w)


@pytest.mark.ssh
def test_summary_is_readable_without_javascript(browser: Any, real_runs: dict[str, Path]) -> None:
    w = open_page(browser, real_runs["run"], javascript=False)
    body = w.page.locator("body").inner_text()
    assert "report-demo" in body and "exit code" in body and "1 failed" in body
    assert "disk-check" in w.page.locator("#results table.plain").inner_text()
    assert w.page.locator("svg.graph g.node").count() == 7
    w.assert_clean()
    close(w)


def test_hostile_data_stays_data_in_the_browser(browser: Any, tmp_path: Path) -> None:
    rep = report(hosts=2, steps=2, text=HOSTILE)
    rep.tasks[-1].stderr = HOSTILE + " secret-value-123"
    path = tmp_path / "hostile.html"
    path.write_text(render_run(rep, Redactor(["secret-value-123"])))
    w = open_page(browser, path)
    page = w.page
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("#table .row").first.inner_text().startswith("h0</script>")
    page.click("#filters button[data-status=failed]")
    page.locator("#table .row:visible").first.click()
    assert page.locator("#detail pre.stderr").inner_text() == HOSTILE + " ***"
    w.assert_clean()
    close(w)


def test_many_hosts_virtual_rows_and_aggregated_timeline(browser: Any, tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "many.html"
    path.write_text(render_run(report(hosts=800, steps=4)))
    w = open_page(browser, path)
    page = w.page
    assert page.locator("#table .row").count() < 80                 # 3,200 tasks, a screenful of rows
    assert "rows of" in page.locator("#timeline-box p.note").inner_text()
    page.click("#filters button[data-status=failed]")
    assert page.locator("#f-count").inner_text() == "1 of 3200 tasks"
    page.click("#filters .reset")
    page.locator("#table .tbody").evaluate("b => { b.scrollTop = b.scrollHeight; b.dispatchEvent(new Event('scroll')); }")
    page.locator("#table .row:visible", has_text="h799").first.wait_for()
    page.locator("#timeline-box canvas").scroll_into_view_if_needed()
    page.mouse.move(600, page.locator("#timeline-box canvas").bounding_box()["y"] + 60)
    assert page.locator("#timeline-box .tip").inner_text().startswith("hosts ")
    page.emulate_media(media="print")
    page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
    assert page.locator("#print-rows tr").count() == 3002              # header, 3,000 rows, "more"
    assert not page.locator("#filters").is_visible()
    page.screenshot(path=str(artifacts / "many-hosts-print.png"))
    w.assert_clean()
    close(w)



def test_loop_items_show_as_rows_of_their_step(browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop's items follow their step's row as `step[label]` (a label is data, even a hostile one); the
    status chips count them as the outcome totals do, not the step over them."""
    monkeypatch.chdir(tmp_path)
    label = "<img src=x onerror=window.__pwned=1>"
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    h0: {ansible_connection: local}\n")
    (tmp_path / "loop.yml").write_text(yaml.safe_dump({"runbook": "loop-page", "steps": [
        {"name": "each", "shell": "test {{ item | quote }} != bad", "loop": ["one", "bad", label], "ignore_errors": True},
        {"name": "after", "shell": "true"}]}, sort_keys=False))
    assert main(["run", "loop.yml", "-i", "inv.yml", "--audit-log", "audit.jsonl", "--report", "loop.html"]) == 0
    w = open_page(browser, tmp_path / "loop.html")
    page = w.page
    assert page.locator("svg.graph g.node").count() == 2
    names = [r.split("\t")[0].split("\n")[1] for r in page.locator("#table .row").all_inner_texts()]
    assert names == ["each", "each[one]", "each[bad]", f"each[{label}]", "after"]
    assert page.locator("#filters button[data-status=changed]").inner_text().endswith(" 3")   # one, the label, after
    assert page.locator("#filters button[data-status=failed]").inner_text().endswith(" 1")
    page.locator("#table .row").nth(2).click()
    assert "each[bad]" in page.locator("#detail").inner_text()
    # Along h0's timeline row (axis 20 px, one 22 px row): the items' bars, not the loop's span over them.
    page.locator("#timeline-box canvas").scroll_into_view_if_needed()
    box = page.locator("#timeline-box canvas").bounding_box()
    tips = set()
    for x in range(int(box["x"] + 150), int(box["x"] + box["width"]) - 2, 2):
        page.mouse.move(x, box["y"] + 20 + 11)
        tip = page.locator("#timeline-box .tip")
        if tip.is_visible():
            tips.add(tip.inner_text().split("\n")[0])
    assert {"h0 · each[one]", "h0 · each[bad]", "h0 · after"} <= tips and "h0 · each" not in tips, tips
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    w.assert_clean()
    close(w)
