"""Run the protocol comparison (``bench.protocols``) on a fresh server and write its results.

``measure`` starts one server (batching on), drives it with ``--rounds`` rounds of every case
(protocols alternating within a round), and ``write`` turns the rows into
``protocols.{md,json}``: per case the median over rounds, and the ratio to ``/predict/digit``
JSON taken within each round (median and range), which is what the issue's goal is about.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.protocols import PROTOCOLS
from bench.report import n, table
from tests import servers as server

CONCURRENCY = 64
IMAGES_PER_REQUEST = (1, 128)
LABELS = {"native": "/predict/digit JSON", "v2-json": "v2 JSON", "v2-binary": "v2 binary"}


def measure(args: Any, env: dict[str, str], tmp: Path, log: Any, run_json_lines: Any) -> dict:
    """One server, ``args.rounds`` rounds of all cases; the raw rows and the server's notes."""
    rounds = args.rounds
    cases = [f"{p}:{CONCURRENCY}:{k}" for _ in range(rounds) for k in IMAGES_PER_REQUEST
             for p in PROTOCOLS]  # fmt: skip
    log(f"protocols: starting a fresh server; {len(cases)} measurements ({rounds} rounds)")
    srv = server.start(env, tmp / "server-protocols.log", args.cwd)
    cmd = [sys.executable, "-m", "bench.protocols", "--port", str(srv.port)]
    cmd += ["--server-pid", str(srv.pid), "--warmup", str(args.warmup)]
    cmd += ["--duration", str(args.duration), "--max-other", str(args.max_other)]
    cmd += [f"--case={c}" for c in cases]
    timeout = len(cases) * 3 * (args.warmup + args.duration + 5) + 120
    out: dict[str, Any] = {"rounds": rounds, "rows": [], "error": None}
    try:
        out["rows"] = run_json_lines(cmd, timeout, env={})
    except Exception as exc:
        out["error"] = str(exc)[-2000:]
        log(f"protocols: load generator failed: {out['error'][-400:]}")
    finally:
        server.stop(srv)
    for i, row in enumerate(out["rows"]):
        row["round"] = i // (len(PROTOCOLS) * len(IMAGES_PER_REQUEST))
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (images per request, protocol): medians over rounds and in-round ratios to native."""
    good = [r for r in rows if "error" not in r]
    native = {(r["round"], r["images_per_request"]): r["items_per_s"]
              for r in good if r["protocol"] == "native"}  # fmt: skip
    out = []
    for k in IMAGES_PER_REQUEST:
        for p in PROTOCOLS:
            mine = [r for r in good if r["protocol"] == p and r["images_per_request"] == k]
            if not mine:
                continue
            ratios = [r["items_per_s"] / native[(r["round"], k)] for r in mine
                      if native.get((r["round"], k))]  # fmt: skip

            def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
                return statistics.median(r[key] for r in rows)

            out.append({
                "protocol": p, "images_per_request": k, "rounds": len(mine),
                "images_per_s": med("items_per_s"), "requests_per_s": med("msgs_per_s"),
                "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                "server_cpu_ms_per_image": med("server_cpu_ms_per_msg") / k,
                "client_cpu_pct": med("client_cpu_pct"), "other_cpu_pct": med("other_cpu_pct"),
                "rows_per_call": med("rows_per_call"), "request_bytes": mine[0]["request_bytes"],
                "vs_native": statistics.median(ratios) if ratios else None,
                "vs_native_range": [min(ratios), max(ratios)] if ratios else None,
                "errors": sum(r["errors"] for r in mine),
                "checked": sum(r["verify"]["checked"] for r in mine),
                "correct": sum(r["verify"]["correct"] for r in mine),
                "malformed": sum(r["verify"]["malformed"] for r in mine),
            })  # fmt: skip
    return out


def markdown(meta: dict[str, Any], result: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    head = ["images/request", "protocol", "img/s", "vs /predict/digit JSON (range)", "req/s",
            "p50 / p99 ms", "request bytes", "server CPU ms/img", "rows/model call",
            "client CPU %", "other CPU %", "sampled digits correct"]  # fmt: skip
    rows = []
    for s in summary:
        ratio = s["vs_native"]
        span = s["vs_native_range"]
        cell = f"{ratio:.2f}× ({span[0]:.2f}–{span[1]:.2f})" if ratio is not None else "–"
        rows.append([str(s["images_per_request"]), LABELS[s["protocol"]], n(s["images_per_s"]),
                     cell, n(s["requests_per_s"]), f"{n(s['p50_ms'])} / {n(s['p99_ms'])}",
                     f"{s['request_bytes']:,}", n(s["server_cpu_ms_per_image"]),
                     n(s["rows_per_call"]), n(s["client_cpu_pct"]), n(s["other_cpu_pct"]),
                     f"{s['correct']}/{s['checked']}"])  # fmt: skip
    goal = next((s for s in summary if s["protocol"] == "v2-binary"
                 and s["images_per_request"] == 128), None)  # fmt: skip
    met = goal is not None and goal["vs_native"] is not None and goal["vs_native"] >= 1
    verdict = (
        "–" if goal is None else f"{goal['vs_native']:.2f}× ({'✅ met' if met else '❌ missed'})"
    )
    errors = sum(s["errors"] + s["malformed"] for s in summary)
    lines = [
        "# Digits by protocol: /predict/digit JSON vs Open Inference Protocol (v2)",
        "",
        f"`{meta['command']}` - started {meta['started']}, {meta['cpu_count']} CPU cores, "
        f"server sources sha256 `{meta['server_source_sha256']}`, {CONCURRENCY} keep-alive "
        f"connections, {meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per "
        f"row, {result['rounds']} round(s) alternating the protocols; medians over rounds, "
        "ratios taken within each round. One server, batching on. Every protocol sends the "
        "same real MNIST images as 0–255 pixels and gets the probabilities and the digit back.",
        "",
        f"**Goal** (issue 13): v2 binary with 128 images per request at least as fast as "
        f"/predict/digit JSON: {verdict}.",
        "",
        *table(head, rows),
        "",
        f"Failed or malformed replies: {errors}."
        + (f" ERROR: {result['error'][:300]}" if result.get("error") else ""),
    ]
    return "\n".join(lines) + "\n"


def write(meta: dict[str, Any], result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result["rows"])
    md, js = out / "protocols.md", out / "protocols.json"
    md.write_text(markdown(meta, result, summary))
    doc = {"meta": meta, "summary": summary, **result}
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return [md, js]
