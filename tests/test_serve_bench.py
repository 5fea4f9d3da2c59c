"""Smoke test of benchmarks/serve_bench.py at tiny size: its checks hold and it reports its figures (never asserts on time)."""

from __future__ import annotations

import json
from pathlib import Path


def test_serve_benchmark_tiny(tmp_path: Path, capsys) -> None:
    from benchmarks.serve_bench import main

    out = tmp_path / "serve.json"
    assert main(["--alerts", "40", "--hosts", "4", "--concurrency", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["lost"] == 0 and figures["http_errors"] == 0 and figures["distinct_alerts"] == 4
    assert figures["runs"] == figures["distinct_rule_host_pairs"] == 4
    assert figures["accept_p50_ms"] > 0 and all(figures["checks"].values())
    assert "accept_p99_ms" in capsys.readouterr().out
