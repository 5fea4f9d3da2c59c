"""`python -m benchmarks.cluster_bench`: the distributed path (`--cluster`) against the in-process run and raw Fabric.

Hosts × steps of trivial commands on real sshd hosts, four ways, alternated after one warm-up each:
in-process; `--cluster local:2` (the run starts and stops its own two worker processes); `--cluster
tcp://` to a scheduler and two `runbook worker` processes started beforehand (the run itself); and the
Fabric floor (benchmarks/floor.py). The running cluster is paused (SIGSTOP) while the other ways are
timed, so they do not share the cores with its idle processes. Prints medians, the controller's CPU,
and the per-task overhead of the distributed path: (cluster wall - in-process wall) / tasks. Figures
only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.suite import REPO, child_env, fanout_playbook, median, median_interval, runbook_argv

SCALE_CONCURRENCY = 100   # hosts at once in the scale run: each sshd here takes a few new connections at a time
TARGET_RATIO = 1.3   # the distributed path within 1.3x of the in-process run (a goal, reported)
RESUME_SETTLE = 1.0  # seconds for a resumed cluster's heartbeats to come round before it is timed
WAYS = ("in_process", "local_2", "running_cluster_2", "fabric")
DISTRIBUTED = ("local_2", "running_cluster_2")
CONFIDENCE = 0.95    # of the paired ratio's interval; 6 pairs at least reach it


def timed_cpu(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 900.0) -> tuple[float, float, int, str, str]:
    """Run argv; return wall seconds, the process's own CPU seconds, exit status, stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (wall, usage.ru_utime + usage.ru_stime, proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)


class ClusterProcs:
    """A `dask scheduler` and N `runbook worker` processes on loopback, started once for the benchmark."""

    def __init__(self, workers: int, env: dict[str, str], log_dir: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        dask = str(Path(sys.executable).parent / "dask")
        from runbook.cluster.settings import dask_environment

        # The scheduler as docs/cluster.md recommends running it: with runbook's Dask settings.
        self.procs = [_spawn([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                             log_dir / "scheduler.log", dask_environment(env))]
        for i in range(workers):
            self.procs.append(_spawn([*runbook_argv(), "worker", self.address, "--name", f"bench-{i}"],
                                     log_dir / f"worker-{i}.log", env))
        from distributed import Client

        deadline = time.monotonic() + 60
        with Client(self.address, timeout=30, set_as_default=False) as client:
            while len(client.scheduler_info(n_workers=-1)["workers"]) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster workers did not start")
                time.sleep(0.2)

    def pause(self) -> None:
        """Stop the cluster's processes (SIGSTOP) while other ways are timed: idle, they still take CPU."""
        for p in self.procs:
            p.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let them run again, and settle (a heartbeat round) before a run is timed on them."""
        for p in self.procs:
            p.send_signal(signal.SIGCONT)
        time.sleep(RESUME_SETTLE)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the scheduler and by the workers (together)."""
        import psutil

        times = [psutil.Process(p.pid).cpu_times() for p in self.procs]
        return {"scheduler": times[0].user + times[0].system, "workers": sum(t.user + t.system for t in times[1:])}

    def stop(self) -> None:
        from tests.helpers import stop_processes

        stop_processes(self.procs[1:])   # the workers first: a close crossing the scheduler's can hang
        stop_processes(self.procs[:1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration for each host count; the figures."""
    from tests.sshd import SSHDHarness, write_inventory, write_known_hosts

    counts = sorted({int(x) for x in args.hosts.split(",") if x.strip()})
    out: dict[str, Any] = {"steps": args.steps, "reps": args.reps, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="runbook-cluster-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        env = child_env(work / "pycache")
        (work / "sshd").mkdir()
        harness = SSHDHarness(count=max(counts), base_dir=work / "sshd")
        hosts = harness.start()
        cluster = None
        try:
            known = write_known_hosts(work / "known_hosts", hosts)
            cluster = ClusterProcs(2, env, work)
            cluster.pause()
            playbook = fanout_playbook(work / "fanout.yml", args.steps)
            for count in counts:
                inventory = write_inventory(work / f"inv-{count}.yml", hosts[:count])
                spec = work / f"floor-{count}.json"
                spec.write_text(json.dumps({"hosts": [{"host": h.address, "port": h.port, "user": h.user,
                                                       "key_file": str(h.key_file)} for h in hosts[:count]],
                                            "commands": ["true"] * args.steps, "nodelay": True}))
                out["runs"].append(compare(count, args, env, work, playbook, inventory, known, spec, cluster,
                                           ways=args.ways))
                progress(out["runs"][-1])
            if args.latency_steps > 0:
                out["latency"] = latency(args, env, work, hosts[0], known, cluster)
                progress({"latency": out["latency"]})
            if args.scale:
                inventory = alias_inventory(work / f"inv-scale-{args.scale}.yml", hosts, args.scale)
                try:
                    out["scale"] = compare(args.scale, args, env, work, playbook, inventory, known, None,
                                           cluster, reps=1, ways=("in_process", "running_cluster_2"),
                                           concurrency=min(args.scale, SCALE_CONCURRENCY))
                except RuntimeError as exc:   # reported with the other figures, which still count
                    out["scale_failed"] = str(exc)[:2000]
                progress({"scale": out.get("scale"), "failed": out.get("scale_failed")})
        finally:
            if cluster is not None:
                cluster.stop()
            harness.stop()
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def progress(row: dict[str, Any]) -> None:
    """Each figure on stderr as soon as it is known (a long run stopped early keeps what it measured)."""
    print(json.dumps(row), file=sys.stderr, flush=True)


def alias_inventory(path: Path, hosts: list[Any], count: int) -> Path:
    """`count` inventory hosts over the running sshd servers (each name its own SSH connection)."""
    import yaml

    entries = {f"a{i}": hosts[i % len(hosts)].inventory_vars() for i in range(count)}
    path.write_text(yaml.safe_dump({"all": {"hosts": entries}}, sort_keys=False))
    return path


def latency(args: argparse.Namespace, env: dict[str, str], work: Path, host: Any, known: Path,
            address: ClusterProcs) -> dict[str, Any]:
    """The distributed path's added latency per task on a host's critical path: the slope over step counts."""
    from tests.sshd import write_inventory

    inventory = write_inventory(work / "inv-latency.yml", [host])
    walls: dict[str, dict[int, float]] = {"in_process": {}, "running_cluster_2": {}}
    for steps in (args.latency_steps // 6, args.latency_steps):
        playbook = fanout_playbook(work / f"latency-{steps}.yml", steps)
        row = compare(1, args, env, work, playbook, inventory, known, None, address, ways=tuple(walls), steps=steps)
        for name in walls:
            walls[name][steps] = row[name]["wall"]
    low, high = args.latency_steps // 6, args.latency_steps
    slope = {name: (w[high] - w[low]) / (high - low) for name, w in walls.items()}
    return {"steps": [low, high], "walls": walls, "ms_per_step": {k: round(v * 1000, 3) for k, v in slope.items()},
            "added_ms_per_task": round((slope["running_cluster_2"] - slope["in_process"]) * 1000, 3)}


def compare(count: int, args: argparse.Namespace, env: dict[str, str], work: Path, playbook: Path, inventory: Path,
            known: Path, spec: Path | None, cluster: ClusterProcs, *, reps: int | None = None,
            ways: tuple[str, ...] = WAYS,
            steps: int | None = None, concurrency: int | None = None) -> dict[str, Any]:
    tasks = count * (steps or args.steps)
    counter = iter(range(10**6))

    def runbook(*extra: str) -> dict[str, float]:
        argv = [*runbook_argv(), "run", str(playbook), "-i", str(inventory), "-c", str(concurrency or count),
                "--known-hosts", str(known),
                "--audit-log", str(work / f"audit-{next(counter)}.jsonl"), "--format", "json", *extra]
        wall, cpu, rc, stdout, stderr = timed_cpu(argv, env, work)
        done = sum(1 for r in json.loads(stdout or "{}").get("results", []) if r.get("status") in ("ok", "changed"))
        if rc != 0 or done != tasks:
            raise RuntimeError(f"runbook {' '.join(extra)}: exit {rc}, {done}/{tasks}\n{stderr[-2000:]}")
        return {"wall": wall, "cpu": cpu}

    def floor() -> dict[str, float]:
        wall, cpu, rc, stdout, stderr = timed_cpu([sys.executable, "-m", "benchmarks.floor", str(spec)], env, REPO)
        if rc != 0:
            raise RuntimeError(f"floor: exit {rc}\n{stderr[-2000:]}")
        return {"wall": wall, "cpu": cpu}

    def on_cluster() -> dict[str, float]:
        cluster.resume()   # paused while the other ways run: their figures do not pay for its idle processes
        try:
            before = cluster.cpu()
            row = runbook("--cluster", cluster.address)
            after = cluster.cpu()
        finally:
            cluster.pause()
        return {**row, **{f"{k}_cpu": after[k] - before[k] for k in after}}

    every = {"in_process": lambda: runbook(), "local_2": lambda: runbook("--cluster", "local:2"),
             "running_cluster_2": on_cluster, "fabric": floor}
    chosen = {k: every[k] for k in ways}
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in chosen}
    if reps is None:
        for fn in chosen.values():
            fn()   # warm-up
    for rep in range(reps or args.reps):
        order = list(chosen) if rep % 2 == 0 else list(reversed(chosen))
        for name in order:
            samples[name].append(chosen[name]())
    row: dict[str, Any] = {"hosts": count, "tasks": tasks, "concurrency": concurrency or count}
    for name, values in samples.items():
        row[name] = {k: median([v[k] for v in values]) for k in values[0]}
    base = row["in_process"]["wall"]
    for name in DISTRIBUTED:
        if name in row:
            row[name]["vs_in_process"] = round(row[name]["wall"] / base, 3)
            row[name]["overhead_ms_per_task"] = round((row[name]["wall"] - base) / tasks * 1000, 3)
            row[name].update(paired(samples["in_process"], samples[name]))
    if "fabric" in row:
        row["in_process"]["vs_fabric"] = round(base / row["fabric"]["wall"], 3)
    return row


def paired(base: list[dict[str, float]], way: list[dict[str, float]]) -> dict[str, Any]:
    """Each repetition's ratio to the in-process run just beside it: their median, and its interval.

    Both runs of a repetition share the machine's phase, so the ratios move much less than either
    median does on a machine whose speed drifts; the interval says whether the target is shown.
    """
    ratios = [w["wall"] / b["wall"] for b, w in zip(base, way, strict=True)]
    interval = median_interval(ratios, CONFIDENCE)
    if interval.confidence < CONFIDENCE:
        verdict = f"too few pairs for {CONFIDENCE:.0%}"
    elif interval.high <= TARGET_RATIO:
        verdict = "within"
    elif interval.low > TARGET_RATIO:
        verdict = "above"
    else:
        verdict = "not settled"
    return {"ratios": [round(r, 3) for r in ratios], "ratio_median": median(ratios),
            "ratio_interval": [round(interval.low, 3), round(interval.high, 3)],
            "ratio_confidence": round(interval.confidence, 3), "target": verdict}


def table(figures: dict[str, Any]) -> str:
    lines = [f"cluster: {figures['steps']} steps per host, median of {figures['reps']}, {figures['cpus']} CPUs "
             "(cpu: the run's process and what it waited for; workers/scheduler: the running cluster's processes)",
             f"{'hosts':>5} {'way':<18} {'wall s':>7} {'cpu s':>7} {'workers':>7} {'sched':>6} {'x in-proc':>9} {'ms/task':>8}"]
    for row in figures["runs"]:
        for name in (n for n in WAYS if n in row):
            r = row[name]
            lines.append(f"{row['hosts']:>5} {name:<18} {r['wall']:>7.2f} {r['cpu']:>7.2f} {r.get('workers_cpu', ''):>7} "
                         f"{r.get('scheduler_cpu', ''):>6} {r.get('vs_in_process', ''):>9} {r.get('overhead_ms_per_task', ''):>8}")
    lines.append(f"paired: each repetition's wall against the in-process run beside it (median; "
                 f"{figures['reps']} pairs; interval: distribution-free, for that median)")
    for row in figures["runs"]:
        for name in (n for n in DISTRIBUTED if n in row):
            r = row[name]
            low, high = r["ratio_interval"]
            lines.append(f"{row['hosts']:>5} {name:<18} x{r['ratio_median']:.3f}  {r['ratio_confidence']:.0%} in "
                         f"[{low:.3f}, {high:.3f}]  target {TARGET_RATIO}x: {r['target']}")
    lat = figures.get("latency")
    if lat:
        lines.append(f"critical-path latency per task (1 host, {lat['steps'][0]} vs {lat['steps'][1]} steps): in-process "
                     f"{lat['ms_per_step']['in_process']} ms, cluster {lat['ms_per_step']['running_cluster_2']} ms "
                     f"(+{lat['added_ms_per_task']} ms)")
    scale = figures.get("scale")
    if scale:
        lines.append(f"scale: {scale['hosts']} hosts x {figures['steps']} steps: in-process {scale['in_process']['wall']:.1f} s "
                     f"(controller CPU {scale['in_process']['cpu']:.1f} s), running cluster of 2 "
                     f"{scale['running_cluster_2']['wall']:.1f} s (controller CPU {scale['running_cluster_2']['cpu']:.1f} s)")
    lines.append(f"load average at the end: {figures.get('loadavg_end')}")
    lines.append(f"target: the distributed path within {TARGET_RATIO}x of the in-process run (reported, not asserted)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_bench", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="30,100", help="host counts (default 30,100)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--latency-steps", type=int, default=60,
                   help="steps of the 1-host latency run (and a sixth of it); 0: no latency run")
    p.add_argument("--scale", type=int, default=0, help="also one run of this many hosts (names over the sshd servers)")
    p.add_argument("--ways", default=",".join(WAYS),
                   help=f"the ways compared at each host count, in_process first (default {','.join(WAYS)})")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    args.ways = tuple(w.strip() for w in args.ways.split(",") if w.strip())
    if args.ways[:1] != ("in_process",) or not set(args.ways) <= set(WAYS):
        p.error(f"--ways: in_process first, then any of {', '.join(WAYS[1:])}")
    if args.latency_steps != 0 and args.latency_steps < 6:
        p.error("--latency-steps: 0 (no latency run) or at least 6 (the short run is a sixth of it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stopped: still stop the sshd hosts and the cluster
    figures = run(args)
    print(table(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
