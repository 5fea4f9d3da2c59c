"""The benchmark suite: fan-out, wide graph, dry run, scale without SSH, optional ansible.

Every timed program runs as a subprocess of its own, started the same way for both sides, and is
reaped with ``os.wait4`` so that its own peak RSS is known. The two sides of a comparison run
alternately (A B B A ...) after one untimed warm-up each, and the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Performance goals (reported, never asserted).
TARGET_FANOUT_30 = 1.25
TARGET_FANOUT_1 = 1.5
TARGET_WIDE = 1.2
TARGET_SCALE_TIME = 2.0
TARGET_SCALE_MIB = 400.0

WIDE_BRANCHES = 3
WIDE_DEPTH = 5
WIDE_SLEEP = 0.2
GUARD = "test -e /nonexistent/runbook-bench-guard"


@dataclass
class Proc:
    """One finished subprocess: wall time, exit status, its own peak RSS, and its output."""

    wall: float
    rc: int
    rss_kib: int
    stdout: str
    stderr: str


def timed(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 600.0) -> Proc:
    """Run argv, wait with wait4 (the child's own rusage), and return wall time and peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return Proc(wall, proc.returncode, int(usage.ru_maxrss), out.read().decode(errors="replace"),
                    err.read().decode(errors="replace"))


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else float("nan")


@dataclass(frozen=True)
class MedianInterval:
    """A distribution-free interval for a median: two order statistics of the sample, and its confidence."""

    low: float
    high: float
    confidence: float   # the probability that the interval holds the true median (binomial, no shape assumed)


def median_interval(values: list[float], confidence: float = 0.95) -> MedianInterval:
    """The narrowest order-statistic interval whose confidence is at least `confidence`, or the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return MedianInterval(float("nan"), float("nan"), 0.0)
    # P(the k-th smallest <= median <= the k-th largest) = 1 - 2 P(Binomial(n, 1/2) < k)
    below = 0.0
    best = MedianInterval(ordered[0], ordered[-1], 1 - 2 * 0.5 ** n)
    for k in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, k - 1) * 0.5 ** n
        held = 1 - 2 * below
        if held < confidence:
            break
        best = MedianInterval(ordered[k - 1], ordered[n - k], held)
    return best


def mib(kib: float) -> float:
    return round(kib / 1024.0, 1)


def child_env(pycache: Path) -> dict[str, str]:
    """The environment of every timed program: bytecode cached (as in any installed package)."""
    env = dict(os.environ)
    # A session may disable bytecode writing; an installed runbook always has its .pyc files, so
    # cache them, in a directory of our own (nothing is written into the checkout).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("NO_COLOR", "1")
    return env


def runbook_argv() -> list[str]:
    script = Path(sys.executable).parent / "runbook"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runbook"]


# --- workloads ---------------------------------------------------------------------------------


def fanout_playbook(path: Path, steps: int, guard: bool = False) -> Path:
    lines = ["runbook: bench-fanout", "description: M trivial command steps, one after another", "steps:"]
    for i in range(steps):
        lines += [f"  - name: step {i}", "    command: [\"true\"]"]
        if guard:
            lines.append(f"    unless: {GUARD}")
    path.write_text("\n".join(lines) + "\n")
    return path


def wide_playbook(path: Path) -> Path:
    lines = ["runbook: bench-wide", f"description: {WIDE_BRANCHES} independent branches of {WIDE_DEPTH} sleeps",
             "steps:"]
    for b in range(WIDE_BRANCHES):
        for d in range(WIDE_DEPTH):
            lines += [f"  - name: b{b} s{d}", f"    command: [sleep, \"{WIDE_SLEEP:g}\"]"]
            if d == 0:
                lines.append("    needs: []")
    path.write_text("\n".join(lines) + "\n")
    return path


def scale_inventory(path: Path, hosts: int) -> Path:
    """An Ansible YAML inventory of `hosts` local hosts in groups of 100, with some vars."""
    groups: dict[str, Any] = {}
    for i in range(hosts):
        g = f"group{i // 100:02d}"
        groups.setdefault(g, {"hosts": {}, "vars": {"tier": g, "threshold": 80 + (i // 100) % 10}})
        groups[g]["hosts"][f"node{i:05d}.example.internal"] = {
            "ansible_connection": "local", "rack": f"r{i % 40}", "index": i}
    doc = {"all": {"vars": {"log_dir": "/var/log/app"}, "children": groups}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def scale_playbook(path: Path, steps: int) -> Path:
    """`steps` steps: mostly a chain, with parallel branches, templates, guards and conditions."""
    lines = ["runbook: bench-scale", "hosts: all", "vars: {keep_days: 7}", "steps:"]
    for i in range(steps):
        lines.append(f"  - name: step {i}")
        kind = i % 5
        if kind == 0:
            lines += ["    shell: df --output=pcent {{ log_dir | quote }} | tail -1", "    read_only: true",
                      f"    register: usage{i}"]
        elif kind == 1:
            lines += [f"    when: usage{i - 1}.stdout | int > threshold",
                      "    shell: find {{ log_dir | quote }} -mtime +{{ keep_days }} -delete"]
        elif kind == 2:
            lines += ["    command: [systemctl, restart, \"app-{{ rack }}\"]", "    unless: systemctl is-active app",
                      f"    needs: [step-{i - 2}]"]
        elif kind == 3:
            lines += ["    command: [\"true\"]", "    creates: /etc/app/ready"]
        else:
            lines += ["    shell: echo {{ host.name }} {{ index }}", f"    needs: [step-{i - 1}, step-{i - 2}]",
                      "    retries: 2", "    delay: 1s"]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the suite ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, log: Callable[[str], None]):
        self.args = args
        self.work = work
        self.log = log
        self.env = child_env(work / "pycache")
        self.rb = runbook_argv()
        self.hosts: list[Any] = []
        self.known_hosts = work / "known_hosts"
        self.counter = 0

    def audit(self, name: str) -> str:
        """A fresh audit trail per run (the chain of an earlier run never grows the next one's work)."""
        self.counter += 1
        return str(self.work / "audit" / f"{name}-{self.counter}.jsonl")

    def inventory(self, count: int) -> Path:
        from tests.sshd import write_inventory

        path = self.work / f"inventory-{count}.yml"
        if not path.exists():
            write_inventory(path, self.hosts[:count])
        return path

    def floor_spec(self, count: int, commands: list[str], name: str) -> Path:
        path = self.work / f"floor-{name}-{count}.json"
        path.write_text(json.dumps({
            "hosts": [{"host": h.address, "port": h.port, "user": h.user, "key_file": str(h.key_file)}
                      for h in self.hosts[:count]],
            "commands": commands, "nodelay": not self.args.floor_no_nodelay}))
        return path

    def run_runbook(self, verb: str, playbook: Path, count: int, name: str) -> tuple[Proc, dict[str, Any]]:
        argv = [*self.rb, verb, str(playbook), "-i", str(self.inventory(count)), "-c", str(count),
                "--known-hosts", str(self.known_hosts), "--audit-log", self.audit(name), "--output", "json"]
        proc = timed(argv, self.env, self.work)
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = {}
        return proc, doc

    def run_floor(self, spec: Path) -> tuple[Proc, dict[str, Any]]:
        proc = timed([sys.executable, "-m", "benchmarks.floor", str(spec)], self.env, REPO)
        try:
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            doc = {}
        return proc, doc

    # --- checks that each program did the whole job --------------------------------------------

    @staticmethod
    def check_run(proc: Proc, doc: dict[str, Any], tasks: int, what: str) -> None:
        done = sum(1 for r in doc.get("results", []) if r.get("status") in ("ok", "changed"))
        if proc.rc != 0 or done != tasks:
            raise RuntimeError(f"{what}: exit {proc.rc}, {done}/{tasks} tasks done\n{proc.stderr[-2000:]}")

    @staticmethod
    def check_plan(proc: Proc, doc: dict[str, Any], tasks: int, what: str) -> None:
        preds = [p for p in doc.get("predictions", []) if p.get("prediction") == "change"]
        if proc.rc != 0 or len(preds) != tasks:
            raise RuntimeError(f"{what}: exit {proc.rc}, {len(preds)}/{tasks} predicted changes\n{proc.stderr[-2000:]}")

    @staticmethod
    def check_floor(proc: Proc, doc: dict[str, Any], what: str) -> None:
        if proc.rc != 0 or not doc.get("ok"):
            raise RuntimeError(f"{what}: exit {proc.rc}: {doc.get('failures')}\n{proc.stderr[-2000:]}")

    # --- comparisons ---------------------------------------------------------------------------

    def alternate(self, reps: int, a: Callable[[], dict[str, float]], b: Callable[[], dict[str, float]]
                  ) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """One untimed warm-up each, then A B, B A, A B ... so drift in machine load hits both."""
        a()
        b()
        ra: list[dict[str, float]] = []
        rb: list[dict[str, float]] = []
        for i in range(reps):
            if i % 2 == 0:
                ra.append(a())
                rb.append(b())
            else:
                rb.append(b())
                ra.append(a())
        return ra, rb

    def fanout(self, count: int) -> dict[str, Any]:
        steps = self.args.steps
        playbook = fanout_playbook(self.work / f"fanout-{steps}.yml", steps)
        spec = self.floor_spec(count, ["true"] * steps, "fanout")

        def a() -> dict[str, float]:
            proc, doc = self.run_runbook("run", playbook, count, f"fanout-{count}")
            self.check_run(proc, doc, count * steps, f"runbook run, {count} hosts")
            return {"wall": proc.wall, "exec": float(doc.get("wall_time", 0.0)), "rss": proc.rss_kib}

        def b() -> dict[str, float]:
            proc, doc = self.run_floor(spec)
            self.check_floor(proc, doc, f"floor, {count} hosts")
            return {"wall": proc.wall, "exec": float(doc.get("exec_time", 0.0)), "rss": proc.rss_kib}

        ra, rb = self.alternate(self.args.reps, a, b)
        out = self._compare(ra, rb, "runbook", "floor")
        out.update({"hosts": count, "steps": steps, "reps": self.args.reps})
        self.log(f"fan-out H={count} M={steps}: runbook {out['runbook']['wall_median']:.3f}s, "
                 f"floor {out['floor']['wall_median']:.3f}s, ratio {out['ratio']:.2f}")
        return out

    def dry_run(self, count: int) -> dict[str, Any]:
        steps = self.args.steps
        playbook = fanout_playbook(self.work / f"dryrun-{steps}.yml", steps, guard=True)
        spec = self.floor_spec(count, [GUARD] * steps, "guards")

        def a() -> dict[str, float]:
            proc, doc = self.run_runbook("plan", playbook, count, f"plan-{count}")
            self.check_plan(proc, doc, count * steps, f"runbook plan, {count} hosts")
            return {"wall": proc.wall, "rss": proc.rss_kib}

        def b() -> dict[str, float]:
            proc, doc = self.run_floor(spec)
            # The guard fails on purpose (so every step would run): exit 1 is the expected result.
            if proc.rc not in (0, 1) or any("exited 1" not in f for f in doc.get("failures", [])):
                raise RuntimeError(f"floor guards, {count} hosts: {doc.get('failures')}\n{proc.stderr[-2000:]}")
            return {"wall": proc.wall, "exec": float(doc.get("exec_time", 0.0)), "rss": proc.rss_kib}

        ra, rb = self.alternate(self.args.reps, a, b)
        out = self._compare(ra, rb, "runbook_plan", "floor")
        out.update({"hosts": count, "steps": steps, "reps": self.args.reps, "guard": GUARD})
        self.log(f"dry run H={count} M={steps}: plan {out['runbook_plan']['wall_median']:.3f}s, "
                 f"floor {out['floor']['wall_median']:.3f}s, ratio {out['ratio']:.2f}")
        return out

    def wide(self, count: int) -> dict[str, Any]:
        from runbook.graph import StepGraph
        from runbook.loader import load_playbook

        playbook = wide_playbook(self.work / "wide.yml")
        graph = StepGraph.build(load_playbook(playbook))
        critical = graph.critical_path_length({sid: WIDE_SLEEP for sid in graph.graph.nodes})
        spec = self.floor_spec(count, [f"sleep {WIDE_SLEEP:g}"] * WIDE_DEPTH, "wide")
        data = json.loads(spec.read_text())
        spec.write_text(json.dumps({**data, "branches": WIDE_BRANCHES}))

        def a() -> dict[str, float]:
            proc, doc = self.run_runbook("run", playbook, count, f"wide-{count}")
            self.check_run(proc, doc, count * WIDE_BRANCHES * WIDE_DEPTH, f"wide graph, {count} hosts")
            return {"wall": proc.wall, "exec": float(doc.get("wall_time", 0.0)), "rss": proc.rss_kib}

        def b() -> dict[str, float]:
            proc, doc = self.run_floor(spec)
            self.check_floor(proc, doc, f"wide floor, {count} hosts")
            return {"wall": proc.wall, "exec": float(doc.get("exec_time", 0.0)), "rss": proc.rss_kib}

        runs, floor = self.alternate(self.args.wide_reps, a, b)
        out = {
            "hosts": count, "branches": WIDE_BRANCHES, "depth": WIDE_DEPTH, "sleep": WIDE_SLEEP,
            "reps": self.args.wide_reps, "critical_path": round(critical, 4),
            "serial_sum": round(WIDE_BRANCHES * WIDE_DEPTH * WIDE_SLEEP, 4),
            "wall_median": median([r["wall"] for r in runs]), "exec_median": median([r["exec"] for r in runs]),
            "walls": [round(r["wall"], 4) for r in runs], "execs": [round(r["exec"], 4) for r in runs],
            "peak_rss_mib": mib(max(r["rss"] for r in runs)),
            # The same 3 chains per host with plain Fabric (3 threads sharing one connection per host).
            "floor_exec_median": median([r["exec"] for r in floor]), "floor_wall_median": median([r["wall"] for r in floor]),
        }
        out["exec_ratio"] = round(out["exec_median"] / critical, 3)
        out["wall_ratio"] = round(out["wall_median"] / critical, 3)
        self.log(f"wide graph H={count}: run {out['exec_median']:.3f}s (process {out['wall_median']:.3f}s) "
                 f"vs critical path {critical:.2f}s, ratio {out['exec_ratio']:.2f}")
        return out

    def scale(self) -> dict[str, Any]:
        hosts, steps = self.args.scale_hosts, self.args.scale_steps
        inventory = scale_inventory(self.work / f"scale-inventory-{hosts}.yml", hosts)
        playbook = scale_playbook(self.work / f"scale-{steps}.yml", steps)
        argv = [sys.executable, "-m", "benchmarks.scale_probe", str(playbook), str(inventory)]
        docs: list[dict[str, Any]] = []
        walls: list[float] = []
        for i in range(self.args.scale_reps + 1):
            proc = timed(argv, self.env, REPO)
            if proc.rc != 0:
                raise RuntimeError(f"scale probe: exit {proc.rc}\n{proc.stderr[-3000:]}")
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            doc["wrapper_rss_kib"] = proc.rss_kib
            if i:
                docs.append(doc)
                walls.append(proc.wall)
        phases = {k: median([d["phases"][k] for d in docs]) for k in docs[0]["phases"]}
        out = {
            "hosts": docs[0]["hosts"], "steps": docs[0]["steps"], "tasks": docs[0]["tasks"],
            "edges": docs[0]["edges"], "reps": self.args.scale_reps,
            "time_median": median([d["total_time"] for d in docs]), "times": [d["total_time"] for d in docs],
            "phases_median": phases, "import_time_median": median([d["import_time"] for d in docs]),
            "process_wall_median": median(walls),
            "peak_rss_mib": mib(max(d["wrapper_rss_kib"] for d in docs)),
            "rss_after_imports_mib": mib(max(d["rss_after_imports_kib"] for d in docs)),
        }
        out["rss_growth_mib"] = round(out["peak_rss_mib"] - out["rss_after_imports_mib"], 1)
        self.log(f"scale {hosts} hosts x {steps} steps: {out['time_median']:.3f}s, peak RSS "
                 f"{out['peak_rss_mib']} MiB")
        return out

    def ansible(self, count: int, exe: str) -> dict[str, Any]:
        """The same fan-out with ansible-playbook (pipelining, ControlPersist, no fact gathering)."""
        steps = self.args.steps
        adir = self.work / "ansible"
        (adir / "cp").mkdir(parents=True, exist_ok=True)
        inv = adir / f"hosts-{count}.ini"
        inv.write_text("[bench]\n" + "".join(
            f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user} "
            f"ansible_ssh_private_key_file={h.key_file} ansible_python_interpreter=/usr/bin/python3\n"
            for h in self.hosts[:count]))
        play = adir / f"fanout-{steps}.yml"
        play.write_text(yaml.safe_dump([{"hosts": "bench", "gather_facts": False, "tasks": [
            {"name": f"step {i}", "ansible.builtin.command": "true"} for i in range(steps)]}], sort_keys=False))
        cfg = adir / "ansible.cfg"
        cfg.write_text("[defaults]\n"
                       f"forks = {max(count, 5)}\nhost_key_checking = True\nretry_files_enabled = False\n"
                       f"local_tmp = {adir / 'tmp'}\n"
                       "[ssh_connection]\npipelining = True\n"
                       f"control_path_dir = {adir / 'cp'}\n"
                       f"ssh_args = -o ControlMaster=auto -o ControlPersist=30s -o UserKnownHostsFile={self.known_hosts}\n")
        env = dict(self.env, ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOME=str(adir / "home"))
        walls, rss = [], []
        # No warm-up: ansible is slow, and its first run, like every runbook and floor run, opens
        # its SSH connections itself (later runs would reuse the ControlPersist masters).
        for _ in range(self.args.ansible_reps):
            proc = timed([exe, "-i", str(inv), str(play)], env, adir)
            if proc.rc != 0:
                raise RuntimeError(f"ansible-playbook, {count} hosts: exit {proc.rc}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            walls.append(proc.wall)
            rss.append(proc.rss_kib)
        out = {"hosts": count, "steps": steps, "reps": self.args.ansible_reps, "wall_median": median(walls),
               "walls": [round(w, 4) for w in walls], "peak_rss_mib_controller_main": mib(max(rss)),
               "executable": exe}
        self.log(f"ansible H={count} M={steps}: {out['wall_median']:.3f}s")
        return out

    @staticmethod
    def _compare(ra: list[dict[str, float]], rb: list[dict[str, float]], na: str, nb: str) -> dict[str, Any]:
        def side(rs: list[dict[str, float]]) -> dict[str, Any]:
            d: dict[str, Any] = {"wall_median": median([r["wall"] for r in rs]),
                                 "walls": [round(r["wall"], 4) for r in rs],
                                 "peak_rss_mib": mib(max(r["rss"] for r in rs))}
            if all("exec" in r for r in rs):
                d["exec_median"] = median([r["exec"] for r in rs])
            return d

        a, b = side(ra), side(rb)
        out: dict[str, Any] = {na: a, nb: b, "ratio": round(a["wall_median"] / b["wall_median"], 3)}
        if "exec_median" in a and "exec_median" in b and b["exec_median"]:
            out["exec_ratio"] = round(a["exec_median"] / b["exec_median"], 3)
        out["startup_and_teardown"] = {
            na: round(a["wall_median"] - a.get("exec_median", 0.0), 4) if "exec_median" in a else None,
            nb: round(b["wall_median"] - b.get("exec_median", 0.0), 4) if "exec_median" in b else None}
        return out


# --- environment and reporting -----------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("fabric", "paramiko", "pydantic", "networkx", "structlog", "rich"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "os": platform.platform(), "packages": versions,
            "git_commit": commit, "loadavg_start": list(os.getloadavg())}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    fan = {f["hosts"]: f for f in results.get("fanout", [])}
    for count, goal in ((30, TARGET_FANOUT_30), (1, TARGET_FANOUT_1)):
        if count in fan:
            r = fan[count]["ratio"]
            out.append({"target": f"fan-out {count} host(s) x {fan[count]['steps']} steps within {goal}x of the floor",
                        "measured": f"{r:.2f}x", "met": r <= goal})
    for w in results.get("wide", []):
        out.append({"target": f"wide graph ({w['hosts']} hosts) within {TARGET_WIDE}x of the critical path",
                    "measured": f"{w['exec_ratio']:.2f}x (run), {w['wall_ratio']:.2f}x (whole process)",
                    "met": w["exec_ratio"] <= TARGET_WIDE})
    s = results.get("scale")
    if s:
        out.append({"target": f"scale {s['hosts']} hosts x {s['steps']} steps planned in < {TARGET_SCALE_TIME:g} s",
                    "measured": f"{s['time_median']:.3f} s", "met": s["time_median"] < TARGET_SCALE_TIME})
        out.append({"target": f"scale {s['hosts']} hosts x {s['steps']} steps in < {TARGET_SCALE_MIB:g} MiB",
                    "measured": f"{s['peak_rss_mib']} MiB peak RSS", "met": s["peak_rss_mib"] < TARGET_SCALE_MIB})
    return out


def table(results: dict[str, Any]) -> str:
    rows = [("benchmark", "runbook", "floor / bound", "ratio", "runbook RSS", "floor RSS")]
    for f in results.get("fanout", []):
        rows.append((f"fan-out H={f['hosts']} M={f['steps']}",
                     f"{f['runbook']['wall_median']:.3f}s (run {f['runbook']['exec_median']:.3f}s)",
                     f"{f['floor']['wall_median']:.3f}s (run {f['floor']['exec_median']:.3f}s)",
                     f"{f['ratio']:.2f}x", f"{f['runbook']['peak_rss_mib']} MiB", f"{f['floor']['peak_rss_mib']} MiB"))
    for w in results.get("wide", []):
        rows.append((f"wide {w['branches']}x{w['depth']} H={w['hosts']}",
                     f"{w['wall_median']:.3f}s (run {w['exec_median']:.3f}s)",
                     f"{w['critical_path']:.3f}s critical path (Fabric run {w['floor_exec_median']:.3f}s)",
                     f"{w['exec_ratio']:.2f}x (run)",
                     f"{w['peak_rss_mib']} MiB", "-"))
    for d in results.get("dry_run", []):
        rows.append((f"dry run H={d['hosts']} M={d['steps']}", f"{d['runbook_plan']['wall_median']:.3f}s",
                     f"{d['floor']['wall_median']:.3f}s (run {d['floor']['exec_median']:.3f}s)",
                     f"{d['ratio']:.2f}x", f"{d['runbook_plan']['peak_rss_mib']} MiB", f"{d['floor']['peak_rss_mib']} MiB"))
    s = results.get("scale")
    if s:
        rows.append((f"scale {s['hosts']} hosts x {s['steps']} steps", f"{s['time_median']:.3f}s ({s['tasks']} tasks)",
                     f"< {TARGET_SCALE_TIME:g}s, < {TARGET_SCALE_MIB:g} MiB", "-", f"{s['peak_rss_mib']} MiB", "-"))
    for a in results.get("ansible", []):
        fan = next((f for f in results.get("fanout", []) if f["hosts"] == a["hosts"]), None)
        if fan:
            rows.append((f"ansible H={a['hosts']} M={a['steps']}", f"{a['wall_median']:.3f}s",
                         f"{fan['floor']['wall_median']:.3f}s floor", f"{a['wall_median'] / fan['floor']['wall_median']:.2f}x",
                         f"{a['peak_rss_mib_controller_main']} MiB", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for t in results.get("targets", []):
        lines.append(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: {t['measured']}")
    if "ansible_skipped" in results:
        lines.append(f"ansible: skipped ({results['ansible_skipped']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="1,10,30", help="host counts for fan-out, wide graph and dry run (default 1,10,30)")
    p.add_argument("--steps", type=int, default=10, help="trivial steps per host (M, default 10)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (default 5, after a warm-up)")
    p.add_argument("--wide-reps", type=int, default=3)
    p.add_argument("--scale-hosts", type=int, default=2000)
    p.add_argument("--scale-steps", type=int, default=50)
    p.add_argument("--scale-reps", type=int, default=3)
    p.add_argument("--ansible-reps", type=int, default=1)
    p.add_argument("--ansible-hosts", default=None,
                   help="host counts for the ansible comparison (default: the largest of --hosts; ansible is slow)")
    p.add_argument("--only", default="fanout,wide,dryrun,scale,ansible",
                   help="comma-separated subset of: fanout, wide, dryrun, scale, ansible")
    p.add_argument("--ansible-playbook", default=None,
                   help="ansible-playbook to compare with (default: the one on PATH; skipped when none)")
    p.add_argument("--no-ansible", action="store_true", help="skip the ansible comparison")
    p.add_argument("--floor-no-nodelay", action="store_true",
                   help="floor without TCP_NODELAY (plain Fabric defaults; ~40 ms more per command)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON results")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    counts = sorted({int(x) for x in args.hosts.split(",") if x.strip()})
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results: dict[str, Any] = {"schema": 1, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
                               "machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "quiet"}}
    exe = None
    if "ansible" in only and not args.no_ansible:
        exe = args.ansible_playbook or shutil.which("ansible-playbook")
        if exe is None:
            results["ansible_skipped"] = "ansible-playbook not found (pip install '.[bench]')"
    elif "ansible" in only:
        results["ansible_skipped"] = "--no-ansible"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="runbook-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the per-host test users read their authorized_keys below it
        (work / "audit").mkdir()
        (work / "sshd").mkdir()
        bench = Bench(args, work, log)
        needs_ssh = only & {"fanout", "wide", "dryrun"} or exe
        harness = None
        try:
            if needs_ssh:
                from tests.sshd import SSHDHarness, write_known_hosts

                harness = SSHDHarness(count=max(counts), base_dir=work / "sshd")
                bench.hosts = harness.start()
                write_known_hosts(bench.known_hosts, bench.hosts)
                log(f"{len(bench.hosts)} sshd hosts on 127.0.0.1 ready")
            if "fanout" in only:
                results["fanout"] = [bench.fanout(c) for c in counts]
            if "wide" in only:
                results["wide"] = [bench.wide(c) for c in counts]
            if "dryrun" in only:
                results["dry_run"] = [bench.dry_run(c) for c in counts]
            if exe:
                try:
                    results["ansible"] = [bench.ansible(c, exe) for c in sorted(set(
                        [max(counts)] if args.ansible_hosts is None else
                        [int(x) for x in args.ansible_hosts.split(",") if x.strip()]))]
                except RuntimeError as exc:
                    results["ansible_skipped"] = f"ansible-playbook failed: {str(exc)[:500]}"
                    log(results["ansible_skipped"])
        finally:
            if harness is not None:
                harness.stop()
        if "scale" in only:
            results["scale"] = bench.scale()
    results["targets"] = targets(results)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["duration"] = round(time.perf_counter() - t_start, 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"bench-{stamp}.json"
    text = json.dumps(results, indent=2)
    path.write_text(text + "\n")
    (out_dir / "latest.json").write_text(text + "\n")
    print(table(results))
    print(f"\nJSON: {path}  ({results['duration']} s)")
    return 0
