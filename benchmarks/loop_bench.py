"""What a loop costs per item, against the same work written as one step per item, on local hosts.

    python -m benchmarks.loop_bench [--items 1000] [--hosts 2] [--sleep 0.01] [--concurrency 8] [--reps 3]

Three playbooks do the same `sleep SLEEP` N times per host: N separate steps, one step looping over
N items in order, and the loop with `loop_concurrency`. Each runs REPS times (audit trail and run
state on, as in a real run); prints one JSON object with the median wall times and the engine's
overhead per item beyond the sleeps. Asserts nothing: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def _inventory(root: Path, hosts: int) -> Path:
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump({"all": {"hosts": {f"h{i}": {"ansible_connection": "local"} for i in range(hosts)}}}))
    return path


def _playbooks(root: Path, items: int, sleep: float, concurrency: int) -> dict[str, Path]:
    cmd = f"sleep {sleep}"
    shapes: dict[str, list[dict[str, Any]]] = {
        "steps": [{"name": f"s{i}", "shell": cmd} for i in range(items)],
        "loop": [{"name": "each", "shell": cmd, "loop": f"range({items})"}],
        "loop_concurrent": [{"name": "each", "shell": cmd, "loop": f"range({items})", "loop_concurrency": concurrency}],
    }
    out = {}
    for name, steps in shapes.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump({"runbook": name, "concurrency": 50, "steps": steps}, sort_keys=False))
        out[name] = path
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Median wall time of each shape over the repetitions, and the overhead per item beyond the sleeps."""
    from runbook import run

    figures: dict[str, Any] = {"items": args.items, "hosts": args.hosts, "sleep": args.sleep,
                               "loop_concurrency": args.concurrency, "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="runbook-loop-bench-") as tmp:
        root = Path(tmp)
        inv = _inventory(root, args.hosts)
        books = _playbooks(root, args.items, args.sleep, args.concurrency)
        for name, pb in books.items():
            walls = []
            for rep in range(args.reps):
                started = time.perf_counter()
                result = run(pb, str(inv), audit_log=str(root / f"audit-{name}-{rep}.jsonl"), state_dir=str(root / "runs"))
                walls.append(time.perf_counter() - started)
                if result.exit_code() != 0:
                    raise RuntimeError(f"{name} failed: exit {result.exit_code()}")
            median = statistics.median(walls)
            serial_sleep = args.items * args.sleep / (args.concurrency if name == "loop_concurrent" else 1)
            figures[name] = {"wall_median_s": round(median, 3), "walls_s": [round(w, 3) for w in walls],
                             "overhead_per_item_ms": round(max(0.0, median - serial_sleep) * 1000 / args.items, 3)}
    return figures


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure, print the figures as JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.loop_bench", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.01, help="seconds each item's command sleeps")
    p.add_argument("--concurrency", type=int, default=8, help="loop_concurrency of the third shape")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(measure(args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
