"""Smoke test of the benchmark suite: every code path at tiny size; the JSON has the expected keys.

Never asserts on time: figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.sshd import SSHDUnavailable, find_sshd


@pytest.mark.ssh
def test_benchmark_suite_tiny(tmp_path, capsys):
    if find_sshd() is None:
        pytest.skip("sshd is not installed")
    from benchmarks.suite import main

    try:
        code = main(["--hosts", "1", "--steps", "2", "--reps", "1", "--wide-reps", "1", "--scale-hosts", "20",
                     "--scale-steps", "5", "--scale-reps", "1", "--no-ansible", "--quiet", "--out", str(tmp_path)])
    except SSHDUnavailable as exc:  # pragma: no cover - depends on the machine
        pytest.skip(str(exc))
    assert code == 0
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert {"machine", "settings", "fanout", "wide", "dry_run", "scale", "targets", "duration"} <= doc.keys()
    assert doc["ansible_skipped"] == "--no-ansible"
    (fan,) = doc["fanout"]
    assert fan["hosts"] == 1 and fan["steps"] == 2
    for side in ("runbook", "floor"):
        assert {"wall_median", "exec_median", "walls", "peak_rss_mib"} <= fan[side].keys()
        assert fan[side]["peak_rss_mib"] > 0
    assert fan["ratio"] > 0
    (wide,) = doc["wide"]
    assert wide["critical_path"] == pytest.approx(1.0)
    assert {"exec_median", "wall_median", "exec_ratio", "wall_ratio", "peak_rss_mib", "floor_exec_median"} <= wide.keys()
    (dry,) = doc["dry_run"]
    assert {"runbook_plan", "floor", "ratio"} <= dry.keys()
    scale = doc["scale"]
    assert scale["hosts"] == 20 and scale["steps"] == 5 and scale["tasks"] == 100
    assert {"load_inventory", "load_validate_playbook", "expand_task_graph", "order_tasks"} <= scale["phases_median"].keys()
    assert {t["target"].split()[0] for t in doc["targets"]} >= {"fan-out", "wide", "scale"}
    out = capsys.readouterr().out
    assert "fan-out H=1 M=2" in out and "JSON:" in out


def test_floor_script_reports_failures(tmp_path):
    """The floor script exits 1 and names the host when it cannot connect (no sshd needed)."""
    from benchmarks.floor import main

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"hosts": [{"host": "127.0.0.1", "port": 1, "user": "nobody",
                                           "key_file": str(tmp_path / "missing")}], "commands": ["true"]}))
    assert main([str(spec)]) == 1


def test_median_interval_is_the_order_statistics_of_the_binomial():
    """15 values: the 4th and 12th smallest (96.5 %); 5 values cannot reach 95 %, so their whole range."""
    from benchmarks.suite import median_interval

    values = [float(v) for v in (9, 3, 14, 1, 7, 12, 5, 15, 2, 11, 6, 13, 4, 10, 8)]
    got = median_interval(values)
    assert (got.low, got.high) == (4.0, 12.0)
    assert got.confidence == pytest.approx(1 - 2 * sum(math.comb(15, i) for i in range(4)) / 2**15)
    few = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (few.low, few.high) == (1.0, 5.0) and few.confidence == pytest.approx(0.9375)
    assert median_interval([2.0]).confidence == 0.0


def test_paired_ratios_and_the_target_verdict():
    """Each repetition against its own in-process run; within, above or not settled by the interval."""
    from benchmarks.cluster_bench import paired

    base = [{"wall": w} for w in (2.0, 4.0, 3.0, 2.0, 4.0, 3.0, 2.0, 4.0)]
    within = paired(base, [{"wall": b["wall"] * 1.1} for b in base])
    assert within["ratio_median"] == pytest.approx(1.1) and within["target"] == "within"
    assert within["ratios"] == [1.1] * 8
    above = paired(base, [{"wall": b["wall"] * 1.5} for b in base])
    assert above["target"] == "above"
    mixed = paired(base, [{"wall": b["wall"] * r} for b, r in zip(base, (1.1, 1.5, 1.2, 1.4, 1.25, 1.35, 1.0, 1.6))])
    assert mixed["target"] == "not settled"
    low, high = mixed["ratio_interval"]
    assert low < 1.3 < high and 0.95 <= mixed["ratio_confidence"] < 1
    few = paired(base[:5], [{"wall": b["wall"] * 1.5} for b in base[:5]])
    assert few["target"] == "too few pairs for 95%" and few["ratio_median"] == pytest.approx(1.5)
