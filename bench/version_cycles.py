"""Does unloading a model version free its memory? Load and unload versions N times, watch RSS.

    .venv/bin/python -m bench.version_cycles [--cycles 10] [--out bench/results]

Starts ``python -m app`` on a temporary ``MODEL_DIR`` (copies of the shipped models,
``MODEL_POLL_S=0``), then, ``--cycles`` times: publishes the next version of both models (copy,
then rename into place), sends SIGHUP, waits until the new versions serve and the old ones are
unloaded, sends a few requests to the new ones, and records the server's RSS. Writes
``version_cycles.json`` to ``--out``; prints one line per cycle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests import servers as server

SHIPPED = server.REPO / "models"
MODELS = ("mnist_lstm", "echo_rnn")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def publish(model_dir: Path, name: str, version: int) -> None:
    staging = model_dir / name / f".tmp-{version}"
    shutil.copytree(SHIPPED / name / "1", staging)
    staging.rename(model_dir / name / str(version))


def states(srv: server.Server) -> dict[tuple[str, int], str]:
    listing = httpx.get(f"http://127.0.0.1:{srv.port}/v1/models", timeout=10).json()["models"]
    return {(m["name"], m["version"]): m["state"] for m in listing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--out", type=Path, default=server.REPO / "bench" / "results")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    model_dir = tmp / "models"
    for name in MODELS:
        (model_dir / name).mkdir(parents=True)
        publish(model_dir, name, 1)
    env = {"MODEL_DIR": str(model_dir), "MODEL_POLL_S": "0", "ECHO_SESSION_TTL_S": "1"}
    env["ECHO_MODEL_VERSIONS"] = "latest"
    env |= dict(item.split("=", 1) for item in args.env)
    srv = server.start(env, tmp / "server.log", timeout=180)
    rows = [{"cycle": 0, "rss_mb": rss_mb(srv.pid)}]
    print(f"cycle  0: RSS {rows[0]['rss_mb']:7.1f} MB (version 1 serving)", flush=True)
    try:
        for cycle in range(1, args.cycles + 1):
            version = cycle + 1
            for name in MODELS:
                publish(model_dir, name, version)
            started = time.monotonic()
            os.kill(srv.pid, signal.SIGHUP)
            want = {(n, version): "available" for n in MODELS}
            want |= {(n, version - 1): "unloaded" for n in MODELS}
            while any(states(srv).get(k) != v for k, v in want.items()):
                if time.monotonic() - started > 120:
                    sys.exit(f"cycle {cycle}: versions did not switch: {states(srv)}")
                time.sleep(0.2)
            for _ in range(20):
                r = httpx.post(
                    f"http://127.0.0.1:{srv.port}/predict/digit", json={"image": [[0] * 28] * 28}
                )
                assert r.json()["model"]["version"] == version
            for name in MODELS:  # keep the folder small: the unloaded version goes
                shutil.rmtree(model_dir / name / str(version - 1))
            rows.append({"cycle": cycle, "rss_mb": rss_mb(srv.pid),
                         "switch_s": time.monotonic() - started})  # fmt: skip
            print(
                f"cycle {cycle:2}: RSS {rows[-1]['rss_mb']:7.1f} MB, versions {version - 1} -> "
                f"{version} in {rows[-1]['switch_s']:.1f} s",
                flush=True,
            )
    finally:
        server.stop(srv)
    result = {
        "command": f"python -m bench.version_cycles --cycles {args.cycles}"
        + "".join(f" --env {e}" for e in args.env),
        "rows": rows,
        "rss_first_mb": rows[1]["rss_mb"] if len(rows) > 1 else None,
        "rss_last_mb": rows[-1]["rss_mb"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "version_cycles.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
