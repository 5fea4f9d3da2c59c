"""The terminal view: a live progress table on a terminal, plain lines otherwise, and the final recap."""

from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections import Counter
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from runbook.audit import Redactor
from runbook import handlers
from runbook.events import Observer, RunInfo, TaskRef, rescued_text
from runbook.results import RunResult, Status, TaskResult, counted

STYLE = {"ok": "green", "changed": "yellow", "skipped": "cyan", "failed": "bold red", "unreachable": "bold magenta",
         "deferred": "blue", "drift": "bold red", "not_run": "dim", "unknown": "bold yellow",
         "lost": "bold magenta", "rescued": "bold yellow"}

PLAN_MARK = {"change": ("+", "yellow", "change"), "ok": ("=", "green", "no change"), "skip": ("-", "cyan", "skip"),
             "unknown": ("?", "bold yellow", "unknown"), "fail": ("!", "bold red", "would fail"),
             "not_run": ("·", "dim", "not reached")}


def make_console(stream: TextIO | None = None, *, color: bool | None = None) -> Console:
    """A rich console for the given stream (stderr by default, so stdout stays clean for JSON)."""
    stream = stream or sys.stderr
    return Console(file=stream, force_terminal=color, no_color=color is False, highlight=False, soft_wrap=True)


OUTPUT_LINES = 20        # per stream and task: the console shows the last lines; --format json has everything
OUTPUT_LINE_CHARS = 400
RUNNING_SHOWN = 3        # running steps listed per host in the live view


def max_attempts(step: Any) -> int:
    """How many attempts a step gets (as the task runner counts them: `until` alone retries 3 times)."""
    return step.retries + 1 if (step.retries or not step.until) else 4


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Control characters as escapes: a host's output must not move the cursor, retitle or recolour the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def output_lines(text: str, limit: int = OUTPUT_LINES) -> tuple[list[str], int]:
    """The last `limit` lines of a command's output, made visible and cut to a readable width, and how many were left out."""
    lines = text.rstrip("\n").split("\n") if text.strip() else []
    shown = [visible(ln if len(ln) <= OUTPUT_LINE_CHARS else ln[:OUTPUT_LINE_CHARS] + " …") for ln in lines[-limit:]]
    return shown, max(0, len(lines) - limit)


class _Progress:
    """What the live view shows per host: done of total, and every running task with its attempt and start."""

    def __init__(self, hosts: list[str], playbook: Any | None):
        self.lock = threading.Lock()
        self.hosts = list(hosts)
        self.done: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.running: dict[str, dict[str, tuple[int, float]]] = {h: {} for h in hosts}
        self.attempts: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.rescue_steps = 0
        self.rescued: set[str] = set()
        if playbook is not None:
            once = sum(1 for s in playbook.steps if s.once)
            per_host = handlers.tasks_per_host(playbook)   # flush points are no task, handler instances are
            self.total = {h: per_host - (once if i else 0) for i, h in enumerate(hosts)}
            self.attempts = {s.step_id: max_attempts(s) for s in playbook.all_steps()}
            self.attempts.update({i.task_id: max_attempts(playbook.handlers[i.position]) for i in handlers.instances(playbook)})
            self.rescue_steps = len(playbook.on_failure)

    def started(self, task: TaskRef) -> None:
        with self.lock:
            if task.on_failure and task.host not in self.rescued and task.host in self.total:
                self.rescued.add(task.host)
                self.total[task.host] += self.rescue_steps
            self.running.setdefault(task.host, {})[task.step_id] = (task.attempt, time.monotonic())

    def finished(self, result: TaskResult) -> None:
        with self.lock:
            if result.parent is None:   # done/total counts steps; a loop's items are counted as tasks below
                self.done[result.host] += 1
            if counted(result):
                self.counts[result.status.value] += 1
            self.running.get(result.host, {}).pop(result.step_id, None)

    def attempt_text(self, step_id: str, attempt: int) -> str:
        """`attempt 2 of 4` (or `attempt 2` when the limit is not known)."""
        limit = self.attempts.get(step_id)
        return f"attempt {attempt} of {limit}" if limit else f"attempt {attempt}"

    def running_text(self, host: str, now: float) -> str:
        tasks = sorted(self.running.get(host, {}).items(), key=lambda kv: kv[1][1])
        parts = [f"{sid}{f' ({self.attempt_text(sid, n)})' if n > 1 else ''} {now - t0:.0f}s"
                 for sid, (n, t0) in tasks[:RUNNING_SHOWN]]
        if len(tasks) > RUNNING_SHOWN:
            parts.append(f"+{len(tasks) - RUNNING_SHOWN} more")
        return ", ".join(parts)

    def table(self) -> Table:
        t = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        t.add_column("host")
        t.add_column("done", justify="right")
        t.add_column("running")
        now = time.monotonic()
        with self.lock:
            for h in self.hosts[:40]:
                total = self.total.get(h)
                t.add_row(h, f"{self.done[h]}/{total}" if total is not None else str(self.done[h]),
                          self.running_text(h, now))
            if len(self.hosts) > 40:
                busy = sum(1 for h in self.hosts[40:] if self.running.get(h))
                t.add_row(f"… {len(self.hosts) - 40} more", "", f"{busy} host(s) busy" if busy else "")
            t.caption = "  ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return t


class ConsoleView(Observer):
    """Shows a run as it happens: live per-host progress on a terminal, one line per task otherwise.

    Failed tasks always show their output (the last lines of stdout and stderr); `verbose` shows
    every task's command, output, message and diff. Give `playbook` for done/total and attempt limits.
    """

    def __init__(self, console: Console, redactor: Redactor, *, verbose: bool = False, live: bool | None = None,
                 playbook: Any | None = None):
        self.console = console
        self.redactor = redactor
        self.verbose = verbose
        self.playbook = playbook
        self.live_enabled = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._progress = _Progress([], playbook)
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
        self._progress = _Progress(run.hosts, self.playbook)
        if self.live_enabled:
            # get_renderable: redrawn on every refresh, so running tasks' elapsed times move on their own.
            self._live = Live(console=self.console, refresh_per_second=4, transient=True,
                              get_renderable=self._progress.table)
            self._live.start()

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        self._progress.started(task)
        if self._live is not None:
            return
        if task.attempt > 1 and self._mode != "plan":
            self._print(Text(f"{task.host}: {task.step_id}: retrying ({self._progress.attempt_text(task.step_id, task.attempt)})",
                             style="yellow"))
        elif self.verbose:
            self._print(Text(f"{task.host}: {task.step_id} started: {self._r(task.command)}", style="dim"))

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        self._progress.finished(result)
        if self._mode == "plan":
            return
        if result.status == Status.UNREACHABLE:
            pass  # said once per host by host_unreachable, not once per step
        elif (self._live is None or self.verbose or result.status in (Status.FAILED, Status.DRIFT)
              or shows_message(result.action)):
            self._print_result(result)

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        self._print(Text.assemble((f"{host}", "bold"), ": ", ("UNREACHABLE", STYLE["unreachable"]), f": {self._r(reason)}"))

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        self._print(f"{host}: {step_id}: {'approved' if granted else 'denied'} by {self._r(who)}")

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        self.notice(run, "warning", rescued_text(run.mode, host, block, step_ids))

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
        rescued = result.rescued_hosts()
        if rescued:   # a block's rescue handled a failure there: exit code 0, but someone should look
            self.console.print(f"[yellow]rescued: {len(rescued)} host{'s' if len(rescued) > 1 else ''} "
                               f"({escape(visible(self._r(', '.join(rescued))))}): a block failed and its rescue steps ran[/]")
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
        if r.attempts > 1:
            status += f" after {r.attempts} attempts"
        # A delegated task names both: the host it was for, and where it ran.
        where = f" (on {visible(r.delegated_to)})" if r.delegated_to else ""
        line = Text.assemble((r.host, "bold"), f": {r.step_id}{where}: ", (status, STYLE.get(r.status.value, "")))
        if r.duration:
            line.append(f" {r.duration:.2f}s", style="dim")
        lines = [line]
        if r.message and (r.status != Status.OK or self.verbose or shows_message(r.action)):
            message = visible(self._r(r.message))
            if "\n" in message.strip() and shows_message(r.action):   # a printed mapping: one line per key
                shown, cut = output_lines(message, OUTPUT_LINES * 2)
                lines.extend(Text(f"    | {ln}") for ln in shown)
                if cut:
                    lines.append(Text(f"    | … {cut} more line(s) (--format json has them all)", style="dim"))
            else:
                line.append(f" — {message}")
        if r.status == Status.DRIFT:
            # Drift is checked only before a host's first planned change, so the host is untouched.
            lines.append(Text(f"    {r.host} is stopped before any planned change on it (no on_failure: nothing to roll "
                              "back); review a new plan: runbook plan ... --out FILE", style="dim"))
        if r.status == Status.FAILED or self.verbose:
            lines.extend(self._output(r))
        if r.diff and (self.verbose or r.status == Status.CHANGED):
            lines.append(diff_text(self._r(r.diff)))
        # One renderable per task: its lines stay together, and the live view redraws once.
        self._print(Text("\n").join(lines) if len(lines) > 1 else line)

    def _output(self, r: TaskResult) -> list[Text]:
        """The last lines of the task's stdout and stderr, redacted, each line marked with its stream."""
        failed = r.status == Status.FAILED
        out: list[Text] = []
        for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
            lines, cut = output_lines(self._r(text or ""))
            if cut:
                out.append(Text(f"    {name}| … {cut} earlier line(s) not shown (--format json has them all)", style="dim"))
            style = "red" if failed and name == "stderr" else "" if failed else "dim"
            out.extend(Text(f"    {name}| {ln}", style=style) for ln in lines)
        return out


@functools.lru_cache(maxsize=256)
def shows_message(action: str) -> bool:
    """Whether an action's message is shown for an `ok` result too (`print`), not only when verbose."""
    from runbook.actions import ACTIONS

    try:
        return ACTIONS.get(action).shows_message
    except Exception:  # an action this process does not have (a result read back from a file)
        return False


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
    return [c for c in (*always, "rescued", "not_run", "deferred", "drift", "lost")
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
            if not p.get("items"):   # a looped step's line sums up its items, which are counted themselves
                per_host[label] += 1
            indent = "      " if p.get("parent") else "  "   # a loop's items under their step
            where = f" (on {visible(str(p['delegated_to']))})" if p.get("delegated_to") else ""   # delegate_to
            line = Text.assemble((indent + mark + " ", style), (visible(p["step_id"]), "bold"), where,
                                 ("  " + label, style))
            if p.get("reason"):
                reason = visible(red(p["reason"])).replace("\n", "\n      ")   # a printed mapping: its lines indented
                line.append(f" — {reason}", style="dim" if p["prediction"] in ("ok", "skip") else "")
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

