"""bench/workers.py: the 1-against-2-workers targets and the per-core capacity, from records."""

from bench.workers import add_ratios, capacity, targets


def record(config: str, scenario: str, path: str, metric: str, median: float) -> dict:
    return {"scenario": scenario, "path": path, "config": config, "metric": metric, "unit": "", "median": median,
            "min": median, "max": median, "repeats": 1}


def run(rate2: float, p50_2: float) -> list[dict]:
    records = [record("1w", "new-conn", "amesh-cross", "rate", 500.0), record("2w", "new-conn", "amesh-cross", "rate", rate2)]
    for path in ("amesh-cross", "amesh-same"):
        records += [record("1w", "rr-64B", path, "p50", 100.0), record("2w", "rr-64B", path, "p50", p50_2)]
    add_ratios(records, 1)
    return records


def test_targets_met_and_missed() -> None:
    assert [met for _, _, met in targets(run(800.0, 105.0), [1, 2])] == [True, True, True]
    assert [met for _, _, met in targets(run(799.0, 105.1), [1, 2])] == [False, False, False]
    assert targets(run(800.0, 100.0), [1]) == []  # no 2-worker figures: nothing to compare


def test_capacity_counts_the_agent_with_one_worker_and_the_workers_with_more() -> None:
    records = [record("1w", "new-conn", "amesh-cross", "CPU, node-1 agent", 1.0),
               record("1w", "new-conn", "amesh-cross", "CPU, node-2 agent", 1.0),
               record("2w", "new-conn", "amesh-cross", "CPU, node-1 agent", 0.1),
               record("2w", "new-conn", "amesh-cross", "CPU, node-1 workers", 0.5),
               record("2w", "new-conn", "amesh-cross", "CPU, node-2 workers", 2.0)]
    lines = capacity(records).splitlines()
    assert lines[2].startswith("| 1 | 1,000 / 1,000 / 500 |")  # ms/conn -> conn/s per core
    assert lines[3].startswith("| 2 | 2,000 / 500 / 400 |")
