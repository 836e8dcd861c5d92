"""Plots of a bench run: python benchmarks/plot.py [benchmarks/results/latest.json]

Writes throughput.png, latency.png and cpu_per_event.png beside the JSON.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import orjson


def _median(runs: list[dict], scenario: str, key: str) -> float | None:
    vals = [r[key] for r in runs if r.get("scenario") == scenario and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(path: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(path or Path(__file__).parent / "results" / "latest.json")
    data = orjson.loads(src.read_bytes())
    runs = data["runs"]
    m = data["machine"]
    subtitle = f"{m['date']}, commit {m['commit']}, {m['cores']} cores ({m['cpu']})"
    out = src.parent

    # Throughput by scenario.
    names = ["ceiling", "e2e", "direct-librdkafka", "direct-aiokafka-batch", "fanin-gateway",
             "fanin-direct-librdkafka"]
    labels, values = [], []
    for n in names:
        v = _median(runs, n, "events_per_s")
        if v is not None:
            labels.append(n)
            values.append(v / 1e3)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(labels, values, color=["#888", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd"][: len(labels)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("thousand events/s (200 B)")
    ax.set_title(f"Throughput by scenario\n{subtitle}", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    # Ack latency by offered load.
    lat = [r for r in runs if r.get("scenario", "").startswith("latency-")]
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["offered_events_per_s"] / 1e3 for r in lat]
        for key, style in (("p50", "o-"), ("p99", "s-"), ("p999", "^-")):
            ax.plot(xs, [r["ack_latency_ms"][key] for r in lat], style, label=key)
        for r, x in zip(lat, xs, strict=True):
            ax.annotate(r["scenario"].removeprefix("latency-"), (x, r["ack_latency_ms"]["p50"]),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xlabel("offered load, thousand events/s")
        ax.set_ylabel("ack latency, ms")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"Producer ack latency (sent to persisted in Kafka)\n{subtitle}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)

    # CPU per event by component.
    rows = []
    for scen, parts in (
        ("e2e", (("daemon", "daemon_us_per_event"), ("broker", "broker_us_per_event"),
                 ("load generator", "loadgen_us_per_event"))),
        ("ceiling", (("daemon", "daemon_us_per_event"), ("load generator", "loadgen_us_per_event"))),
        ("direct-librdkafka", (("client", "client_us_per_event"), ("broker", "broker_us_per_event"))),
        ("direct-aiokafka-batch", (("client", "client_us_per_event"), ("broker", "broker_us_per_event"))),
    ):
        vals = {label: _median(runs, scen, key) for label, key in parts}
        if any(v is not None for v in vals.values()):
            rows.append((scen, vals))
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = {"daemon": "#1f77b4", "client": "#d62728", "broker": "#7f7f7f", "load generator": "#bcbd22"}
        seen: set[str] = set()
        for i, (_scen, vals) in enumerate(rows):
            bottom = 0.0
            for label, v in vals.items():
                if v is None:
                    continue
                ax.bar(i, v, bottom=bottom, color=colors[label], label=None if label in seen else label)
                seen.add(label)
                if v >= 0.15:
                    ax.text(i, bottom + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white")
                bottom += v
        ax.set_xticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylabel("CPU µs per event")
        ax.legend()
        ax.set_title(f"CPU per event by process\n{subtitle}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "cpu_per_event.png", dpi=110)
        plt.close(fig)
    print(f"plots written to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
