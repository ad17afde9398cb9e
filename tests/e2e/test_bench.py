"""The benchmark's harness works: `python -m bench.run --quick` (one short repeat, 500 idle
connections) exits 0 and writes figures for every path and scenario, a Markdown table and a
chart. It checks that every path carried its bytes (echoes compared, iperf3 moved data), never
how fast. About a minute. bench.traffic_cost and bench.failover run their quick mode too (about
15 s each), and bench.workers (about a minute: each worker count, and perf's syscall counts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bed import REPO_ROOT

TOOLS = ("iperf3", "stunnel4", "haproxy")
PATHS = {"direct", "stunnel", "haproxy", "amesh-cross", "amesh-same"}
TIMEOUT = 300  # seconds; the quick mode takes about one minute


def test_quick_bench_measures_every_path_and_scenario(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)} (make test installs them)")
    pytest.importorskip("matplotlib", reason="the benchmark's chart needs matplotlib (pip install -e '.[bench]')")
    cp = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert cp.returncode == 0, f"bench.run --quick failed:\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"

    [result] = tmp_path.glob("*.json")
    report = json.loads(result.read_text())
    assert report["quick"] and report["commit"] and report["machine"]["cpus"]
    by_scenario: dict[str, set[str]] = {}
    for r in report["records"]:
        assert r["min"] <= r["median"] <= r["max"] and r["repeats"] == 1, r
        by_scenario.setdefault(r["scenario"], set()).add(r["path"])
    for scenario in ("bulk", "rr-64B", "rr-16KiB", "new-conn"):
        assert by_scenario.get(scenario) == PATHS, (scenario, by_scenario.get(scenario))
    assert by_scenario["cpu"] == PATHS - {"direct"}  # direct has no proxy to charge
    assert by_scenario["idle-500"] == {"amesh-cross"}
    amesh = [r for r in report["records"] if r["path"] == "amesh-cross" and r["scenario"] == "bulk"]
    assert amesh and all(r["vs_direct"] and r["vs_stunnel"] for r in amesh)
    assert result.with_suffix(".md").read_text().startswith("| scenario |")
    assert result.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bench", ["traffic_cost", "failover"])
def test_quick_traffic_benches_run_and_print_their_table(bench: str) -> None:
    # each checks its own bed (the split happened, nothing failed before the kill) and raises otherwise
    cp = subprocess.run([sys.executable, "-m", f"bench.{bench}", "--quick"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=TIMEOUT)
    assert cp.returncode == 0, f"bench.{bench} --quick failed:\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    rows = [line for line in cp.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3, cp.stdout  # the header and one row per configuration


def test_quick_workers_bench_measures_each_count_and_counts_syscalls() -> None:
    from bench.syscalls import perf_available
    from bench.workers import workers_option

    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not perf_available():
        pytest.skip(f"bench.workers needs {', '.join(missing) or 'perf'} (make bench installs them)")
    counts = "1,2" if workers_option() else "1"  # 2 once the worker processes are there
    cp = subprocess.run([sys.executable, "-m", "bench.workers", "--quick", "--workers", counts], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT)
    assert cp.returncode == 0, f"bench.workers --quick failed:\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    rows = [line.split(" | ") for line in cp.stdout.splitlines() if line.startswith("| ")]
    [rate] = [row for row in rows if row[:3] == ["| new-conn", "amesh-cross", "rate"]]
    assert len(rate) == 4 + 2 * len(counts.split(",")) - 1, rate  # a figure for each count, ratios to the first
    for n in counts.split(","):
        assert any(row[0] == f"| {n}" for row in rows), cp.stdout  # its row of the per-core table
    totals = [row for row in rows if row[0] == "| total"]
    assert len(totals) == 2, cp.stdout  # per GB and per connection, each with stunnel and every amesh path
    for row in totals:
        assert len(row) == 1 + 1 + 2 * len(counts.split(",")) and all(cell.strip(" |") != "0.00" for cell in row[1:])
