"""bench.run's records as a Markdown table, a check against amesh's targets and a PNG chart.

Every ratio compares medians from the same run. The targets (bench/README.md):

- new connection + first exchange, cross-node: at most 1/10 of stunnel's time (p50)
- bulk throughput cross-node >= stunnel, 1 and 4 streams
- added 64-byte round-trip time over direct: p50 <= 1.5x stunnel's added time, p99 <= 2x
- <= 20 KiB of node-1 ztunnel RSS per idle proxied connection
- same-node throughput >= 0.5x direct
"""

from __future__ import annotations

from pathlib import Path

PATHS = ("direct", "stunnel", "haproxy", "amesh-cross", "amesh-same")
MAX_RSS_PER_CONNECTION_KIB = 20.0


def _index(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["scenario"], r["path"], r["metric"]): r for r in records}


def add_ratios(records: list[dict]) -> None:
    """Adds vs_direct and vs_stunnel (median / median, same scenario and metric) to amesh records."""
    index = _index(records)
    for r in records:
        if not r["path"].startswith("amesh"):
            continue
        for base in ("direct", "stunnel"):
            other = index.get((r["scenario"], base, r["metric"]))
            r[f"vs_{base}"] = r["median"] / other["median"] if other and other["median"] else None


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def table(records: list[dict]) -> str:
    """One row per scenario and metric: each path's median (min-max), then amesh's ratios."""
    index = _index(records)
    rows = []
    for r in records:
        key = (r["scenario"], r["metric"], r["unit"])
        if key not in rows:
            rows.append(key)
    lines = ["| scenario | metric | unit | " + " | ".join(PATHS) +
             " | cross/direct | cross/stunnel | same/direct | same/stunnel |",
             "|---|---|---|" + "---|" * (len(PATHS) + 4)]
    for scenario, metric, unit in rows:
        cells = []
        for path in PATHS:
            r = index.get((scenario, path, metric))
            cells.append("n/a" if r is None else
                         f"{_fmt(r['median'])} ({_fmt(r['min'])}-{_fmt(r['max'])})" if r["repeats"] > 1
                         else _fmt(r["median"]))
        cross = index.get((scenario, "amesh-cross", metric), {})
        same = index.get((scenario, "amesh-same", metric), {})
        cells += [_ratio(cross.get("vs_direct")), _ratio(cross.get("vs_stunnel")),
                  _ratio(same.get("vs_direct")), _ratio(same.get("vs_stunnel"))]
        lines.append(f"| {scenario} | {metric} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(records: list[dict]) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for each of amesh's targets that the records cover."""
    med = {k: r["median"] for k, r in _index(records).items()}
    out = []

    def get(scenario: str, path: str, metric: str) -> float | None:
        return med.get((scenario, path, metric))

    cross, stun = get("new-conn", "amesh-cross", "p50"), get("new-conn", "stunnel", "p50")
    if cross and stun:
        out.append(("new connection + first exchange cross-node <= 1/10 of stunnel (p50)",
                    f"{cross:.2f} ms vs {stun:.2f} ms = {cross / stun:.2f}x", cross <= stun / 10))
    for metric in ("1 stream", "4 streams"):
        cross, stun = get("bulk", "amesh-cross", metric), get("bulk", "stunnel", metric)
        if cross and stun:
            out.append((f"bulk cross-node >= stunnel ({metric})",
                        f"{cross:.2f} vs {stun:.2f} Gbit/s = {cross / stun:.2f}x", cross >= stun))
    for q, limit in (("p50", 1.5), ("p99", 2.0)):
        cross, stun, direct = (get("rr-64B", p, q) for p in ("amesh-cross", "stunnel", "direct"))
        if cross and stun and direct:
            added, added_stun = cross - direct, stun - direct
            out.append((f"added 64-byte RR latency {q} <= {limit}x stunnel's",
                        f"+{added:.0f} µs vs +{added_stun:.0f} µs = {added / added_stun:.2f}x",
                        added <= limit * added_stun))
    for (scenario, path, metric), value in med.items():
        if scenario.startswith("idle-") and metric == "node-1 RSS per connection":
            out.append((f"ztunnel RSS per idle connection <= {MAX_RSS_PER_CONNECTION_KIB:.0f} KiB ({scenario[5:]} connections)",
                        f"{value:.1f} KiB", value <= MAX_RSS_PER_CONNECTION_KIB))
    for metric in ("1 stream", "4 streams"):
        same, direct = get("bulk", "amesh-same", metric), get("bulk", "direct", metric)
        if same and direct:
            out.append((f"same-node throughput >= 0.5x direct ({metric})",
                        f"{same:.2f} vs {direct:.2f} Gbit/s = {same / direct:.2f}x", same >= 0.5 * direct))
    return out


def markdown(records: list[dict]) -> str:
    lines = [table(records), "", "| target | measured (medians) | met |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'yes' if met else '**no**'} |" for name, measured, met in targets(records)]
    return "\n".join(lines)


def chart(records: list[dict], path: Path) -> None:
    """Grouped bars (median, whiskers min-max), one panel per scenario, one colour per path."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = []
    for r in records:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    # new-conn mixes conn/s with ms: split it into two panels by unit
    panels = []
    for scenario in scenarios:
        units = []
        for r in records:
            if r["scenario"] == scenario and r["unit"] not in units:
                units.append(r["unit"])
        panels += [(scenario, unit) for unit in units]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours = dict(zip(PATHS, ("#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e")))
    for ax, (scenario, unit) in zip(axes.flat, panels):
        mine = [r for r in records if r["scenario"] == scenario and r["unit"] == unit]
        metrics = list(dict.fromkeys(r["metric"] for r in mine))
        present = [p for p in PATHS if any(r["path"] == p for r in mine)]
        width = 0.8 / len(present)
        for k, p in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for i, metric in enumerate(metrics):
                r = next((r for r in mine if r["path"] == p and r["metric"] == metric), None)
                if r is None:
                    continue
                xs.append(i + (k - (len(present) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=p, color=colours[p])
        ax.set_xticks(range(len(metrics)), metrics, fontsize=8)
        ax.set_title(scenario, fontsize=10)
        ax.set_ylabel(unit)
        values = [r["median"] for r in mine if r["median"] > 0]
        if unit in ("µs", "ms") or (values and max(values) / min(values) > 30):
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the bulk panel has every path
    fig.legend(handles, labels, loc="upper center", ncol=len(PATHS), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
