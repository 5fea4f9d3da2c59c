"""Handlers: steps that run once per host after the steps that notified them, only if one changed something.

The flat playbook (after compose) has `handlers:` and steps with `notify:`; a `flush_handlers: true`
step marks a point where the handlers notified so far run. This module turns that into graph nodes:
one handler *instance* per flush segment whose steps notify it (statically), which waits for every
step of its segment and which the steps after the flush point wait for. Whether an instance really
runs is decided per host when it is reached, from its notifiers' results (`Notifications`).

Task ids: an instance is `handler:ID` (at the end of the steps) or `handler:ID:FLUSH` (at the
`flush_handlers` step FLUSH). Step ids never contain `:`, so these never collide with a step's id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import networkx as nx

from runbook.errors import Location, Problem, Problems, did_you_mean
from runbook.results import PredictionKind, Status

if TYPE_CHECKING:
    from runbook.model import Playbook, Step

PREFIX = "handler:"
MAX_INSTANCES = 5000   # handler runs per host: flush points x handlers must not multiply a small file into a huge graph
FLUSH_KEYS = frozenset({"name", "id", "flush_handlers", "tags", "vars", "sudo"})   # what a flush point may carry (or inherit)


def locate(playbook: Playbook, step: Step, *keys: str | int) -> Location:
    """Where a flat step (or a key inside it) is written: the playbook, an included file or a role."""
    from runbook.compose import locate as where   # compose knows where every flat step came from

    return where(playbook, step, *keys)


def task_id(handler_id: str, flush: str | None = None) -> str:
    """The task id of a handler instance: `handler:ID`, or `handler:ID:FLUSH` at a flush point."""
    return f"{PREFIX}{handler_id}" + (f":{flush}" if flush else "")


def handler_id_of(task: str) -> str | None:
    """The handler id inside a handler instance's task id, or None for any other id."""
    if not task.startswith(PREFIX):
        return None
    return task[len(PREFIX):].split(":", 1)[0]


@dataclass(frozen=True)
class Notifier:
    """A task whose change notifies a handler instance on the same host: its task id and its name."""

    task_id: str
    name: str


@dataclass(frozen=True)
class Instance:
    """One handler run point: the handler (by position in `handlers:`), where it runs, who notifies it."""

    task_id: str
    position: int
    flush: str | None                 # the flush_handlers step it runs at; None: after the last step
    notifiers: tuple[Notifier, ...]


@dataclass(frozen=True)
class Segment:
    """The action steps between two flush points (file order), and the flush step closing it (None: the end)."""

    steps: tuple[Step, ...]
    flush: Step | None


class HandlerIndex:
    """Handlers by id and by name (`notify:` may use either), in their include/role namespaces.

    A step notifies `X` in its own namespace first (a role's step names its role's handler), then at
    the top; a bare name that only one namespaced handler has (a role's) also finds it.
    """

    def __init__(self, handlers: list[Step]):
        self.handlers = handlers
        self.keys: dict[str, int] = {}
        self.bare: dict[str, list[int]] = {}
        for i, h in enumerate(handlers):
            ns = namespace_of(h)
            for key in (h.step_id, ns + h.name):
                self.keys.setdefault(key, i)
            for key in dict.fromkeys((h.step_id.removeprefix(ns), h.name)):
                self.bare.setdefault(key, []).append(i)

    def resolve(self, name: str, ns: str = "") -> int | None:
        """The position of the handler `name` refers to from namespace `ns`, or None."""
        for key in (ns + name, name):
            if key in self.keys:
                return self.keys[key]
        found = self.bare.get(name, [])
        return found[0] if len(found) == 1 else None

    def hint(self, name: str) -> str:
        """What to tell an author whose `notify` names no handler."""
        if not self.handlers:
            return "the playbook has no `handlers:`; add one with this name, or remove the `notify`"
        several = self.bare.get(name, [])
        if len(several) > 1:
            return "several roles or includes have it: name one as " + " or ".join(
                f"`{self.handlers[i].step_id}`" for i in several)
        return did_you_mean(name, set(self.keys)) or "known handlers: " + ", ".join(f"`{h.name}`" for h in self.handlers)


def enclosing_groups_of(step: Step) -> tuple:
    """The blocks, includes and roles around a flat step."""
    from runbook.compose import enclosing_groups

    return enclosing_groups(step)


def namespace_of(step: Step) -> str:
    """The include/role namespace a step is in ("" for the playbook's own)."""
    from runbook.compose import namespace

    return namespace(step)


def is_flush(step: Step) -> bool:
    """True for a `flush_handlers: true` step (a flush point, not a task)."""
    return bool(getattr(step, "flush_handlers", False))


def segments(steps: Iterable[Step]) -> list[Segment]:
    """The steps cut at every flush point; the last segment ends with the steps."""
    out: list[Segment] = []
    current: list[Step] = []
    for step in steps:
        if is_flush(step):
            out.append(Segment(tuple(current), step))
            current = []
        else:
            current.append(step)
    out.append(Segment(tuple(current), None))
    return out


def segment_instances(playbook: Playbook, index: HandlerIndex, segment: Segment) -> list[Instance]:
    """The handler instances of one segment, in `handlers:` order (a handler notified by a handler included)."""
    notified: dict[int, list[Notifier]] = {}
    for step in segment.steps:
        for name in step.notify:
            pos = index.resolve(name, namespace_of(step))
            if pos is not None:
                notified.setdefault(pos, []).append(Notifier(step.step_id, step.name))
    flush = segment.flush.step_id if segment.flush is not None else None
    out: list[Instance] = []
    for pos, handler in enumerate(playbook.handlers):
        if pos not in notified:
            continue
        inst = Instance(task_id(handler.step_id, flush), pos, flush, tuple(dict.fromkeys(notified[pos])))
        out.append(inst)
        for name in handler.notify:
            later = index.resolve(name, namespace_of(handler))
            if later is not None and later > pos:   # an earlier one is an error (check_handlers)
                notified.setdefault(later, []).append(Notifier(inst.task_id, handler.name))
    return out


def instances(playbook: Playbook) -> list[Instance]:
    """Every handler instance of the playbook, segment by segment."""
    if not playbook.handlers:
        return []
    index = HandlerIndex(playbook.handlers)
    return [inst for seg in segments(playbook.steps) for inst in segment_instances(playbook, index, seg)]


def tasks_per_host(playbook: Playbook) -> int:
    """How many tasks a host has from the main steps: action steps plus handler instances (flush points are none)."""
    return sum(1 for s in playbook.steps if not is_flush(s)) + len(instances(playbook))


# --- validation ----------------------------------------------------------------------------------

def check_handlers(playbook: Playbook) -> list[Problem]:
    """Misuse of handlers, notify and flush points, located: unknown or duplicate names, needs, order, actions."""
    problems = Problems()
    index = HandlerIndex(playbook.handlers)
    _check_duplicates(playbook, problems)
    for i, h in enumerate(playbook.handlers):
        if h.needs is not None:
            problems.add(f"handler `{h.step_id}` has `needs`", locate(playbook, h, "needs"),
                         "a handler runs after the steps that notify it; remove `needs`", code="handler-needs")
        if h.once:
            problems.add(f"handler `{h.step_id}` has `once: true`, which handlers do not support",
                         locate(playbook, h, "once"), "make it an ordinary `once: true` step", code="handler-once")
        if is_flush(h):
            problems.add("`flush_handlers` is a step of `steps:`, not a handler", locate(playbook, h, "flush_handlers"),
                         "move it into `steps:` where the handlers should run", code="flush-misplaced")
        if enclosing_groups_of(h):
            problems.add(f"handler `{h.step_id}` is inside a block or include in `handlers:`", locate(playbook, h),
                         "a handler is one step: give each step its own handler and notify them all", code="handler-group")
        for j, name in enumerate(h.notify):
            pos = index.resolve(name, namespace_of(h))
            if pos is not None and pos <= i:
                other = playbook.handlers[pos].step_id
                problems.add(f"handler `{h.step_id}` notifies `{name}`, which is " + ("itself" if pos == i else "listed before it"),
                             locate(playbook, h, "notify", j),
                             "handlers run in the order they are listed, so a handler can notify only one listed after it"
                             + ("" if pos == i else f"; move `{other}` below `{h.step_id}`"), code="notify-order")
    for section in ("steps", "on_failure", "handlers"):
        for step in getattr(playbook, section):
            _check_notify(playbook, section, step, index, problems)
            if section != "handlers" and is_flush(step):
                _check_flush(playbook, section, step, problems)
    return problems.items


def _check_duplicates(playbook: Playbook, problems: Problems) -> None:
    seen: dict[str, Step] = {}
    for h in playbook.handlers:
        for key, field in ((h.step_id, "id" if h.id else "name"), (namespace_of(h) + h.name, "name")):
            first = seen.get(key)
            if first is not None and first is not h:
                problems.add(f"duplicate handler {'id' if field == 'id' else 'name'} `{key}` (first used at line "
                             f"{locate(playbook, first).line})", locate(playbook, h, field),
                             "`notify` names a handler by its name or id: give each handler its own", code="duplicate-handler")
                break
            seen.setdefault(key, h)


def _check_notify(playbook: Playbook, section: str, step: Step, index: HandlerIndex, problems: Problems) -> None:
    if step.notify and section == "on_failure":
        problems.add(f"on_failure step `{step.step_id}` has `notify`", locate(playbook, step, "notify"),
                     "handlers run before on_failure steps; do the work in an on_failure step instead", code="notify-on-failure")
        return
    for j, name in enumerate(step.notify):
        if index.resolve(name, namespace_of(step)) is None:
            problems.add(f"`notify` names unknown handler `{name}`", locate(playbook, step, "notify", j), index.hint(name),
                         code="unknown-handler")


def _check_flush(playbook: Playbook, section: str, step: Step, problems: Problems) -> None:
    if section == "on_failure":
        problems.add("`flush_handlers` in `on_failure`", locate(playbook, step, "flush_handlers"),
                     "handlers run before on_failure steps; put the flush point in `steps:`", code="flush-misplaced")
    if step.actions_present():
        action = step.actions_present()[0]
        problems.add(f"a `flush_handlers: true` step cannot also have an action (`{action}`)",
                     locate(playbook, step, action), "put the action in a step of its own", code="flush-action")
        return
    extra = sorted(k for k in step.model_fields_set if k not in FLUSH_KEYS and getattr(step, k, None) not in (None, [], {}, False))
    if extra:
        key = str(type(step).model_fields[extra[0]].alias or extra[0])
        problems.add(f"a `flush_handlers: true` step takes only `name` and `id`, not `{key}`", locate(playbook, step, key),
                     "a flush point runs the handlers notified so far on every host that got there; it cannot be "
                     "conditional, neither itself nor through an enclosing block, include or role",
                     code="flush-keys")


# --- graph ---------------------------------------------------------------------------------------

def add_to_graph(playbook: Playbook, g: nx.DiGraph, problems: Problems) -> None:
    """Add handler instances to the main step graph and replace every flush step by the handlers it runs."""
    for p in check_handlers(playbook):
        problems.items.append(p)
    if not playbook.handlers and not any(is_flush(s) for s in playbook.steps):
        return   # nothing to add (the common case: no work per step)
    index = HandlerIndex(playbook.handlers)
    n = len(playbook.handlers) + 1
    point: list[str] = []            # what the previous flush point leaves for the next segment to wait on
    count = 0
    for seg in segments(playbook.steps):
        scope = {s.step_id for s in seg.steps if s.step_id in g} | set(point)
        leaves = sorted((v for v in scope if not any(w in scope for w in g.successors(v))), key=lambda v: g.nodes[v]["index"])
        base = g.nodes[seg.flush.step_id]["index"] if seg.flush is not None and seg.flush.step_id in g else len(playbook.steps)
        previous = leaves
        found = segment_instances(playbook, index, seg)
        count += len(found)
        if count > MAX_INSTANCES:
            problems.add(f"the handlers expand to more than {MAX_INSTANCES} handler runs per host",
                         locate(playbook, seg.flush or playbook.handlers[0]),
                         "each flush_handlers point runs its own copy of every handler notified before it; "
                         "use fewer flush points or fewer handlers", code="too-many-handlers")
            return
        gates = _gates(g, leaves, seg.flush.step_id if seg.flush is not None else None)
        for inst in found:
            handler = playbook.handlers[inst.position]
            g.add_node(inst.task_id, step=handler, index=base + (inst.position + 1) / n, handler=inst,
                       **({"gates": gates} if gates else {}))
            g.add_edges_from((p, inst.task_id) for p in previous)
            previous = [inst.task_id]
        point = previous
        if seg.flush is not None and seg.flush.step_id in g:
            flush = seg.flush.step_id
            after = list(g.successors(flush))
            moved = tuple(g.nodes[flush].get("gates", ()))
            g.remove_node(flush)
            g.add_edges_from((p, s) for p in point for s in after)
            for s in after:   # the flush point waited for a block's outcome: the steps after it still do
                if moved:
                    g.nodes[s]["gates"] = tuple(dict.fromkeys((*g.nodes[s].get("gates", ()), *moved)))
    _check_cycles(playbook, g, problems)


def _gates(g: nx.DiGraph, leaves: list[str], flush: str | None) -> tuple[str, ...]:
    """The groups whose outcome a segment's handlers wait for: a host whose block failed (and was not
    rescued) runs no handler, even when the block's `always:` steps, the segment's leaves, succeeded."""
    from runbook.compose import enclosing_groups

    found: list[str] = list(g.nodes[flush].get("gates", ())) if flush is not None and flush in g else []
    for leaf in leaves:
        node = g.nodes[leaf]
        found.extend(node.get("gates", ()))
        if "handler" not in node:
            found.extend(gid for gid, _, _ in enclosing_groups(node["step"]))
    return tuple(dict.fromkeys(found))


def _check_cycles(playbook: Playbook, g: nx.DiGraph, problems: Problems) -> None:
    """A step before a flush point that needs one after it makes a loop through the flush point."""
    if not any(is_flush(s) for s in playbook.steps) or problems.errors:
        return
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = [edge[0] for edge in cycle] + [cycle[0][0]]
    by_id = {s.step_id: s for s in playbook.steps}
    first = next((by_id[v] for v in path if v in by_id and by_id[v].needs), None) or next(by_id[v] for v in path if v in by_id)
    problems.add(f"dependency cycle through a flush_handlers point: {' -> '.join(path)}", locate(playbook, first, "needs"),
                 "a step before a `flush_handlers` step cannot need a step after it", code="cycle")


def instance_of(g: nx.DiGraph, node: str) -> Instance | None:
    """The handler instance a step-graph node is, or None for a step."""
    data = g.nodes[node] if node in g else None
    return data.get("handler") if data else None


def describe(inst: Instance) -> str:
    """One line for renderings: what notifies the instance and where it runs."""
    where = f"at flush `{inst.flush}`" if inst.flush else "at the end"
    return f"handler {where}, notified by {', '.join(n.task_id for n in inst.notifiers)}"


# --- run time ------------------------------------------------------------------------------------

class Notice(str, Enum):
    """Whether a handler instance is notified on a host."""

    NOTIFIED = "notified"
    NOT_NOTIFIED = "not_notified"
    UNKNOWN = "unknown"          # a plan: a notifier's prediction is unknown

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """A notice and the reason shown for it (it names the notifiers)."""

    notice: Notice
    reason: str


_AS_PREDICTION: dict[Any, PredictionKind] = {Status.CHANGED: PredictionKind.CHANGE, Status.UNKNOWN: PredictionKind.UNKNOWN}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _names(notifiers: list[Notifier]) -> str:
    """Notifier names for a reason, control characters as escapes (a reason reaches terminals and warnings)."""
    return ", ".join("`" + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", n.name) + "`" for n in notifiers)


class Notifications:
    """Handler instances and their verdicts, read from the results of their notifier tasks.

    `results` is the controller's record of every task so far (the scheduler's, with an earlier run's
    on resume): only there is every notifier's result known, so only there is a handler's run decided
    (a cluster worker gets the decision with the task). A `once: true` notifier ran on one host for
    all of them: its change notifies the handler on every host (as Ansible's run_once).
    """

    def __init__(self, g: nx.DiGraph, hosts: Iterable[str]):
        self.instances: dict[str, Instance] = {v: d["handler"] for v, d in g.nodes(data=True) if "handler" in d}
        watched = {n.task_id for inst in self.instances.values() for n in inst.notifiers}
        self.once = {v for v in watched if v in g and getattr(g.nodes[v]["step"], "once", False)}
        self.hosts = list(hosts)
        self.results: Mapping[Any, Any] | None = None   # set on the controller (the executor's scheduler results)

    def instance(self, task: str) -> Instance | None:
        """The handler instance a task id names, or None."""
        return self.instances.get(task) if self.instances else None

    def _result(self, source: Mapping[Any, Any], task: str, host: str) -> Any:
        if task in self.once:   # keyed by the host it ran on (the first, or the next when that one was unreachable)
            return next((source[(task, h)] for h in self.hosts if (task, h) in source), None)
        return source.get((task, host))   # a TaskKey is a (step id, host) tuple

    def verdict(self, inst: Instance, host: str, *, plan: bool, results: Mapping[Any, Any] | None = None) -> Verdict:
        """Whether `inst` runs on `host`: a notifier changed (or, in a plan, is predicted to), none did, or unknown."""
        source = results if results is not None else self.results or {}
        changed: list[Notifier] = []
        unknown: list[Notifier] = []
        quiet: list[Notifier] = []
        for n in inst.notifiers:
            res = self._result(source, n.task_id, host)
            # A prediction when there is one (a cluster worker knows only its ancestors' predictions), else the status.
            kind = getattr(res, "prediction", None) or _AS_PREDICTION.get(getattr(res, "status", None))
            (changed if kind == PredictionKind.CHANGE else unknown if kind == PredictionKind.UNKNOWN else quiet).append(n)
        if changed:
            return Verdict(Notice.NOTIFIED, f"notified by {_names(changed)} ({'predicted change' if plan else 'changed'})")
        if unknown:
            what = "changes (its prediction is unknown)" if len(unknown) == 1 else "change (their predictions are unknown)"
            return Verdict(Notice.UNKNOWN, f"notified only if {_names(unknown)} {what}")
        verb = "is predicted no change" if plan else "did not change"
        if len(quiet) > 1:
            verb = "are predicted no change" if plan else "did not change"
        return Verdict(Notice.NOT_NOTIFIED, f"not notified: {_names(quiet)} {verb} on this host")
