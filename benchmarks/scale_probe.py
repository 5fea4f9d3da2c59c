"""Scale without SSH, measured in a process of its own: load + validate + expand + order, and memory.

    python -m benchmarks.scale_probe PLAYBOOK INVENTORY

Prints one JSON object: seconds per phase (imports excluded, reported apart), the task count, and
the process's peak RSS after the imports and at the end (KiB). Nothing is executed on any host.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    playbook_path, inventory_path = args[0], args[1]
    t0 = time.perf_counter()
    import networkx as nx

    from runbook.graph import StepGraph, expand
    from runbook.inventory import Inventory
    from runbook.loader import load_playbook

    t_import = time.perf_counter() - t0
    rss_after_imports = _peak_kib()
    phases: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        value = fn()
        phases[name] = round(time.perf_counter() - start, 6)
        return value

    inventory = timed("load_inventory", lambda: Inventory.load(inventory_path))
    playbook = timed("load_validate_playbook", lambda: load_playbook(playbook_path))
    hosts = timed("select_hosts", lambda: inventory.select(playbook.hosts, None))
    steps = timed("step_graph", lambda: StepGraph.build(playbook))
    tasks = timed("expand_task_graph", lambda: expand(steps, [h.name for h in hosts]))
    # A dependency order of every task (what a scheduler needs before it starts), and the order a
    # plan lists its predictions in: host by host, steps in playbook order.
    order = timed("order_tasks", lambda: list(nx.topological_sort(tasks)))
    position = {h.name: i for i, h in enumerate(hosts)}
    step_index = {sid: i for i, sid in enumerate(steps.order())}
    timed("plan_listing_order", lambda: sorted(tasks, key=lambda n: (position[n[1]], step_index[n[0]])))
    total = round(sum(phases.values()), 6)
    print(json.dumps({
        "hosts": len(hosts), "steps": len(steps.graph), "tasks": tasks.number_of_nodes(),
        "edges": tasks.number_of_edges(), "ordered": len(order), "import_time": round(t_import, 6),
        "phases": phases, "total_time": total, "rss_after_imports_kib": rss_after_imports,
        "peak_rss_kib": _peak_kib(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
