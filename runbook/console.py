"""The terminal view: a live progress table on a terminal, plain lines otherwise, and the final recap."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runbook.audit import Redactor
from runbook.events import Observer, RunInfo, TaskRef
from runbook.results import RunResult, Status, TaskResult

STYLE = {"ok": "green", "changed": "yellow", "skipped": "cyan", "failed": "bold red", "unreachable": "bold magenta",
         "deferred": "blue", "drift": "bold red", "not_run": "dim", "unknown": "bold yellow"}

PLAN_MARK = {"change": ("+", "yellow", "change"), "ok": ("=", "green", "no change"), "skip": ("-", "cyan", "skip"),
             "unknown": ("?", "bold yellow", "unknown"), "fail": ("!", "bold red", "would fail"),
             "not_run": ("·", "dim", "not reached")}


def make_console(stream: TextIO | None = None, *, color: bool | None = None) -> Console:
    """A rich console for the given stream (stderr by default, so stdout stays clean for JSON)."""
    stream = stream or sys.stderr
    return Console(file=stream, force_terminal=color, no_color=color is False, highlight=False, soft_wrap=True)


class ConsoleView(Observer):
    """Shows a run as it happens: live per-host progress on a terminal, one line per task otherwise."""

    def __init__(self, console: Console, redactor: Redactor, *, verbose: bool = False, live: bool | None = None):
        self.console = console
        self.redactor = redactor
        self.verbose = verbose
        self.live_enabled = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._current: dict[str, str] = {}
        self._done: Counter[str] = Counter()
        self._total: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._mode = "run"
        self._plain = not console.is_terminal

    def _r(self, text: Any) -> str:
        return self.redactor.redact_text(str(text)) if text is not None else ""

    # --- events -------------------------------------------------------------------------------

    def run_started(self, run: RunInfo) -> None:
        self._mode = run.mode
        verb = {"plan": "Planning", "apply": "Applying plan for", "resume": "Resuming"}.get(run.mode, "Running")
        self.console.print(f"[bold]{verb} {run.playbook_name}[/] on {len(run.hosts)} host(s) "
                           f"[dim](run {run.run_id}, host keys: {run.host_key_checking})[/]")
        if run.host_key_checking == "off":
            self.console.print("[bold red]WARNING: host key checking is OFF: any machine can impersonate "
                               "these hosts and receive your commands and secrets[/]")
        for h in run.hosts:
            self._total[h] = 0
        if self.live_enabled:
            self._live = Live(self._table(), console=self.console, refresh_per_second=8, transient=True)
            self._live.start()

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        with self._lock:
            self._current[task.host] = task.step_id + (f" (attempt {task.attempt})" if task.attempt > 1 else "")
        if self.verbose and not self._live:
            self.console.print(f"[dim]{task.host}: {task.step_id} started: {self._r(task.command)}[/]")
        self._refresh()

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        with self._lock:
            self._done[result.host] += 1
            self._counts[result.status.value] += 1
            self._current.pop(result.host, None)
        if self._mode == "plan":
            self._refresh()
            return
        if result.status == Status.UNREACHABLE:
            pass  # said once per host by host_unreachable, not once per step
        elif self._live is None or result.status in (Status.FAILED, Status.DRIFT):
            self._print_result(result)
        self._refresh()

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        self._print(Text.assemble((f"{host}", "bold"), ": ", ("UNREACHABLE", STYLE["unreachable"]), f": {self._r(reason)}"))

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        self._print(f"{host}: {step_id}: {'approved' if granted else 'denied'} by {self._r(who)}")

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        style = "bold red" if level == "error" else "yellow" if level == "warning" else ""
        self._print(Text(self._r(message), style=style))

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        self._print(Text(self._r(reason), style="bold yellow"))

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._mode == "plan":
            return  # the plan itself is rendered by render_plan
        if self._plain:
            self._print(recap_text(result))
        else:
            self.console.print(recap_table(result))
        if result.stop_reason:
            self.console.print(f"[yellow]stopped: {self._r(result.stop_reason)}[/]")
        self.console.print(f"[dim]wall time {result.wall_time:.2f}s, exit code {result.exit_code()}[/]")

    # --- rendering ------------------------------------------------------------------------------

    def _print(self, renderable: Any) -> None:
        if self._live is not None:
            self._live.console.print(renderable)
        elif self._plain and isinstance(renderable, (str, Text)):
            # Not a terminal: plain lines, written directly (rich's layout costs ~0.2 ms a line).
            text = renderable.plain if isinstance(renderable, Text) else renderable
            with self._lock:
                self.console.file.write(text + "\n")
        else:
            self.console.print(renderable)

    def _print_result(self, r: TaskResult) -> None:
        if r.from_run:
            if self.verbose:
                self._print(Text(f"{r.host}: {r.step_id}: {r.status.value} in run {r.from_run} (not run again)", style="dim"))
            return
        status = r.status.value + (" (ignored)" if r.ignored else "")
        line = Text.assemble((r.host, "bold"), f": {r.step_id}: ", (status, STYLE.get(r.status.value, "")))
        if r.duration:
            line.append(f" {r.duration:.2f}s", style="dim")
        if r.message and (r.status != Status.OK or self.verbose):
            line.append(f" — {self._r(r.message)}")
        self._print(line)
        if r.status == Status.FAILED:
            tail = (r.stderr or r.stdout or "").strip().splitlines()[-5:]
            for t in tail:
                self._print(Text("    " + self._r(t), style="red"))
        if r.diff and (self.verbose or r.status == Status.CHANGED):
            self._print(diff_text(self._r(r.diff)))

    def _table(self) -> Table:
        t = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        t.add_column("host")
        t.add_column("done", justify="right")
        t.add_column("current step")
        for h in list(self._total)[:40]:
            t.add_row(h, str(self._done[h]), self._current.get(h, ""))
        if len(self._total) > 40:
            t.add_row(f"… {len(self._total) - 40} more", "", "")
        t.caption = "  ".join(f"{k}: {v}" for k, v in sorted(self._counts.items()))
        return t

    def _refresh(self) -> None:
        if self._live is not None:
            with self._lock:
                self._live.update(self._table())


def diff_text(diff: str) -> Text:
    """A unified diff, coloured."""
    out = Text()
    for line in diff.splitlines(keepends=True):
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith("@@") else "dim"
        out.append("    " + line, style=style)
    return out


def _recap_columns(recap: dict[str, Counter]) -> list[str]:
    """The recap's columns: the five Ansible ones always, the others when some host has them."""
    always = ("ok", "changed", "skipped", "failed", "unreachable")
    return [c for c in (*always, "not_run", "deferred", "drift")
            if c in always or any(counts.get(c) for counts in recap.values())]


def recap_table(result: RunResult) -> Table:
    """Per-host counts like Ansible's PLAY RECAP."""
    recap = result.recap()
    present = _recap_columns(recap)
    t = Table(title="RECAP", title_justify="left", box=None, header_style="bold")
    t.add_column("host")
    for c in present:
        t.add_column(c, justify="right")
    for host, counts in recap.items():
        t.add_row(host, *[Text(str(counts.get(c, 0)), style=STYLE.get(c, "") if counts.get(c) else "dim") for c in present])
    return t


def recap_text(result: RunResult) -> str:
    """The recap as plain aligned text (for logs and pipes; the rich table is for terminals)."""
    recap = result.recap()
    present = _recap_columns(recap)
    width = max([len("host"), *(len(h) for h in recap)])
    lines = ["RECAP", " ".join(["host".ljust(width), *(c.rjust(len(c)) for c in present)])]
    for host, counts in recap.items():
        lines.append(" ".join([host.ljust(width), *(str(counts.get(c, 0)).rjust(len(c)) for c in present)]))
    return "\n".join(lines)


def render_plan(console: Console, plan: dict[str, Any], redactor: Redactor | None = None, *, diffs: bool = True) -> None:
    """Render a plan document (see runbook.plan) per host and step, then totals, like `terraform plan`."""
    red = redactor.redact_text if redactor else (lambda s: s)
    out: list[Any] = []
    out.append(Text.assemble((f"Plan for {plan['playbook']['name']}", "bold"), f" ({plan['playbook']['path']}) ",
                             (f"made {plan['created_at']} by {plan['operator']}", "dim")))
    totals: Counter[str] = Counter()
    by_host: dict[str, list[dict[str, Any]]] = {}
    for p in plan["predictions"]:
        by_host.setdefault(p["host"], []).append(p)
    for host in plan["hosts"]:
        out.append(Text(f"\n{host}", style="bold"))
        per_host: Counter[str] = Counter()
        if host in plan.get("unreachable", {}):
            out.append(Text(f"  unreachable: {red(plan['unreachable'][host])}", style=STYLE["unreachable"]))
        for p in by_host.get(host, []):
            mark, style, label = PLAN_MARK.get(p["prediction"], ("?", "", p["prediction"]))
            if p.get("gate"):
                mark, style, label = "!", "bold blue", "gate"
            per_host[label] += 1
            line = Text.assemble(("  " + mark + " ", style), (p["step_id"], "bold"), ("  " + label, style))
            if p.get("reason"):
                line.append(f" — {red(p['reason'])}", style="dim" if p["prediction"] in ("ok", "skip") else "")
            out.append(line)
            if diffs and p.get("diff"):
                out.append(diff_text(red(p["diff"])))
        out.append(Text("  " + ", ".join(f"{v} {k}" for k, v in sorted(per_host.items())), style="dim"))
        totals.update(per_host)
    out.append(Text("\nPlan: " + ", ".join(f"{totals.get(k, 0)} {k}" for k in
                                               ("change", "no change", "skip", "unknown", "would fail", "gate")
                                               if totals.get(k) or k in ("change", "unknown")), style="bold"))
    known = sum(v for k, v in totals.items() if k != "unknown")
    if totals:
        out.append(Text(f"{totals.get('unknown', 0) * 100 / sum(totals.values()):.0f}% of steps unknown "
                           f"({known} of {sum(totals.values())} predicted)", style="dim"))
    if console.is_terminal:
        for item in out:
            console.print(item)
    else:
        # A pipe or a file: plain text in one write (rich's per-line layout is slow for big plans).
        console.file.write("\n".join(i.plain.rstrip("\n") if isinstance(i, Text) else str(i) for i in out) + "\n")

