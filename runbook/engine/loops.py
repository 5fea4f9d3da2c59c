"""Loops: a step's `loop:` evaluated into items, each item run as its own task, and the step's result over them.

One task-graph node per (step, host) runs its items (in order, or `loop_concurrency` at once) and
reports one result per item, keyed `step[label]`, then the step's own result, which the scheduler,
the registers and resume use as for any other step. The item list can depend on the host's
registers, so it is known only when the task runs (docs/decisions.md, "Loops").
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING, Any

import jinja2

from runbook.audit import Redactor, is_secret_name, secret_values_in
from runbook.errors import RunbookError
from runbook.events import ObserverFailed
from runbook.graph import TaskKey
from runbook.model import MAX_LOOP_ITEMS, Playbook, Step
from runbook.results import (PredictionKind, RunMode, Status, TaskResult, item_register_value, item_step_id,
                             loop_register_value)
from runbook.template import evaluate, render, render_value

if TYPE_CHECKING:
    from runbook.engine.task import TaskRunner

MAX_ITEMS = MAX_LOOP_ITEMS
LABEL_CHARS = 80
_LABEL_KEYS = ("name", "key", "id", "path", "dest", "src", "user", "host")
# Control characters (newlines and tabs included), and the Unicode marks that reorder or hide text.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_PREDICTION = {Status.CHANGED: PredictionKind.CHANGE, Status.OK: PredictionKind.OK, Status.SKIPPED: PredictionKind.SKIP,
               Status.UNKNOWN: PredictionKind.UNKNOWN, Status.FAILED: PredictionKind.FAIL}


class LoopError(RunbookError):
    """A loop's items cannot be made (not a list, too many, a label that does not render)."""


@dataclasses.dataclass(frozen=True)
class LoopItem:
    """One item of a loop on one host: its position, value, label (as shown) and result key (`step[label]`)."""

    index: int
    value: Any
    label: str
    key: str


# --- items ---------------------------------------------------------------------------------------

def loop_values(step: Step, ctx: dict[str, Any]) -> list[Any]:
    """The items of a step's loop in this context: a list, a mapping's `{key, value}` pairs, or an expression's value."""
    raw = step.loop
    value = evaluate(raw, ctx) if isinstance(raw, str) else render_value(raw, ctx)
    if isinstance(value, Mapping):
        items: list[Any] = [{"key": k, "value": v} for k, v in islice(value.items(), MAX_ITEMS + 1)]
    elif isinstance(value, (str, bytes)) or value is None or not isinstance(value, Iterable):
        raise LoopError(f"the loop of `{step.step_id}` gave {_described(value)}, expected a list or a mapping; "
                        "an expression such as `users` or `users | selectattr('admin')` must give a list")
    else:
        items = list(islice(value, MAX_ITEMS + 1))   # islice: a huge range or generator stops at the cap
    if len(items) > MAX_ITEMS:
        raise LoopError(f"the loop of `{step.step_id}` has more than {MAX_ITEMS:,} items on this host (the limit per "
                        "step and host); filter the list, or split the work into several steps")
    return items


def _described(value: Any) -> str:
    if value is None:
        return "nothing (none)"
    if isinstance(value, str):
        return f"the string {_cut(repr(value), 40)}"
    return f"a {type(value).__name__}"


def item_context(step: Step, ctx: dict[str, Any], index: int, value: Any) -> dict[str, Any]:
    """The template variables of one item: the task's, plus the item under `loop_var` and its position under `index_var`."""
    out = {**ctx, step.loop_name: value}
    if step.index_var:
        out[step.index_var] = index
    return out


def loop_context(runner: TaskRunner, host: str, step: Step) -> dict[str, Any]:
    """A looped task's variables, for its loop expression; step `vars:` may read the item, which has no value yet."""
    if not step.vars:
        return runner.context(host, step=step)
    pending: dict[str, Any] = {step.loop_name: jinja2.ChainableUndefined(name=step.loop_name)}
    if step.index_var:
        pending[step.index_var] = 0
    return runner.context(host, extra=pending, step=step)


def loop_item_context(runner: TaskRunner, host: str, step: Step, base: dict[str, Any], index: int,
                      value: Any) -> dict[str, Any]:
    """One item's variables; a step with `vars:` renders them again with the item (`path: /srv/{{ item }}`)."""
    if not step.vars:
        return item_context(step, base, index, value)
    own = item_context(step, {}, index, value)
    return item_context(step, runner.context(host, extra=own, step=step), index, value)


def loop_items(step: Step, values: list[Any], context: Callable[[int, Any], dict[str, Any]],
               redactor: Redactor) -> list[LoopItem]:
    """Label every item (redacted, made safe to show) and key it `step[label]`, unique within the step."""
    out: list[LoopItem] = []
    used: set[str] = set()
    for i, value in enumerate(values):
        if isinstance(value, (Mapping, list)):
            redactor.add_secrets_in({"item": value})   # secret-named fields of an item mask its label
        if step.label is not None:
            try:
                text = render(step.label, context(i, value))
            except RunbookError as exc:
                raise LoopError(f"`label` of `{step.step_id}`: {exc}") from None
        else:
            text = short_form(value)
        label = safe_label(redactor.redact_text(text)) or f"#{i}"
        unique, n = label, i
        while unique in used:   # labels may collide: the item's position makes the key unique
            unique, n = f"{label}#{n}", n + 1
        used.add(unique)
        out.append(LoopItem(i, value, unique, item_step_id(step.step_id, unique)))
    return out


def short_form(value: Any) -> str:
    """The default label of an item: a scalar as text; a mapping by its name-like field, else as compact JSON."""
    if isinstance(value, Mapping):
        for k in _LABEL_KEYS:
            v = value.get(k)
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                return str(v)
        return json.dumps(_masked(value), separators=(",", ":"), ensure_ascii=False, default=str)
    if isinstance(value, (list, tuple)):
        return json.dumps(_masked(list(value)), separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def _masked(value: Any, depth: int = 0) -> Any:
    """A copy with the values of secret-named keys masked (labels are shown everywhere)."""
    if depth > 20:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): "***" if is_secret_name(str(k)) else _masked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v, depth + 1) for v in value]
    return value


def safe_label(text: str) -> str:
    """A label that is safe to show and to key by: control and bidi characters and `]` as escapes, cut short."""
    text = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                       text).replace("]", "\\x5d")
    return _cut(text, LABEL_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def loop_secrets(playbook: Playbook) -> Iterator[str]:
    """Secret values written into loop lists (`loop: [{user: app, password: ...}]`): they are masked like vars."""
    for step in playbook.all_steps():
        if isinstance(step.loop, (list, dict)):
            yield from secret_values_in({"loop": step.loop})


def label_redactor(runner: TaskRunner) -> Redactor:
    """The redactor for labels: the run's secrets and secret-named values (made once per run)."""
    if runner.label_redactor is None:
        red = Redactor.from_vars(runner.playbook.vars, runner.opt.secrets)
        for h in runner.hosts.values():
            red.add_secrets_in(h.vars)
        red.add_secrets_in(runner.opt.extra_vars)
        red.add_all(loop_secrets(runner.playbook))
        runner.label_redactor = red
    return runner.label_redactor


# --- running -------------------------------------------------------------------------------------

class LoopRunner:
    """Runs one looped task: its items (each reported as its own task), then the step's own result and register."""

    def __init__(self, runner: TaskRunner, key: TaskKey, step: Step, rescue: bool):
        self.r = runner
        self.key = key
        self.step = step
        self.rescue = rescue
        mode = runner.opt.mode
        self.plan = mode == RunMode.PLAN   # a dry run predicts on_failure steps too
        self.apply = mode == RunMode.APPLY and runner.opt.predictions is not None and not rescue
        self.predictor = runner.predictor if (self.plan or self.apply) else None
        self.ctx: dict[str, Any] = {}
        self.halt: str | None = None                          # why the items left must not start
        self.checked_first = 0                                # apply: leading items checked for drift
        self.reg_states: dict[int, tuple[str, Any]] = {}      # plan: item index -> what its register knows

    def run(self) -> TaskResult:
        """Run every item and report it; return the step's own result (its items in `item_results`)."""
        res = TaskResult(self.key.host, self.key.step_id, self.step.action, Status.OK, started_at=time.time(),
                         on_failure=self.rescue)
        items = self._items(res)
        if items:
            self._run_items(res, items)
        if self.plan and res.prediction is None:   # it ended before its items: tags, no items, a failure
            res.prediction = _PREDICTION.get(res.status, PredictionKind.UNKNOWN)
        self.r.close(self.step, res)
        self._register(res)
        self.r.events.task_finished(self.r.info, res)
        return res

    def _items(self, res: TaskResult) -> list[LoopItem] | None:
        """The items to run, or None when the step ends here (tags, no items, unknown in a plan, failure, drift)."""
        step, host = self.step, self.key.host
        if not self.r.tags_allow(step):
            _end(res, Status.SKIPPED, "tag filter")
            return None
        try:
            if self.r.playbook.facts or self.r.reads_facts(step):   # as for any task: `loop: facts.mounts` works
                self.r.facts.get(host, lambda: self.r.connection(host, step))
            self.ctx = self._base_context()
            if self.plan and self.predictor is not None and isinstance(step.loop, str):
                unknown = self.predictor.unknown_reads(host, step.loop)
                if unknown:
                    self._unknown(res, f"the loop's items are not known in a dry run: `loop` reads `{unknown[0]}`, "
                                  + self.r.registers.why_unknown(host, unknown[0]))
                    return None
            items = loop_items(step, loop_values(step, self.ctx), self._item_context, label_redactor(self.r))
        except ObserverFailed:
            raise
        except (RunbookError, jinja2.UndefinedError) as exc:
            known = self.predictor.why_not_known(host, exc) if self.plan and self.predictor is not None else None
            if known:
                self._unknown(res, f"the loop's items are not known in a dry run: {known}")
                return None
            _end(res, Status.FAILED, f"loop: {exc}")
            return None
        except Exception as exc:  # a bug or an odd value must fail this task, not the run
            _end(res, Status.FAILED, f"internal error in loop: {type(exc).__name__}: {exc}")
            return None
        if not items:
            _end(res, Status.SKIPPED, "the loop has no items")
            res.items = 0
            return None
        return items if self._reviewed(res, items) else None

    def _base_context(self) -> dict[str, Any]:
        return loop_context(self.r, self.key.host, self.step)

    def _item_context(self, index: int, value: Any) -> dict[str, Any]:
        return loop_item_context(self.r, self.key.host, self.step, self.ctx, index, value)

    def _unknown(self, res: TaskResult, reason: str) -> None:
        _end(res, Status.UNKNOWN, reason)
        res.prediction = PredictionKind.UNKNOWN

    def _reviewed(self, res: TaskResult, items: list[LoopItem]) -> bool:
        """Apply: the items must be the reviewed ones (else drift); admit the drift check of the items."""
        if not self.apply or self.predictor is None:
            return True
        keys = [i.key for i in items]
        drift = self.predictor.item_drift(self.key, keys)
        if drift:
            if not self.r.opt.allow_drift:
                _end(res, Status.DRIFT, drift)
                self.predictor.stop_host(self.key.host, f"host stopped: `{self.step.step_id}` drifted from the plan")
                return False
            self.predictor.warn(f"{self.key.host}: {drift} (--allow-drift)")
        self.checked_first = self.predictor.admit_items(self.key, keys)
        return True

    def _run_items(self, res: TaskResult, items: list[LoopItem]) -> None:
        # Apply: the items checked for drift run first, one by one, so a drift stops the host before
        # the loop's first planned change; the rest run `loop_concurrency` at a time.
        first = [self._item(i) for i in items[:self.checked_first]]
        rest = items[self.checked_first:]
        width = min(self.step.loop_concurrency or 1, len(rest))
        if width <= 1:
            results = first + [self._item(i) for i in rest]
        else:
            with ThreadPoolExecutor(max_workers=width, thread_name_prefix="runbook-loop") as pool:
                results = first + list(pool.map(self._item, rest))
        aggregate(res, results)
        if self.plan:
            res.prediction = _PREDICTION.get(res.status, PredictionKind.UNKNOWN)
            res.read_only = any(i.read_only for i in results)

    def _item(self, item: LoopItem) -> TaskResult:
        """Run one item as its own task (or take it from the run being resumed) and report it."""
        r, step, host = self.r, self.step, self.key.host
        key = TaskKey(item.key, host)
        done = None if self.rescue else r.opt.previous.get(key)
        if done is not None:
            done = dataclasses.replace(done, from_run=done.from_run or "previous", item_results=[])
            r.events.task_finished(r.info, done)
            return done
        res = TaskResult(host, item.key, step.action, Status.OK, started_at=time.time(), on_failure=self.rescue,
                         parent=step.step_id, item_label=item.label, item_index=item.index, item=item.value)
        if self.halt is None and r.cancel.is_set():
            self.halt = "not started: the run was aborted"
        elif self.halt is None and (r.draining.is_set() or (r.opt.stop is not None and r.opt.stop.is_set())):
            # a first interrupt, or the program running it shutting down: items are tasks, none starts
            self.halt = "not started: the run is stopping"
        if self.halt is not None:
            res.status, res.message = Status.NOT_RUN, self.halt
        else:
            handler = self._plan_item if self.plan else None
            r.carry_out(key, step, res, self.rescue, self._item_context(item.index, item.value), handler)
            if res.status == Status.DRIFT:
                self.halt = f"host stopped: `{step.step_id}` drifted from the plan"
        r.close(step, res)
        r.events.task_finished(r.info, res)
        return res

    def _plan_item(self, key: TaskKey, step: Step, action: Any, conn: Any, ctx: dict[str, Any], res: TaskResult) -> bool:
        assert self.predictor is not None
        self.predictor.predict_into(key, step, action, conn, ctx, res)
        if step.register_as and res.item_index is not None:
            self.reg_states[res.item_index] = self.predictor.register_state(key, step, res)
        return False

    def _register(self, res: TaskResult) -> None:
        """Register the loop: every item's register (with the item) under `results`, and the step's outcome."""
        step, host = self.step, self.key.host
        name = step.register_as
        if not name:
            return
        regs = self.r.registers
        if self.plan:
            states = [self.reg_states.get(i.item_index or 0, ("real", None)) for i in res.item_results]
            if res.status in (Status.UNKNOWN, Status.FAILED) and not res.item_results or any(s[0] == "unknown" for s in states):
                stale = any(kind == "unknown" and bool(v) for kind, v in states)
                regs.mark_unknown(host, name, step.step_id, stale=stale)
                return
            if any(kind == "partial" for kind, _ in states) and self.predictor is not None:
                self.predictor.note_partial(self.key, step)
            entries = [self._entry(i, v if kind == "partial" else None) for i, (kind, v) in zip(res.item_results, states)]
            regs.store(host, name, _plan_loop_value(res, entries, name), shared=step.once)
            return
        regs.store(host, name, loop_register_value(res, [self._entry(i) for i in res.item_results]), shared=step.once)

    def _entry(self, item: TaskResult, base: dict[str, Any] | None = None) -> dict[str, Any]:
        return item_register_value(item, self.step.loop_name, self.step.index_var, base)


def _end(res: TaskResult, status: Status, message: str) -> None:
    res.status, res.message, res.changed = status, message, False


def aggregate(res: TaskResult, results: list[TaskResult]) -> None:
    """The step's own result over its items: failed if any failed, else drift, unknown, changed, all skipped, ok."""
    res.items = len(results)
    res.item_results = results
    counts: dict[str, int] = {}
    for i in results:
        counts[i.status.value] = counts.get(i.status.value, 0) + 1
    summary = f"{len(results)} item(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())
    failed = [i for i in results if i.status == Status.FAILED]
    not_run = [i for i in results if i.status == Status.NOT_RUN]
    drifted = next((i for i in results if i.status == Status.DRIFT), None)
    res.changed = any(i.changed for i in results)
    if failed:
        res.status, res.message = Status.FAILED, f"{len(failed)} of {len(results)} item(s) failed ({_labels(failed)}); {summary}"
    elif drifted is not None:
        res.status, res.message = Status.DRIFT, f"item `{drifted.item_label}`: {drifted.message}"
    elif not_run:   # stopped between items: resume runs the rest
        res.status, res.message = Status.NOT_RUN, f"{len(not_run)} of {len(results)} item(s) not run: {not_run[0].message}"
    elif counts.get("unknown"):
        res.status, res.message = Status.UNKNOWN, summary
    elif res.changed:
        res.status, res.message = Status.CHANGED, summary
    elif counts.get("skipped") == len(results):
        res.status, res.message = Status.SKIPPED, summary
    else:
        res.status, res.message = Status.OK, summary
    res.from_run = None
    res.attempts = max((i.attempts for i in results), default=0)


def _labels(results: list[TaskResult], limit: int = 5) -> str:
    return ", ".join(str(i.item_label) for i in results[:limit]) + (" …" if len(results) > limit else "")


def _plan_loop_value(res: TaskResult, entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A dry run's loop register: `changed`/`failed` true when an item's is, unknown when one is unknown, else false."""
    from runbook.engine.predict import NotKnownInPlan

    value = loop_register_value(res, [])
    value["results"] = entries
    for flag in ("changed", "failed"):
        seen = [e.get(flag) for e in entries]
        if any(v is True for v in seen):
            value[flag] = True
        elif any(isinstance(v, NotKnownInPlan) for v in seen):
            value[flag] = NotKnownInPlan(hint=f"`{name}.{flag}` is not known in a dry run")
        else:
            value[flag] = False
    return value
