"""Step graph and (step, host) task graph on networkx: defaults, cycles, order, layers, renderings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable, Iterable
from typing import NamedTuple

import networkx as nx

from runbook import handlers
from runbook.compose import Group, units
from runbook.errors import PlaybookError, Problems, did_you_mean
from runbook.model import Playbook, Step

class TaskKey(NamedTuple):
    """One task: a step on a host (on_failure steps too: step ids are unique across both sections)."""

    step_id: str
    host: str


def _locate(playbook: Playbook, section: str, index: int, key: str | None = None, item: int | None = None):
    # A composed step knows its own file and place (it may come from a block, an include or a role).
    from runbook.compose import locate

    step = getattr(playbook, section)[index]
    return locate(playbook, step, *((key,) if key else ()), *((item,) if item is not None else ()))


@dataclass
class StepGraph:
    """Steps as a DAG: an edge a -> b means b needs a. Main steps and on_failure steps are separate graphs."""

    playbook: Playbook
    graph: nx.DiGraph
    rescue: nx.DiGraph

    @classmethod
    def build(cls, playbook: Playbook) -> StepGraph:
        """Build both graphs, raising PlaybookError with every id, needs and cycle problem."""
        problems = Problems()
        seen: dict[str, tuple[str, int]] = {}
        for section in ("steps", "on_failure"):
            for i, step in enumerate(getattr(playbook, section)):
                sid = step.step_id
                if sid in seen:
                    first_section, first_i = seen[sid]
                    first = _locate(playbook, first_section, first_i)
                    problems.add(f"duplicate step id `{sid}` (first used at line {first.line})",
                                 _locate(playbook, section, i, "id" if step.id else "name"),
                                 "give one of the steps an explicit, unique `id:`", code="duplicate-id")
                else:
                    seen[sid] = (section, i)
        graphs = [cls._section_graph(playbook, section, problems) for section in ("steps", "on_failure")]
        # Handler instances join the main graph; flush_handlers steps are replaced by the handlers they run.
        handlers.add_to_graph(playbook, graphs[0], problems)
        problems.raise_if_errors(PlaybookError)
        return cls(playbook, graphs[0], graphs[1])

    @staticmethod
    def _section_graph(playbook: Playbook, section: str, problems: Problems) -> nx.DiGraph:
        steps: list[Step] = getattr(playbook, section)
        g = nx.DiGraph()
        ids = [s.step_id for s in steps]
        for i, step in enumerate(steps):
            g.add_node(step.step_id, step=step, index=i)
        if any(grp.section == section for grp in playbook._groups.values()):
            _composed_edges(playbook, section, g, problems)
            _cycle_problem(playbook, section, g, problems)
            return g
        for i, step in enumerate(steps):
            sid = step.step_id
            if step.needs is None:
                # a duplicate id (reported above) must not turn the default into a self-dependency
                needs = [ids[i - 1]] if i > 0 and ids[i - 1] != sid else []
            else:
                needs = step.needs
            for j, need in enumerate(needs):
                if need == sid:
                    problems.add(f"step `{sid}` needs itself", _locate(playbook, section, i, "needs", j),
                                 "remove it from its own `needs`", code="self-dependency")
                elif need not in g:
                    other = "on_failure" if section == "steps" else "steps"
                    if any(s.step_id == need for s in getattr(playbook, other)):
                        hint = f"`{need}` is in `{other}`; a step can only need steps of its own section"
                    else:
                        hint = did_you_mean(need, ids) or f"known ids: {', '.join(dict.fromkeys(ids))}"
                    problems.add(f"step `{sid}` needs unknown step `{need}`", _locate(playbook, section, i, "needs", j),
                                 hint, code="unknown-needs")
                else:
                    g.add_edge(need, sid)
        _cycle_problem(playbook, section, g, problems)
        return g

    def step(self, step_id: str) -> Step:
        """The step with this id."""
        g = self.graph if step_id in self.graph else self.rescue
        return g.nodes[step_id]["step"]

    def order(self) -> list[str]:
        """Main step ids in a topological order that keeps the file order where it can."""
        return list(nx.lexicographical_topological_sort(self.graph, key=lambda n: self.graph.nodes[n]["index"]))

    def rescue_order(self) -> list[str]:
        """on_failure step ids in order."""
        return list(nx.lexicographical_topological_sort(self.rescue, key=lambda n: self.rescue.nodes[n]["index"]))

    def layers(self) -> list[list[str]]:
        """Main steps in topological generations: the steps of one layer can run in parallel."""
        return [sorted(layer, key=lambda n: self.graph.nodes[n]["index"]) for layer in nx.topological_generations(self.graph)]

    def upstream(self, step_id: str) -> set[str]:
        """Every step this step depends on, directly or not."""
        return nx.ancestors(self.graph, step_id)

    def critical_path_length(self, weight: dict[str, float]) -> float:
        """The longest dependency chain under the given step weights (a lower bound for wall time)."""
        best: dict[str, float] = {}
        for n in self.order():
            best[n] = weight.get(n, 0.0) + max((best[p] for p in self.graph.predecessors(n)), default=0.0)
        return max(best.values(), default=0.0)

    # --- renderings -------------------------------------------------------------------------

    def to_text(self) -> str:
        """Layers as text: each layer's steps can run at the same time."""
        lines = [f"runbook: {self.playbook.runbook}"]
        shown: dict[str, list[str]] = {}
        for a, b, _ in _shown_edges(self):   # with blocks: the direct dependencies, not every implied one
            shown.setdefault(b, []).append(a)
        for i, layer in enumerate(self.layers(), 1):
            parallel = "  (parallel)" if len(layer) > 1 else ""
            lines.append(f"layer {i}{parallel}")
            for sid in layer:
                step = self.step(sid)
                needs = sorted(shown.get(sid, []), key=lambda n: self.graph.nodes[n]["index"])
                after = f"  <- {', '.join(needs)}" if needs else ""
                inst = handlers.instance_of(self.graph, sid)
                note = f"  ({handlers.describe(inst)})" if inst else ""
                lines.append(f"  {sid} [{step.action}]{after}{note}")
        if self.rescue:
            lines.append("on_failure")
            for sid in self.rescue_order():
                lines.append(f"  {sid} [{self.step(sid).action}]")
        if self.playbook._groups:
            lines.append("structure")
            lines.extend(_nested(self, units(self.playbook, "steps"),
                                 replace(_TEXT, step=lambda u: f"{u} [{self.step(u).action}]"), "  "))
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT, one node per step, ranked by layer."""
        def q(text: str) -> str:
            escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
            return '"' + escaped + '"'

        out = [f"digraph {q(self.playbook.runbook)} {{", "  rankdir=TB;", "  node [shape=box, style=rounded];"]
        composed = bool(self.playbook._groups)
        for layer in [] if composed else self.layers():   # rank rows would fight the block clusters
            out.append("  { rank=same; " + " ".join(q(s) for s in layer) + " }")
        for sid in self.order():
            step = self.step(sid)
            inst = handlers.instance_of(self.graph, sid)
            style = ", style=\"rounded,dashed\"" if inst else ""   # a handler: runs only when notified
            out.append(f"  {q(sid)} [label={q(step.name + chr(10) + '[' + step.action + ']')}{style}];")
        if composed:
            out.extend(_nested(self, units(self.playbook, "steps"), _Nest(
                step=lambda u: f"{q(u)};",
                group=lambda g: f"subgraph {q('cluster_' + g.id)} {{ label={q(_group_title(g))};",
                part=lambda g, part: f"subgraph {q('cluster_' + g.id + '/' + part)} {{ label={q(part)}; style=dashed;",
                end="}"), "  "))
        for a, b, settled in _shown_edges(self):
            out.append(f"  {q(a)} -> {q(b)}{' [style=dashed]' if settled else ''};")
        if self.rescue:
            out.append('  subgraph "cluster_on_failure" { label="on_failure"; style=dashed;')
            for sid in self.rescue_order():
                out.append(f"    {q(sid)} [label={q(self.step(sid).name)}];")
            for a, b in self.rescue.edges:
                out.append(f"    {q(a)} -> {q(b)};")
            out.append("  }")
        out.append("}")
        return "\n".join(out)

    def to_mermaid(self) -> str:
        """A Mermaid flowchart."""
        ids = {sid: f"s{i}" for i, sid in enumerate([*self.order(), *self.rescue_order()])}

        def label(sid: str) -> str:
            step = self.step(sid)
            text = f'"{_mermaid_text(step.name)}<br/><small>{_mermaid_text(sid)} · {step.action}</small>"'
            if handlers.instance_of(self.graph, sid):
                return f"{ids[sid]}{{{{{text}}}}}"   # a hexagon: a handler, which runs only when notified
            return f'{ids[sid]}[{text}]'

        out = ["flowchart TD"]
        if self.playbook._groups:   # each step inside the subgraph of its block, include or role
            out.extend(_nested(self, units(self.playbook, "steps"), _Nest(
                step=label, group=lambda g: f'subgraph g{g.number}["{_mermaid_text(_group_title(g))}"]',
                part=lambda g, part: f'subgraph g{g.number}_{part}["{part}"]', end="end"), "  "))
        else:
            for sid in self.order():
                out.append(f"  {label(sid)}")
        for a, b, settled in _shown_edges(self):
            out.append(f"  {ids[a]} {'-.->' if settled else '-->'} {ids[b]}")
        if self.rescue:
            out.append("  subgraph on_failure")
            for sid in self.rescue_order():
                out.append(f"    {label(sid)}")
            for a, b in self.rescue.edges:
                out.append(f"    {ids[a]} --> {ids[b]}")
            out.append("  end")
        return "\n".join(out)


def _shown_edges(steps: StepGraph) -> list[tuple[str, str, bool]]:
    """The edges a rendering draws: all of them, or with blocks, only those no longer path implies."""
    g = steps.graph
    if not steps.playbook._groups:
        return [(a, b, False) for a, b in g.edges]
    reduced = nx.transitive_reduction(g)
    return [(a, b, bool(g.edges[a, b].get("settled"))) for a, b in g.edges if reduced.has_edge(a, b)]


def _group_title(grp: Group) -> str:
    what = {"block": "block", "include": "include", "role": "role"}[grp.kind]
    return f"{what} {grp.id}" + (f": {grp.name}" if grp.kind == "block" and grp.name != grp.id else "")


@dataclass(frozen=True)
class _Nest:
    """How one rendering writes the tree of groups: a step's line, a group's and a part's opening, their closing."""

    step: Callable[[str], str]
    group: Callable[[Group], str]
    part: Callable[[Group, str], str]
    end: str | None = None     # what closes a group or a part; None: the indentation alone shows it


_TEXT = _Nest(step=lambda unit: unit, group=_group_title, part=lambda grp, part: part)


def _nested(steps: StepGraph, members: list[str], nest: _Nest, indent: str) -> list[str]:
    """Steps and groups (blocks with their rescue/always parts, includes, roles) as nested lines."""
    out: list[str] = []
    for unit in members:
        grp = steps.playbook._groups.get(unit)
        if grp is None:
            if unit in steps.graph:
                out.append(indent + nest.step(unit))
            continue
        out.append(indent + nest.group(grp))
        out.extend(_nested(steps, grp.parts.get("block", []), nest, indent + "  "))
        for part in ("rescue", "always"):
            if part in grp.parts:
                out.append(f"{indent}  {nest.part(grp, part)}")
                out.extend(_nested(steps, grp.parts[part], nest, indent + "    "))
                if nest.end is not None:
                    out.append(f"{indent}  {nest.end}")
        if nest.end is not None:
            out.append(indent + nest.end)
    return out


def _composed_edges(playbook: Playbook, section: str, g: nx.DiGraph, problems: Problems) -> None:
    """Edges of a section with blocks, includes or roles; `settled` edges run whatever the dependency's status."""
    from runbook.compose import section_edges

    found = section_edges(playbook, section, {sid: g.nodes[sid]["step"] for sid in g}, problems)
    for (a, b), settled in found.edges.items():
        if settled:
            g.add_edge(a, b, settled=True)
        else:
            g.add_edge(a, b)
    for sid, gates in found.gates.items():
        g.nodes[sid]["gates"] = tuple(gates)


def _cycle_problem(playbook: Playbook, section: str, g: nx.DiGraph, problems: Problems) -> None:
    """A dependency cycle, located at an explicit `needs` entry that makes it."""
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = [edge[0] for edge in cycle] + [cycle[0][0]]
    # Point at an explicit `needs` entry that makes the loop (a default edge has no text to point at).
    where = _locate(playbook, section, g.nodes[cycle[-1][1]]["index"], "needs")
    for u, v in reversed(cycle):
        target: Step = g.nodes[v]["step"]
        if target.needs is not None and (u in target.needs or u.rsplit("/", 1)[-1] in target.needs):
            item = target.needs.index(u) if u in target.needs else target.needs.index(u.rsplit("/", 1)[-1])
            where = _locate(playbook, section, g.nodes[v]["index"], "needs", item)
            break
    problems.add(f"dependency cycle: {' -> '.join(path)}", where,
                 "remove one of these `needs` so the steps can run in order", code="cycle")


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label: quotes and angle brackets as entity codes, newlines as breaks."""
    return (text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#60;").replace(">", "#62;")
            .replace("\r", "").replace("\n", "<br/>"))


def expand(steps: StepGraph, hosts: Iterable[str], step_ids: Iterable[str] | None = None) -> nx.DiGraph:
    """The (step, host) task DiGraph: each host gets its own copy of the step graph.

    A `once: true` step becomes a single task on the first host, and every host's tasks that need it
    wait for that one task. `step_ids` restricts the graph to some steps (e.g. for resume).
    """
    hosts = list(hosts)
    g = nx.DiGraph()
    if not hosts:
        return g
    wanted = set(step_ids) if step_ids is not None else set(steps.graph.nodes)
    once = {sid for sid in steps.graph if steps.step(sid).once}
    first = hosts[0]
    for sid in steps.order():
        if sid not in wanted:
            continue
        targets = [first] if sid in once else hosts
        g.add_nodes_from(TaskKey(sid, h) for h in targets)  # bulk adds: same graph, ~2x faster at 100,000 tasks
    for a, b, settled in steps.graph.edges(data="settled"):
        if a not in wanted or b not in wanted:
            continue
        pairs = ((TaskKey(a, first) if a in once else TaskKey(a, h), TaskKey(b, h)) for h in ([first] if b in once else hosts))
        if settled:   # into a block's rescue/always steps, or after a block with them: runs whatever a's status
            g.add_edges_from(pairs, settled=True)
        else:
            g.add_edges_from(pairs)
    return g
