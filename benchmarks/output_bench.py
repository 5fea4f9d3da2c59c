"""Controller memory when steps print a lot: HOSTS x BYTES of output at once, and the controller's peak RSS.

    python -m benchmarks.output_bench [--hosts 5] [--bytes 200000000] [--limit 65536] [--local] [--unbounded]

Starts real sshd hosts on 127.0.0.1 (tests/sshd.py). Each measurement is a fresh child process that
opens one connection per host and runs `head -c BYTES /dev/zero` on every host at once, one thread
per host, as a run's concurrency would; it reports its own peak RSS (ru_maxrss: the controller's
alone, since sshd and the commands are other processes), its RSS before the commands, and the wall
time. `--local` measures LocalConnection the same way. `--unbounded` adds a measurement with the
output limit above BYTES, which is how runbook kept output before it was bounded (it needs about
3 x BYTES per host; mind the machine). Prints one JSON object; asserts nothing (figures depend on the
machine and its load).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process: connect, run the command on every host at once, report."""
    from runbook.connections.base import Connection
    from runbook.connections.local import LocalConnection
    from runbook.connections.ssh import SSHConnection

    limit, size = int(spec["limit"]), int(spec["bytes"])
    conns: list[Connection] = []
    for h in spec["hosts"]:
        if spec["kind"] == "local":
            conns.append(LocalConnection(h["name"], output_limit=limit))
        else:
            conns.append(SSHConnection(h["name"], h["address"], h["port"], h["user"], h["key_file"],
                                       known_hosts=spec["known_hosts"], output_limit=limit))
    for c in conns:
        c.open()
    before = _rss_mib()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        results = list(pool.map(lambda c: c.run(f"head -c {size} /dev/zero"), conns))
    wall = time.monotonic() - started
    peak = _rss_mib()
    for c in conns:
        c.close()
    return {"kind": spec["kind"], "limit": limit, "hosts": len(conns), "bytes_per_host": size,
            "peak_rss_mib": round(peak, 1), "rss_before_commands_mib": round(before, 1), "wall_s": round(wall, 2),
            "all_counted": all(r.rc == 0 and r.stdout_bytes == size for r in results),
            "kept_chars_per_host": max(len(r.stdout) for r in results), "truncated": all(r.truncated for r in results)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter, so that ru_maxrss is that measurement's alone."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.output_bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.output_bench", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=5)
    p.add_argument("--bytes", type=int, default=200_000_000, help="output of each host's command")
    p.add_argument("--limit", type=int, default=65536, help="ConnectOptions.output_limit for the bounded runs")
    p.add_argument("--local", action="store_true", help="also measure LocalConnection")
    p.add_argument("--unbounded", action="store_true", help="also measure with the limit above --bytes (the old behaviour)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the hosts, run the measurements, print the JSON."""
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from tests.sshd import SSHDHarness, write_known_hosts

    limits = [args.limit] + ([args.bytes + 1] if args.unbounded else [])
    with tempfile.TemporaryDirectory(prefix="runbook-output-bench-") as work:
        harness = SSHDHarness(count=args.hosts)   # its own traversable directory, removed on stop
        try:
            hosts = harness.start()
            known = write_known_hosts(Path(work) / "known_hosts", hosts)
            listed = [{"name": h.name, "address": h.address, "port": h.port, "user": h.user, "key_file": str(h.key_file)}
                      for h in hosts]
            runs = []
            for kind in ["ssh"] + (["local"] if args.local else []):
                for limit in limits:
                    runs.append(measure({"kind": kind, "limit": limit, "bytes": args.bytes, "hosts": listed,
                                         "known_hosts": str(known)}))
        finally:
            harness.stop()
    for r in runs:
        print(f"{r['kind']:5} {r['hosts']} hosts x {r['bytes_per_host'] / 1e6:g} MB, limit {r['limit']}: "
              f"peak RSS {r['peak_rss_mib']} MiB (before the commands {r['rss_before_commands_mib']} MiB), "
              f"{r['wall_s']} s", file=sys.stderr)
    print(json.dumps({"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
