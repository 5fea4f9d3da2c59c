"""The task runner: one step on one host over one connection — conditions, guards, retries, outcome, register."""

from __future__ import annotations

import threading
from types import MappingProxyType
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from runbook.actions import Action, TaskEnv, action_for
from runbook.connections import Connection
from runbook.engine.delegates import resolve_delegate
from runbook.engine.options import ExecOptions, HostLike
from runbook.engine.outcome import apply_outcome, check_guards
from runbook.engine.registers import Registers
from runbook.errors import ReadOnlyViolation, RunbookError
from runbook.events import EventStream, ObserverFailed, RunInfo, TaskRef
from runbook.facts import FactStore, FactsView
from runbook.graph import StepGraph, TaskKey
from runbook.handlers import Notice, Notifications
from runbook.model import CONTROLLER, Playbook, Step
from runbook.results import PredictionKind, RunMode, Status, TaskResult, register_value
from runbook.template import build_context, truth

if TYPE_CHECKING:
    from runbook.audit import Redactor
    from runbook.engine.predict import Predictor

ABORTED = "aborted by a second interrupt"


class ModeHandler(Protocol):
    """How a task is carried out in the run's mode: for real, predicted (plan), or as a reviewed plan says (apply)."""

    def __call__(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                 res: TaskResult) -> bool | None:
        """Fill `res`; return True when the step's register must not be set from it (a dry run's guess)."""


class TaskRunner:
    """Runs one task and returns its result; it emits the task's events and never raises for task failures."""

    def __init__(self, playbook: Playbook, steps: StepGraph, hosts: dict[str, HostLike], info: RunInfo,
                 events: EventStream, options: ExecOptions, registers: Registers,
                 connection: Callable[..., Connection], facts: FactStore | None = None):
        self.playbook = playbook
        self.steps = steps
        self.hosts = hosts
        self.info = info
        self.events = events
        self.opt = options
        self.registers = registers
        # (host, step) -> the host's own connection; (host, step, delegate) -> CONTROLLER's or a delegate host's.
        self.connection = connection
        self.facts = facts if facts is not None else FactStore()   # per host, like the registers
        self._reads_facts: dict[int, bool] = {}
        self.actions: dict[int, Action] = {}   # by the step object: a handler may share a main step's id
        self.cancel = threading.Event()
        self.draining = threading.Event()   # first interrupt or a caller's stop: no new task (nor loop item) starts
        self.aborting = False
        self._ask_lock = threading.Lock()
        self.handler: ModeHandler = self.run_for_real
        self.predictor: Predictor | None = None   # set by the Predictor made for this runner (loops ask it in plan/apply)
        self.label_redactor: Redactor | None = None   # loops: made on first use (engine/loops.py)
        # Every selected host's inventory variables, by name (Ansible's `hostvars`); the sandbox is
        # immutable, so templates can read but never change them.
        self.hostvars = MappingProxyType({name: MappingProxyType(h.vars) for name, h in hosts.items()})
        # Handler instances; on the controller the executor points `results` at every task's result so far.
        self.notifications = Notifications(steps.graph, hosts)
        # Whether a block's rescue step runs on a host (scheduling.BlockOutcomes.rescue_gate; set by the executor).
        self._rescue_gate: Callable[[TaskKey], tuple[Status, str] | None] | None = None

    @property
    def block_gate(self) -> Callable[[TaskKey], tuple[Status, str] | None]:
        """What skips a task before it starts: an unnotified handler (decided on the controller), then the block gate.

        A cluster asks the controller's gate for each task it sends and runs it on the worker by that verdict.
        """
        return self._gate

    @block_gate.setter
    def block_gate(self, gate: Callable[[TaskKey], tuple[Status, str] | None] | None) -> None:
        self._rescue_gate = gate

    def _gate(self, key: TaskKey) -> tuple[Status, str] | None:
        return self._handler_gate(key) or (self._rescue_gate(key) if self._rescue_gate is not None else None)

    def action(self, step: Step) -> Action:
        """The action object of a step (made once per run)."""
        found = self.actions.get(id(step))
        if found is None:
            found = self.actions[id(step)] = action_for(step)
        return found

    # --- one task ----------------------------------------------------------------------------

    def run(self, key: TaskKey, rescue: bool = False) -> TaskResult:
        """Run the task `key` in the run's mode (on_failure steps always for real) and report it."""
        step = self.steps.step(key.step_id)
        gated = self._rescue_gated(key, step, rescue)
        if gated is not None:
            return gated
        if step.loop is not None:
            from runbook.engine.loops import LoopRunner   # here: loops builds on this module

            return LoopRunner(self, key, step, rescue).run()
        res = TaskResult(key.host, key.step_id, step.action, Status.OK, started_at=time.time(), on_failure=rescue)
        no_register = self.carry_out(key, step, res, rescue)
        self._finalize(step, res, no_register)
        self.events.task_finished(self.info, res)
        return res

    def carry_out(self, key: TaskKey, step: Step, res: TaskResult, rescue: bool, ctx: dict[str, Any] | None = None,
                  handler: ModeHandler | None = None) -> bool:
        """Carry out one task (or loop item) into `res`; its failures become the result, never an exception."""
        try:
            if self.playbook.facts or self.reads_facts(step):
                self.facts.get(key.host, lambda: self.connection(key.host, step))   # its failure is the task's
            ctx = self.context(key.host, step=step) if ctx is None else ctx
            res.delegated_to = self.delegate_for(key.host, step, ctx)
            conn = (self.connection(key.host, step) if res.delegated_to is None
                    else self.connection(key.host, step, res.delegated_to))
            # A dry run predicts on_failure steps too: it changes nothing, wherever they would run.
            handler = handler or (self.run_for_real if rescue and self.opt.mode != RunMode.PLAN else self.handler)
            return bool(handler(key, step, self.action(step), conn, ctx, res))
        except ObserverFailed:
            raise   # not the task's failure: the run stops
        except ReadOnlyViolation as exc:
            res.status, res.message = Status.FAILED, f"dry-run safety stop: {exc.message}"
        except RunbookError as exc:
            res.status, res.message = Status.FAILED, str(exc)
        except (OSError, EOFError) as exc:
            res.status, res.message = Status.FAILED, f"connection error: {exc}"
        except Exception as exc:  # a bug or an unexpected library error must not kill the whole run
            res.status, res.message = Status.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        return False

    def delegate_for(self, host: str, step: Step, ctx: dict[str, Any]) -> str | None:
        """Where the task runs (None: on its host); a refused delegate fails it unless it is skipped anyway."""
        try:
            return resolve_delegate(step, ctx, self.opt.inventory_hosts, host)
        except RunbookError:
            if not self.tags_allow(step) or (step.when is not None and not _maybe(step.when, ctx)):
                return None   # it skips before any connection is used
            raise

    def reads_facts(self, step: Step) -> bool:
        """Whether a step's templates read `facts` (then they are gathered before it, so a failure is clear)."""
        found = self._reads_facts.get(id(step))
        if found is None:
            from runbook.checks import step_reads

            found = self._reads_facts[id(step)] = step_reads(step, "facts")
        return found

    def close(self, step: Step, res: TaskResult) -> None:
        """A task's end: its duration, an ignored failure, the abort mark."""
        if self.aborting and res.status == Status.FAILED:
            res.message = f"{ABORTED}: {res.message}" if res.message else ABORTED
        res.finished_at = time.time()
        res.duration = round(res.finished_at - (res.started_at or res.finished_at), 6)
        if res.status == Status.FAILED and step.ignore_errors and self.opt.mode != RunMode.PLAN:
            res.ignored = True
        self._noted(res)

    def _noted(self, res: TaskResult) -> None:
        """Say why a handler that ran did (the controller knows its notifiers' results)."""
        inst = self.notifications.instance(res.step_id)
        if inst is not None and self.notifications.results is not None and not res.message \
                and res.status in (Status.OK, Status.CHANGED):
            res.message = self.notifications.verdict(inst, res.host, plan=self.opt.mode == RunMode.PLAN).reason

    def _handler_gate(self, key: TaskKey) -> tuple[Status, str] | None:
        """(skipped, why) for a handler instance nothing notified on this host; None when it runs (or is no handler)."""
        inst = self.notifications.instance(key.step_id)
        if inst is None or self.notifications.results is None or not self.tags_allow(self.steps.step(key.step_id)):
            return None   # a step, a worker (the controller decided), or a handler the tag filter skips as usual
        plan = self.opt.mode == RunMode.PLAN
        verdict = self.notifications.verdict(inst, key.host, plan=plan)
        saved = (self.opt.predictions or {}).get(key) if not plan else None
        if verdict.notice != Notice.NOT_NOTIFIED:
            if saved is not None and str(saved.kind) in (PredictionKind.OK, PredictionKind.SKIP):
                # Its notifier changed after all (it ran after another planned change, or drift was allowed):
                # the change it reacts to happened, so leaving the host without the handler would be worse.
                self.events.notice(self.info, "warning", f"{key.host}: `{key.step_id}` runs although the reviewed plan "
                                   f"said {saved.kind}: {verdict.reason}")
            return None
        expected = saved is not None and str(saved.kind) == PredictionKind.CHANGE
        return Status.SKIPPED, verdict.reason + ("; the reviewed plan expected it to run" if expected else "")

    def _rescue_gated(self, key: TaskKey, step: Step, rescue: bool) -> TaskResult | None:
        """A step skipped before it starts: a rescue step where its block did not fail (plan: skip or unknown), or a
        step before --start-at-step."""
        verdict = self.block_gate(key) if self.block_gate is not None and not rescue else None
        if step._skip and not rescue:
            verdict = (Status.SKIPPED, step._skip)   # before --start-at-step: not even its conditions are read
        if verdict is None:
            return None
        status, reason = verdict
        res = TaskResult(key.host, key.step_id, step.action, status, message=reason, started_at=time.time())
        if self.opt.mode == RunMode.PLAN:
            res.prediction = PredictionKind.SKIP if status == Status.SKIPPED else PredictionKind.UNKNOWN
        unknown = status == Status.UNKNOWN and step.register_as is not None
        if unknown and step.register_as:
            self.registers.mark_unknown(key.host, step.register_as, step.step_id, stale=False)
        self._finalize(step, res, unknown)
        self.events.task_finished(self.info, res)
        return res

    def _finalize(self, step: Step, res: TaskResult, no_register: bool) -> None:
        self.close(step, res)
        if step.register_as and not no_register:
            self.registers.store(res.host, step.register_as, register_value(res, skipped=res.status == Status.SKIPPED),
                                 shared=step.once)

    def start(self, step: Step, host: str, res: TaskResult, attempt: int, command: str | None) -> None:
        """Record an attempt and emit `task_started`."""
        res.attempts = attempt
        res.command = command
        # res.step_id: a loop item starts as `step[label]`, its own task in every record.
        self.events.task_started(self.info, TaskRef(host, res.step_id, step.name, step.action, attempt, command,
                                                    res.on_failure))

    # --- variables and environment -------------------------------------------------------------

    def context(self, host: str, extra: dict[str, Any] | None = None, step: Step | None = None) -> dict[str, Any]:
        """The template variables of a task on `host`, by precedence (see docs/playbook-format.md).

        With `step`: its role's defaults (below the playbook's vars) and its own `vars:` (above the
        inventory, below secrets, registers and -e) too.
        """
        h = self.hosts[host]
        builtins = {
            "host": {"name": host, "vars": h.vars, "groups": list(getattr(h, "groups", []) or [])},
            "inventory_hostname": host,
            "groups": self.opt.groups,
            "hostvars": self.hostvars,
            "run": {"id": self.info.run_id, "mode": str(self.opt.mode), "operator": self.info.operator},
            "playbook_dir": self.opt.playbook_dir,
            "facts": self._facts_of(host),
        }
        registers = {**self.registers.visible(host), **(extra or {})}
        defaults = step._defaults if step is not None else None
        ctx = build_context(playbook_vars={**defaults, **self.playbook.vars} if defaults else self.playbook.vars,
                            inventory_vars=h.vars, registers=registers, extra_vars=self.opt.extra_vars,
                            secrets=self.opt.secrets, builtins=builtins)
        if step is not None and step.vars:
            step_vars(ctx, step.vars, {*registers, *self.opt.extra_vars, *self.opt.secrets, *builtins, "secrets"})
        return ctx

    def _facts_of(self, host: str) -> Any:
        """`facts` in templates: the gathered facts, or a view that gathers them on first read."""
        known = self.facts.values(host)
        if known is not None:
            return known
        return FactsView(self.facts, host, lambda: self.connection(host, None))

    def env(self, host: str, step: Step, conn: Connection, ctx: dict[str, Any]) -> TaskEnv:
        """What an action gets to act on one host (sudo: true on a delegate uses the delegate's become user)."""
        h: HostLike | None = self.hosts[host]
        if conn.name != host:
            h = None if conn.name == CONTROLLER else self.opt.inventory_hosts.get(conn.name)
        become = h.vars.get("ansible_become_user", h.vars.get("become_user")) if h is not None else None

        def approval(granted: bool, who: str) -> None:
            self.events.approval(self.info, host, step.step_id, granted, who)

        return TaskEnv(step=step, host=host, conn=conn, vars=ctx, playbook=self.playbook, become_user=become,
                       assume_yes=self.opt.assume_yes, interactive=self.opt.interactive, ask=self._ask,
                       on_approval=approval, cancelled=self.cancel.is_set)

    def _ask(self, prompt: str) -> bool:
        """Ask the operator, one question at a time even when several hosts reach a gate together."""
        with self._ask_lock:
            return bool(self.opt.ask and self.opt.ask(prompt))

    def tags_allow(self, step: Step) -> bool:
        """Whether `--tags`/`--skip-tags` let the step run."""
        tags = set(step.tags)
        if self.opt.tags and not (tags & self.opt.tags or "always" in tags):
            return False
        return not (tags & self.opt.skip_tags)

    # --- running for real ----------------------------------------------------------------------

    def run_for_real(self, key: TaskKey, step: Step, action: Action, conn: Connection, ctx: dict[str, Any],
                     res: TaskResult) -> bool | None:
        """Conditions, guards, then the action with retries/until; the outcome lands in `res`."""
        host = key.host
        env = self.env(host, step, conn, ctx)
        if not self.tags_allow(step):
            skip(res, "tag filter")
            return None
        if step.when is not None and not truth(step.when, ctx):
            skip(res, f"when: `{step.when}` is false")
            return None
        if step.guards:
            self.start(step, host, res, 1, action.describe(env))
            reason, _, _ = check_guards(step, env)
            if reason:
                skip(res, reason)
                return None
        attempts = step.retries + 1 if (step.retries or not step.until) else 4  # `until` alone retries 3 times
        for attempt in range(1, attempts + 1):
            if attempt > 1 and self.cancel.wait(step.delay):
                break
            self.start(step, host, res, attempt, action.describe(env))
            apply_outcome(step, res, action.apply(env), ctx)
            if step.until is None:
                if res.status != Status.FAILED:
                    break
                continue
            reg = register_value(res)
            if truth(step.until, {**ctx, "result": reg, **({step.register_as: reg} if step.register_as else {})}):
                if res.status == Status.FAILED and step.failed_when is None:
                    continue
                break
            if attempt == attempts:
                res.status = Status.FAILED
                res.message = f"`until: {step.until}` still false after {attempt} attempt(s)" + (
                    f"; {res.message}" if res.message else "")
        return None


def _maybe(expr: str | bool, ctx: dict[str, Any]) -> bool:
    """A condition's value, True when it cannot be evaluated now (so nothing is decided on a guess)."""
    try:
        return truth(expr, ctx)
    except Exception:  # any template failure: not certainly false
        return True


def skip(res: TaskResult, reason: str) -> None:
    """Mark a result skipped, with why."""
    res.status, res.message, res.changed = Status.SKIPPED, reason, False


def step_vars(ctx: dict[str, Any], values: dict[str, Any], higher: set[str]) -> None:
    """Put a step's `vars:` into its context (rendered, in order) except names a higher precedence sets."""
    from runbook.template import render_value

    for name, value in values.items():
        if name not in higher:
            ctx[name] = render_value(value, ctx)
