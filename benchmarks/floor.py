"""The SSH floor: a plain Python script with one Fabric Connection per host, each in its own thread.

It does what `runbook run` is compared against, and nothing more: connect, run the same commands
one after another on each host, close. Usage (the benchmark writes the spec file)::

    python -m benchmarks.floor SPEC.json

SPEC: {"hosts": [{"host", "port", "user", "key_file"}...], "commands": [str, ...], "nodelay": bool,
"branches": int (default 1: that many threads per host each run the commands, for the wide graph)}
Prints one JSON line: {"ok": bool, "exec_time": seconds from the first connect to the last close,
"failures": [...]}. Exits 1 if any command failed.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import fabric


def _nodelay(conn: fabric.Connection) -> None:
    # The same TCP_NODELAY runbook sets: without it each command waits ~40 ms for a delayed ACK.
    sock = conn.client.get_transport().sock
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_host(spec: dict, commands: list[str], nodelay: bool, failures: list[str], branches: int = 1) -> None:
    conn = fabric.Connection(spec["host"], user=spec["user"], port=spec["port"],
                             connect_kwargs={"key_filename": [spec["key_file"]]})

    def chain() -> None:
        for command in commands:
            result = conn.run(command, hide=True, warn=True, in_stream=False)
            if result.exited != 0:
                failures.append(f"{spec['host']}:{spec['port']}: {command!r} exited {result.exited}")

    try:
        conn.open()
        if nodelay:
            _nodelay(conn)
        if branches == 1:
            chain()
        else:  # independent chains at once, each on its own channel of the one connection
            threads = [threading.Thread(target=chain) for _ in range(branches)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except Exception as exc:  # report, never hang the benchmark
        failures.append(f"{spec['host']}:{spec['port']}: {type(exc).__name__}: {exc}")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    failures: list[str] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=run_host, args=(h, spec["commands"], spec.get("nodelay", True), failures,
                                                       spec.get("branches", 1)))
               for h in spec["hosts"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    print(json.dumps({"ok": not failures, "exec_time": round(elapsed, 6), "failures": failures[:10]}))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
