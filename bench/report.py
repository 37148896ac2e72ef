"""Turn the results of ``bench.run`` into targets, a Markdown table, JSON and a plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
MODES = ("on", "off")


def find(results: dict[str, Any], mode: str, **match: int) -> Row | None:
    for row in results["modes"][mode]["scenarios"]:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def raw_rate(results: dict[str, Any], batch: int = 512) -> float:
    rows = [r for r in results.get("raw", []) if r["batch"] == batch]
    return rows[0]["images_per_s"] if rows else math.nan


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b and not math.isnan(b) else math.nan


def evaluate_targets(results: dict[str, Any]) -> list[Row]:
    """Each target of issue #4 with its measured value and whether it is met."""
    nan: Row = {}
    targets: list[Row] = []

    def add(name: str, want: str, got: str, met: bool) -> None:
        targets.append({"target": name, "threshold": want, "measured": got, "met": bool(met)})

    on = find(results, "on", concurrency=64) or nan
    off = find(results, "off", concurrency=64) or nan
    r = ratio(on.get("msgs_per_s"), off.get("msgs_per_s"))
    p99 = on.get("p99_ms", math.nan)
    add("digits c64 throughput, on/off", "≥ 5×", f"{r:.1f}×", r >= 5)
    add("digits c64 p99 (on)", "≤ 50 ms", f"{p99:.1f} ms", p99 <= 50)
    b = find(results, "on", images_per_request=128) or nan
    r = ratio(b.get("items_per_s"), raw_rate(results))
    add("128-image requests vs raw batch-512 (on)", "≥ 50 %", f"{100 * r:.0f} %", r >= 0.5)
    for bits in (1, 32):
        on = find(results, "on", sessions=1000, bits_per_message=bits) or nan
        off = find(results, "off", sessions=1000, bits_per_message=bits) or nan
        r = ratio(on.get("items_per_s"), off.get("items_per_s"))
        p99 = on.get("p99_ms", math.nan)
        add(f"echo 1,000 sessions {bits}-bit bits/s, on/off", "≥ 10×", f"{r:.1f}×", r >= 10)
        add(f"echo 1,000 sessions {bits}-bit p99 (on)", "≤ 25 ms", f"{p99:.1f} ms", p99 <= 25)
    cold = statistics.median(results["cold_start_s"]) if results.get("cold_start_s") else math.nan
    add("cold start, median", "≤ 10 s", f"{cold:.2f} s", cold <= 10)
    return targets


def n(x: float | None) -> str:
    """A number for a table cell: thousands separated, about 3 significant digits below 100."""
    if x is None or math.isnan(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def pair(on: Row | None, off: Row | None, key: str) -> str:
    return f"{n((on or {}).get(key))} / {n((off or {}).get(key))}"


def lat(row: Row | None) -> str:
    return f"{n((row or {}).get('p50_ms'))} / {n((row or {}).get('p99_ms'))}" if row else "–"


def cpu_cells(on: Row | None, off: Row | None) -> list[str]:
    return [
        pair(on, off, "server_cpu_pct"),
        pair(on, off, "server_cpu_ms_per_msg"),
        pair(on, off, "client_cpu_pct"),
        pair(on, off, "client_cpu_ms_per_msg"),
        pair(on, off, "other_cpu_pct"),
    ]


CPU_HEAD = [
    "server CPU % on / off",
    "server CPU ms/msg on / off",
    "client CPU % on / off",
    "client CPU ms/msg on / off",
    "other CPU % on / off",
]


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def section(results: dict[str, Any], label: Callable[[Row], str], keys: list[dict[str, int]],
            rate: str, extra: Callable[[Row | None, Row | None], list[str]],
            extra_head: list[str]) -> list[str]:  # fmt: skip
    rows = []
    for match in keys:
        on, off = find(results, "on", **match), find(results, "off", **match)
        if on is None and off is None:
            continue
        r = ratio((on or {}).get(rate), (off or {}).get(rate))
        rows.append([label(match), n((on or {}).get(rate)), n((off or {}).get(rate)),
                     f"{r:.2f}×", lat(on), lat(off), n((on or {}).get("rows_per_call")),
                     *extra(on, off), *cpu_cells(on, off)])  # fmt: skip
    return rows


def markdown(results: dict[str, Any], targets: list[Row]) -> str:
    meta = results["meta"]
    raw512 = raw_rate(results)
    target_rows = [
        [t["target"], t["threshold"], t["measured"], "✅ met" if t["met"] else "❌ missed"]
        for t in targets
    ]
    lines = [
        "# Benchmark results",
        "",
        f"`{meta['command']}` - started {meta['started']}, {meta['cpu_count']} CPU cores, "
        f"{meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per row, "
        f"load average before {meta['machine_before']['loadavg'][0]:.2f}, "
        f"total {meta.get('total_s', 0):.0f} s, server sources (app/, modelspec/) sha256 "
        f"`{meta.get('server_source_sha256', '?')}`. Latencies p50 / p99 in ms. "
        "'msg' = one HTTP request or one WebSocket message; 'other CPU' = the rest of the "
        "machine during the window (noise).",
        "",
        "## Targets",
        "",
        *table(["target", "threshold", "measured", "met"], target_rows),
        "",
        "## Digits, one image per request (POST /predict/digit)",
        "",
    ]
    head = ["concurrency", "req/s on", "req/s off", "on/off", "p50 / p99 on", "p50 / p99 off",
            "rows/model call on"]  # fmt: skip
    keys = [{"concurrency": c, "images_per_request": 1} for c in (1, 16, 64)]
    rows = section(results, lambda m: str(m["concurrency"]), keys, "msgs_per_s",
                   lambda a, b: [], [])  # fmt: skip
    lines += [*table(head + CPU_HEAD, rows), ""]
    lines += [f"## Digits, 128 images per request, {meta['batch_concurrency']} in flight", ""]

    def vs_raw(on: Row | None, off: Row | None) -> list[str]:
        return [n(raw512), f"{n(100 * ratio((on or {}).get('items_per_s'), raw512))} %",
                f"{n(100 * ratio((off or {}).get('items_per_s'), raw512))} %"]  # fmt: skip

    head = ["request", "img/s on", "img/s off", "on/off", "p50 / p99 on", "p50 / p99 off",
            "rows/model call on", "raw batch-512 img/s", "on/raw", "off/raw"]  # fmt: skip
    rows = section(results, lambda m: "128 images", [{"images_per_request": 128}], "items_per_s",
                   vs_raw, [])  # fmt: skip
    lines += [*table(head + CPU_HEAD, rows), ""]
    lines += ["## Echo over WebSocket (closed loop per session)", ""]
    head = ["sessions × bits", "bits/s on", "bits/s off", "on/off", "p50 / p99 on",
            "p50 / p99 off", "sessions/model call on", "msgs/s on / off"]  # fmt: skip
    keys = [{"sessions": s, "bits_per_message": b} for s in (1, 100, 1000) for b in (1, 32)]
    rows = section(results, lambda m: f"{m['sessions']:,} × {m['bits_per_message']}", keys,
                   "items_per_s", lambda a, b: [pair(a, b, "msgs_per_s")], [])  # fmt: skip
    lines += [*table(head + CPU_HEAD, rows), ""]
    raw_rows = [[str(r["batch"]), n(r["images_per_s"]), n(r["ms_per_call"]), n(r["cpu_pct"]),
                 f"{100 * r['accuracy']:.1f} %"] for r in results.get("raw", [])]  # fmt: skip
    cold = results.get("cold_start_s", [])
    lines += [
        "## Raw in-process model (separate process, server stopped)",
        "",
        *table(["batch", "img/s", "ms/call", "CPU %", "accuracy"], raw_rows),
        "",
        "## Cold start (process start → /readyz 200)",
        "",
        f"Median {n(statistics.median(cold) if cold else None)} s over {len(cold)} starts: "
        + ", ".join(f"{c:.2f}" for c in cold)
        + " s (the first two are the batching on / off servers measured above).",
        "",
        "## Checks",
        "",
    ]
    for mode in MODES:
        m = results["modes"][mode]
        errs = sum(r.get("errors", 0) for r in m["scenarios"])
        ok_rows = [r for r in m["scenarios"] if "verify" in r]
        dig = [r["verify"] for r in ok_rows if r["scenario"] == "digits"]
        ech = list({r["sessions"]: r["verify"] for r in ok_rows if "sessions" in r}.values())
        failed = [f"{r['scenario']} {r.get('concurrency', r.get('sessions'))}: {r['error']}"
                  for r in m["scenarios"] if "error" in r]  # fmt: skip
        ok, tot = sum(v["correct"] for v in dig), sum(v["checked"] for v in dig)
        eok, etot = sum(v["correct_bits"] for v in ech), sum(v["checked_bits"] for v in ech)
        bad = sum(v["malformed"] for v in dig + ech)
        lines.append(
            f"- batching {mode}: {errs} failed replies in windows; sampled digit predictions "
            f"{ok}/{tot} match the labels; sampled echo bits {eok}/{etot} correct; "
            f"{bad} malformed samples; peak RSS {n(m['server'].get('peak_rss_mb'))} MB"
            + (f"; ERROR: {m['error'][:300]}" if m.get("error") else "")
            + "".join(f"; FAILED {f[:200]}" for f in failed)
            + "".join(f"; {f}" for f in remeasured(m["scenarios"]))
        )
    return "\n".join(lines) + "\n"


def remeasured(rows: list[Row]) -> list[str]:
    """Rows whose first window(s) were discarded because other processes took CPU."""
    return [
        f"{r['scenario']} {r.get('concurrency', r.get('sessions'))}"
        f"×{r.get('images_per_request', r.get('bits_per_message'))} re-measured after "
        f"noisy window(s) (other CPU {r['discarded_noisy_other_cpu_pct']} %)"
        for r in rows
        if r.get("discarded_noisy_other_cpu_pct")
    ]


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Write benchmark.md, benchmark.json and benchmark.png into ``out``."""
    from bench import plot

    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets = evaluate_targets(results)
    md, js, png = out / "benchmark.md", out / "benchmark.json", out / "benchmark.png"
    md.write_text(markdown(results, targets))
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot.draw(results, png)
    return [md, js, png]
