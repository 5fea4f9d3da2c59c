"""Dry-run prediction and apply-time drift checks: the `plan` and `apply` ways of carrying out a task."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import networkx as nx
from jinja2 import meta

from runbook.actions import Action, Prediction, PredictionKind
from runbook.connections import Connection, ReadOnlyConnection
from runbook.engine.options import SavedPrediction
from runbook.compose import rescue_of
from runbook.engine.scheduling import PLANNED_NO_RESCUE
from runbook.engine.outcome import check_guards
from runbook.engine.task import ModeHandler, TaskRunner
from runbook.errors import RunbookError
from runbook.graph import TaskKey
from runbook.handlers import Notice, Verdict
from runbook.model import Step
from runbook.results import RunMode, Status, TaskResult, parent_step
from runbook.template import environment, strip_braces, truth

_STATUS = {PredictionKind.CHANGE: Status.CHANGED, PredictionKind.OK: Status.OK, PredictionKind.SKIP: Status.SKIPPED,
           PredictionKind.UNKNOWN: Status.UNKNOWN, PredictionKind.FAIL: Status.FAILED}
_RESTS_ON_NOTHING = (PredictionKind.OK, PredictionKind.SKIP)


class NotKnownInPlan(jinja2.StrictUndefined):
    """A field of a dry-run register that only the real run can fill (stdout, rc): any use of it raises."""

    __slots__ = ()


def _kind(value: PredictionKind | str) -> PredictionKind | None:
    """A saved prediction as a kind; None for what a plan records beyond predictions (not_run, deferred)."""
    try:
        return PredictionKind(value)
    except ValueError:
        return None


class Predictor:
    """Predicts tasks from what the hosts are now, reading only; in `apply`, checks that the plan still holds."""

    def __init__(self, runner: TaskRunner, tasks: nx.DiGraph, results: Mapping[TaskKey, TaskResult],
                 predictions: dict[TaskKey, SavedPrediction] | None, *, allow_drift: bool,
                 stop_host: Callable[[str, str], None], warn: Callable[[str], None]):
        self.runner = runner
        self.tasks = tasks
        self.results = results
        self.predictions = predictions or {}
        self.reviewed = predictions is not None   # apply: there is a plan to hold the tasks to
        self.allow_drift = allow_drift
        self.stop_host = stop_host
        self.warn = warn
        self.drift_checkable = self._drift_checkable() if predictions else set()
        self._lock = threading.Lock()
        self.partial: dict[str, dict[str, str]] = {}   # plan: host ("" for once steps) -> partial register -> step id
        self.items_by_node = _items_by_node(self.predictions)   # apply: a looped task's reviewed item keys
        runner.predictor = self

    def handler_for(self, mode: RunMode) -> ModeHandler | None:
        """How a task is carried out in `mode`: predicted (plan), held to the reviewed plan (apply); None: as usual."""
        if mode == RunMode.PLAN:
            return self.plan_task
        if mode == RunMode.APPLY and self.reviewed:
            return self.apply_task
        return None

    # --- plan ------------------------------------------------------------------------------------

    def plan_task(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                  res: TaskResult) -> bool:
        """Carry out a task in a dry run: predict it; True when its register must stay unknown."""
        self.predict_into(key, step, action, conn, ctx, res)
        return self._store_register(key, step, res)

    def predict_into(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                     res: TaskResult) -> None:
        """Predict a task (or a loop item) into its result, without touching registers."""
        pred = self.predict(key, step, action, conn, ctx, res)
        res.status = _STATUS[pred.kind]
        res.changed = pred.kind == PredictionKind.CHANGE
        res.message = pred.reason
        res.diff = pred.diff
        res.command = pred.command or res.command
        res.data.update(pred.data)
        res.prediction = pred.kind
        res.read_only = step.read_only and pred.kind != PredictionKind.SKIP
        res.state = pred.state

    def register_state(self, key: TaskKey, step: Step, res: TaskResult) -> tuple[str, Any]:
        """What a dry run knows of a predicted task's register: ("real", None), ("partial", value) or ("unknown", stale)."""
        # A read_only step after a predicted (or possible) change read the host as it is *before* that
        # change, so later steps must not predict from its output: its register is unknown too.
        stale = step.read_only and self.after_change(key)
        if (not step.read_only or stale) and res.prediction != PredictionKind.SKIP:
            if not stale and res.prediction in (PredictionKind.CHANGE, PredictionKind.OK):
                # Whether it changes is predicted, its output is not: `when: config.changed` can be
                # decided, `config.stdout` still makes a prediction unknown.
                return "partial", self._partial(key, step, res)
            return "unknown", stale
        return "real", None

    def _store_register(self, key: TaskKey, step: Step, res: TaskResult) -> bool:
        if not step.register_as:
            return False
        kind, value = self.register_state(key, step, res)
        if kind == "partial":
            self.runner.registers.store(key.host, step.register_as, value, shared=step.once)
        elif kind == "unknown":
            self.runner.registers.mark_unknown(key.host, step.register_as, step.step_id, stale=bool(value))
        return kind != "real"

    def note_partial(self, key: TaskKey, step: Step) -> None:
        """Remember that `step`'s register is partial on the host (so a reader's error names the step)."""
        with self._lock:
            self.partial.setdefault("" if step.once else key.host, {})[step.register_as or ""] = step.step_id

    def _partial(self, key: TaskKey, step: Step, res: TaskResult) -> dict[str, Any]:
        """The register of a step predicted `change` or `ok`: `changed`/`skipped` known, its output not."""
        name = step.register_as or ""
        self.note_partial(key, step)

        def unknown(field: str) -> NotKnownInPlan:
            return NotKnownInPlan(hint=f"`{name}.{field}` is not known in a dry run")

        value: dict[str, Any] = {f: unknown(f) for f in ("stdout", "stderr", "rc", "duration", "stdout_lines", "msg", "data")}
        changed: Any = res.changed
        if isinstance(step.changed_when, bool):
            changed = step.changed_when
        elif step.changed_when is not None:
            changed = unknown("changed")   # decided by the output, which a dry run does not have
        failed: Any = unknown("failed") if isinstance(step.failed_when, str) else False
        value.update(changed=changed, failed=failed, skipped=False,
                     status=unknown("status") if isinstance(changed, NotKnownInPlan) or isinstance(failed, NotKnownInPlan)
                     else (Status.CHANGED if changed else Status.OK).value)
        return value

    def _partial_field(self, host: str, message: str) -> tuple[str, str] | None:
        """The (`register.field`, step id) a failed template read from a partial register, if that is what failed."""
        with self._lock:
            known = {**self.partial.get("", {}), **self.partial.get(host, {})}
        for name, sid in known.items():
            hit = re.search(rf"`({re.escape(name)}\.\w+)` is not known in a dry run", message)
            if hit:
                return hit.group(1), sid
        return None

    def after_change(self, key: TaskKey) -> bool:
        """True when a task this one waits for is predicted to change something, or may (unknown)."""
        node = TaskKey(parent_step(key.step_id), key.host)   # a loop item waits for what its step waits for
        if node not in self.tasks:
            return False
        return any(a in self.results and self.results[a].prediction in (PredictionKind.CHANGE, PredictionKind.UNKNOWN)
                   for a in nx.ancestors(self.tasks, node))

    def _unknown_inputs(self, host: str, step: Step) -> list[str]:
        """Registers the step's `when` reads that a dry run could not produce."""
        return self.unknown_reads(host, step.when)

    def unknown_reads(self, host: str, expr: str | None) -> list[str]:
        """Registers an expression reads that a dry run could not produce."""
        if expr is None:
            return []
        names = meta.find_undeclared_variables(environment().parse("{{ " + strip_braces(expr) + " }}"))
        unknown = self.runner.registers.unknown_names(host)
        return [n for n in sorted(names) if n in unknown]

    def why_not_known(self, host: str, exc: Exception) -> str | None:
        """Why a template failed in a dry run when it read what only the real run can produce; None otherwise."""
        registers = self.runner.registers
        missing = [n for n in registers.unknown_names(host) if f"'{n}'" in str(exc)]
        if missing:
            return f"needs `{missing[0]}`, {registers.why_unknown(host, missing[0])}"
        partial = self._partial_field(host, str(exc))
        if partial:
            return (f"needs `{partial[0]}`, registered by `{partial[1]}`, which cannot run in a dry run "
                    "(only whether it changes is predicted)")
        return None

    def predict(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                res: TaskResult | None = None) -> Prediction:
        """What the step would do on the host now, reading only (guards and read_only steps run for real)."""
        if not self.runner.tags_allow(step):
            return Prediction(PredictionKind.SKIP, "tag filter")
        inst = self.runner.notifications.instance(parent_step(key.step_id))
        if inst is None:
            return self._predict_step(key, step, action, conn, ctx, res)
        # A handler: it runs if a notifier is predicted to change; as a passed guard, that makes a command `change`.
        verdict = self.runner.notifications.verdict(inst, key.host, plan=True, results=self.results)
        if verdict.notice == Notice.NOT_NOTIFIED:
            return Prediction(PredictionKind.SKIP, verdict.reason)
        notified = verdict.reason if verdict.notice == Notice.NOTIFIED else None
        return _as_handler(self._predict_step(key, step, action, conn, ctx, res, notified), verdict)

    def _predict_step(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                      res: TaskResult | None, notified: str | None = None) -> Prediction:
        host = key.host
        registers = self.runner.registers
        unknown = self._unknown_inputs(host, step)
        if unknown:
            return Prediction(PredictionKind.UNKNOWN, f"`when` reads `{unknown[0]}`, {registers.why_unknown(host, unknown[0])}")
        try:
            return self._predict_known(key, step, action, conn, ctx, res, notified)
        except (RunbookError, jinja2.UndefinedError) as exc:   # a bare `when: config.stdout` raises the latter
            why = self.why_not_known(host, exc)
            if why:
                return Prediction(PredictionKind.UNKNOWN, why)
            raise

    def _predict_known(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                       res: TaskResult | None, notified: str | None = None) -> Prediction:
        if step.when is not None and not truth(step.when, ctx):
            return Prediction(PredictionKind.SKIP, f"when: `{step.when}` is false")
        reading = ReadOnlyConnection(conn, allow_run=True)   # guards and read_only steps: read-only by contract
        passed: list[str] = [notified] if notified else []
        state = None
        if step.guards:
            reason, state, more = check_guards(step, self.runner.env(key.host, step, reading, ctx))
            passed += more
            if reason:
                return Prediction(PredictionKind.SKIP, reason, state=state)
        if step.read_only:
            return self._run_read_only(key, step, action, reading, ctx, res, state)
        env = self.runner.env(key.host, step, ReadOnlyConnection(conn, allow_run=action.probes_read_only()), ctx)
        pred = action.plan(env)
        if passed and pred.kind == PredictionKind.UNKNOWN and action.guarded_runs_change:
            return Prediction(PredictionKind.CHANGE, "would run: " + "; ".join(passed), state=state, command=pred.command)
        if state and pred.state is None:
            pred.state = state
        return pred

    def _run_read_only(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                       res: TaskResult | None, state: str | None) -> Prediction:
        probe = res or TaskResult(key.host, step.step_id, step.action, Status.OK)
        self.runner.run_for_real(key, step, action, conn, ctx, probe)
        kind = (PredictionKind.FAIL if probe.status == Status.FAILED else
                PredictionKind.SKIP if probe.status == Status.SKIPPED else PredictionKind.OK)
        if kind == PredictionKind.FAIL and self.after_change(key):
            # It read the host before the changes planned ahead of it (e.g. a check of what an
            # earlier step uploads): failing now says nothing about the real run.
            return Prediction(PredictionKind.UNKNOWN, "reads the host before changes planned ahead of it; now: "
                              + (probe.message or "fails"), command=probe.command, state=state)
        return Prediction(kind, probe.message or "read_only: ran for real", command=probe.command, state=state)

    # --- apply a reviewed plan -------------------------------------------------------------------

    def _drift_checkable(self) -> set[TaskKey]:
        """Tasks whose saved prediction rests only on state nothing in this run changes before them."""
        unknown = SavedPrediction(PredictionKind.UNKNOWN)
        return {node for node in self.tasks
                if all(self.predictions.get(a, unknown).kind in _RESTS_ON_NOTHING for a in nx.ancestors(self.tasks, node))}

    def apply_task(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                   res: TaskResult) -> None:
        """Carry out a task as the reviewed plan says: refuse drift, skip what it predicted no change, run the rest."""
        if self.runner.notifications.instance(parent_step(key.step_id)) is not None:
            # A handler: the runner decided from what its notifiers really did that it runs; the plan's
            # guess about them is no reason to skip it, and "a notifier changed" is no state to drift from.
            self.runner.run_for_real(key, step, action, conn, ctx, res)
            return
        saved = self.predictions.get(key)
        if saved is None or (saved.reason == PLANNED_NO_RESCUE and rescue_of(step)):
            # A rescue step the plan expected not to be needed: its block failed after all (the runner
            # asked the block first), and the reviewed failure path is what the author wrote for that.
            self.runner.run_for_real(key, step, action, conn, ctx, res)
            return
        kind = _kind(saved.kind)
        if key in self.drift_checkable and kind in (PredictionKind.CHANGE, *_RESTS_ON_NOTHING) and saved.state is not None:
            now = self.predict(key, step, action, conn, ctx)
            if now.kind != kind or (now.state or None) != saved.state:
                message = f"drift: the plan said {saved.kind} ({saved.reason}); now {now.kind} ({now.reason})"
                if not self.allow_drift:
                    res.status, res.message = Status.DRIFT, message
                    self.stop_host(key.host, f"host stopped: `{step.step_id}` drifted from the plan")
                    return
                self.warn(f"{key.host}: {message} (--allow-drift)")
        # A "no change" that rested on what the host looked like (a guard, a checksum, a resource's
        # state: `saved.state`) is taken as reviewed only when nothing planned before it on the host
        # changes anything. After a planned change such a step runs, and its guards, checksums or the
        # resource action's own comparison decide: a step an earlier one makes necessary is not
        # skipped on the strength of a stale read. A "no change" that rests on nothing
        # (`changed_when: false`) stands as reviewed.
        stale = saved.state is not None and key not in self.drift_checkable
        if kind in _RESTS_ON_NOTHING and not stale and not step.read_only and not action.rerun_on_apply:
            res.status = Status.SKIPPED if kind == PredictionKind.SKIP else Status.OK
            res.message = f"as planned: {saved.reason}"
            return
        self.runner.run_for_real(key, step, action, conn, ctx, res)

    # --- loops in apply --------------------------------------------------------------------------

    def reviewed_items(self, key: TaskKey) -> list[str] | None:
        """The item keys the reviewed plan holds for a looped task; None when the plan did not know its items."""
        saved = self.predictions.get(key)
        if saved is None:
            return None
        items = self.items_by_node.get(key, [])
        return items if items or _kind(saved.kind) == PredictionKind.SKIP else None

    def item_drift(self, key: TaskKey, now: list[str]) -> str | None:
        """How a loop's items at apply time differ from the reviewed ones, or None when they do not."""
        planned = self.reviewed_items(key)
        if planned is None or planned == now:
            return None
        before, after = set(planned), set(now)
        added = [_label_of(k) for k in now if k not in before]
        removed = [_label_of(k) for k in planned if k not in after]
        what = "; ".join(part for part in (f"new items: {_listed(added)}" if added else "",
                                           f"items gone: {_listed(removed)}" if removed else "") if part)
        return ("drift: the loop's items differ from the plan's ("
                + (what or "the same items in another order") + ")")

    def admit_items(self, key: TaskKey, item_keys: list[str]) -> int:
        """Items whose reviewed prediction rests only on state nothing before them changes get the drift check.

        Returns how many leading items got it: they must run one after another, so that a drift is
        refused before the loop's first planned change.
        """
        if key not in self.drift_checkable:
            return 0
        unknown = SavedPrediction(PredictionKind.UNKNOWN)
        admitted = 0
        for sid in item_keys:
            item = TaskKey(sid, key.host)
            self.drift_checkable.add(item)
            admitted += 1
            if _kind(self.predictions.get(item, unknown).kind) not in _RESTS_ON_NOTHING:
                break   # the items after it come after a planned (or possible) change
        return admitted


def _items_by_node(predictions: Mapping[TaskKey, SavedPrediction]) -> dict[TaskKey, list[str]]:
    """Loop item keys of a plan, by their (step, host) task, in the plan's order."""
    out: dict[TaskKey, list[str]] = {}
    for step_id, host in predictions:
        if "[" in step_id:
            out.setdefault(TaskKey(parent_step(step_id), host), []).append(step_id)
    return out


def _label_of(item_key: str) -> str:
    return item_key.split("[", 1)[1][:-1] if "[" in item_key else item_key


def _listed(labels: list[str], limit: int = 10) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _as_handler(pred: Prediction, verdict: Verdict) -> Prediction:
    """A handler's own prediction with why it runs; `unknown` (unless it skips anyway) when its notifier's is."""
    if verdict.notice == Notice.UNKNOWN:
        if pred.kind == PredictionKind.SKIP:
            return pred
        return Prediction(PredictionKind.UNKNOWN, f"{verdict.reason}; if it runs: {pred.kind}: {pred.reason}",
                          command=pred.command, state=pred.state)
    if verdict.reason not in pred.reason:
        pred.reason = f"{verdict.reason}; {pred.reason}"
    return pred
