"""The benchmark figure: throughput and p99 latency, batching on vs off, and CPU per message."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.report import find, raw_rate

COLORS = {"on": "tab:blue", "off": "tab:orange"}


def get(results: dict[str, Any], mode: str, key: str, **match: int) -> float:
    row = find(results, mode, **match)
    return float(row[key]) if row and key in row else math.nan


def bars(ax: Axes, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        color = COLORS.get(name.split()[-1] if " " in name else name)
        ax.bar(xs, values, width, label=name, color=color, alpha=1.0 if "32" not in name else 0.5)
        for x, v in zip(xs, values, strict=True):
            if not math.isnan(v):
                ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.2g}", (x, v), ha="center",
                            va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def draw(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    conc = [1, 16, 64]
    labels = [f"c{c}" for c in conc]

    def series(key: str, **extra: int) -> dict[str, list[float]]:
        return {m: [get(results, m, key, concurrency=c, images_per_request=1, **extra)
                    for c in conc] for m in ("on", "off")}  # fmt: skip

    bars(axes[0, 0], labels, series("msgs_per_s"), "requests/s")
    axes[0, 0].set_title("Digits, 1 image/request: throughput")
    bars(axes[1, 0], labels, series("p99_ms"), "p99 latency (ms)")
    axes[1, 0].axhline(50, color="red", ls="--", lw=1, label="target c64 ≤ 50 ms")
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_title("Digits, 1 image/request: p99 latency")

    ax = axes[0, 1]
    vals = [get(results, m, "items_per_s", images_per_request=128) for m in ("on", "off")]
    raw = raw_rate(results)
    ax.bar(["128/req on", "128/req off", "raw batch 512"], [*vals, raw],
           color=[COLORS["on"], COLORS["off"], "tab:green"])  # fmt: skip
    ax.axhline(raw / 2, color="red", ls="--", lw=1, label="target: 50 % of raw")
    for i, v in enumerate([*vals, raw]):
        if not math.isnan(v):
            ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title("Digits, 128 images/request vs raw in-process model")
    ax.legend(fontsize=8)

    sess = [1, 100, 1000]
    slabels = [f"{s:,} sess." for s in sess]
    echo_t: dict[str, list[float]] = {}
    echo_p: dict[str, list[float]] = {}
    for bits in (1, 32):
        for m in ("on", "off"):
            name = f"{bits}-bit {m}"
            echo_t[name] = [get(results, m, "items_per_s", sessions=s, bits_per_message=bits)
                            for s in sess]  # fmt: skip
            echo_p[name] = [get(results, m, "p99_ms", sessions=s, bits_per_message=bits)
                            for s in sess]  # fmt: skip
    bars(axes[0, 2], slabels, echo_t, "bits/s")
    axes[0, 2].set_yscale("log")
    axes[0, 2].set_title("Echo: bits/s (closed loop per session)")
    bars(axes[1, 2], slabels, echo_p, "p99 latency per message (ms)")
    axes[1, 2].axhline(25, color="red", ls="--", lw=1, label="target 1,000 sess. ≤ 25 ms")
    axes[1, 2].set_yscale("log")
    axes[1, 2].set_title("Echo: p99 latency per message")

    ax = axes[1, 1]
    rows = [r for r in results["modes"]["on"]["scenarios"]]
    names = [f"d c{r['concurrency']}×{r['images_per_request']}" if r["scenario"] == "digits"
             else f"e {r['sessions']}×{r['bits_per_message']}" for r in rows]  # fmt: skip
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["server_cpu_ms_per_msg"] for r in rows], 0.4,
           label="server", color="tab:purple")  # fmt: skip
    ax.bar([x + 0.2 for x in xs], [r["client_cpu_ms_per_msg"] for r in rows], 0.4,
           label="client (load generator)", color="tab:gray")  # fmt: skip
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per request / message")
    ax.set_title("CPU per message, batching on")
    ax.legend(fontsize=8)
    for a in (axes[1, 0], axes[1, 2]):
        a.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"rnn-serving benchmark, {meta['started']}, {meta['cpu_count']} cores"
                 + (" (quick)" if meta["quick"] else ""))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
