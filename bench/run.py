"""Run the whole benchmark: ``.venv/bin/python -m bench.run [--quick] [--out DIR]``.

1. raw in-process model throughput (``bench.raw``, its own process, no server running);
2. for batching on, then off: a fresh ``python -m app`` subprocess, driven by the load
   generator (``bench.loadgen``, another process) through every digits and echo scenario;
3. extra cold starts (process start → ``/readyz`` 200);
4. results table (Markdown + JSON) and plot (PNG) in ``--out`` (default ``bench/results/``);
5. digits by protocol (``bench.protocols``): ``/predict/digit`` JSON, v2 JSON and v2 binary side
   by side on a fresh server → ``protocols.{md,json}``; ``--only protocols`` runs just this;
6. echo with sessions in memory vs Redis, with and without a replica acknowledging every write,
   and on 2 workers (``bench.stores``) →
   ``stores.{md,json}``; ``--only stores`` runs just this;
7. open-loop latency at fixed offered loads beside the floor (``bench.openloop compare``) →
   ``openloop.{md,json,png}``; ``--only openloop`` runs just this;
8. echo sessions at scale beside the floor (``bench.sessions``: open rate, latency, memory and
   GC by open sessions, 10,000; quick 2,000) → ``sessions.{md,json,png}``; ``--only sessions``
   runs just this;
9. gRPC beside HTTP and the WebSocket (``bench.grpc``: digits by protocol, echo streams vs
   ``/echo`` closed and open loop, the transports' floor) → ``grpc.{md,json}``; ``--only grpc``
   runs just this.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import openloop, protocols_report, report, stores
from bench.mnist import IMAGES, MNIST_DIR
from tests import servers as server
from tests.servers import REPO

DIGIT_CONCURRENCY = (1, 16, 64)
BATCH_IMAGES = 128
BATCH_CONCURRENCY = 4  # 128-image requests in flight at once (lets batching pair them up)
ECHO_SESSIONS = (1, 100, 1000)
ECHO_BITS = (1, 32)
RAW_BATCH = 512


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def latest_version(model_dir: Path, name: str) -> Path:
    versions = sorted(
        int(p.name)
        for p in (model_dir / name).glob("*")
        if p.name.isdigit() and (p / "saved_model.pb").is_file()
    )
    if not versions:
        raise SystemExit(f"no SavedModel under {model_dir / name}/<version>/ - train it first")
    return model_dir / name / str(versions[-1])


def run_json_lines(cmd: list[str], timeout: float, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run ``cmd`` (a bench module) and parse the JSON objects it prints, one per line."""
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def measure_raw(model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    batches = [RAW_BATCH] if args.quick else [RAW_BATCH, BATCH_IMAGES, 1]
    cmd = [sys.executable, "-m", "bench.raw", "--model", str(model)]
    cmd += [f"--batch={b}" for b in batches]
    cmd += ["--duration", str(args.duration / 2 if args.quick else 4), "--warmup", "1"]
    log(f"raw in-process model throughput, batch {batches}")
    return run_json_lines(cmd, timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "2"})


def server_env(batching: bool, args: argparse.Namespace) -> dict[str, str]:
    env = {"BATCHING_ENABLED": "true" if batching else "false"}
    if args.log_level:
        env["LOG_LEVEL"] = args.log_level
    if args.model_dir:
        env["MODEL_DIR"] = str(args.model_dir)
    return env


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_mode(batching: bool, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    name = "on" if batching else "off"
    log(f"batching {name}: starting a fresh server")
    srv = server.start(server_env(batching, args), tmp / f"server-batching-{name}.log", args.cwd)
    log(f"batching {name}: ready in {srv.ready_s:.2f}s (pid {srv.pid}, port {srv.port})")
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(srv.port)]
    cmd += ["--server-pid", str(srv.pid), "--warmup", str(args.warmup)]
    cmd += ["--duration", str(args.duration), "--max-other", str(args.max_other)]
    cmd += [f"--digits={c}:1" for c in DIGIT_CONCURRENCY]
    cmd += [f"--digits={BATCH_CONCURRENCY}:{BATCH_IMAGES}"]
    bits = ",".join(str(b) for b in ECHO_BITS)
    cmd += [f"--echo={s}:{bits}" for s in ECHO_SESSIONS]
    phases = len(DIGIT_CONCURRENCY) + 1 + len(ECHO_SESSIONS) * len(ECHO_BITS)
    timeout = phases * 3 * (args.warmup + args.duration + 5) + 120
    out: dict[str, Any] = {"server": {}, "scenarios": [], "error": None}
    try:
        log(f"batching {name}: load generator, {phases} measurements")
        out["scenarios"] = run_json_lines(cmd, timeout, env={})
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        out["error"] = str(exc)[-2000:]
        log(f"batching {name}: load generator failed: {out['error'][-400:]}")
    finally:
        out["server"] = {
            "ready_s": srv.ready_s,
            "live_s": srv.live_s,
            "peak_rss_mb": peak_rss_mb(srv.pid),
            "cpu_s_total": srv.cpu_seconds() if srv.proc.poll() is None else None,
        }
        server.stop(srv)
        out["server"]["notes"] = srv.notes
        out["server"]["exit_code"] = srv.proc.returncode
    return out


def measure_cold_starts(reps: int, args: argparse.Namespace, tmp: Path) -> list[float]:
    samples = []
    for i in range(reps):
        srv = server.start(server_env(True, args), tmp / f"server-cold-{i}.log", args.cwd)
        samples.append(srv.ready_s)
        log(f"cold start {i + 1}/{reps}: {srv.ready_s:.2f}s")
        server.stop(srv)
    return samples


def source_digest() -> str:
    """sha256 (12 hex digits) over the code of app/ and modelspec/: which server code was
    measured. Docstrings, comments and formatting do not change it (:func:`code_only`)."""
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("app/**/*.py"), *REPO.glob("modelspec/**/*.py")]):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + code_only(path.read_text()))
    return h.hexdigest()[:12]


def code_only(source: str) -> bytes:
    """The module's syntax tree without docstrings, as bytes (comments and layout are not in it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            doc = first.value if isinstance(first, ast.Expr) else None
            if isinstance(doc, ast.Constant) and isinstance(doc.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def machine_state() -> dict[str, Any]:
    ps = subprocess.run(
        ["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[1:6]
    return {"loadavg": os.getloadavg(), "top_processes": [p.strip()[:120] for p in ps]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows (about 2 minutes)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds per measurement (2; quick 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per window (6; quick 2)")
    ap.add_argument("--cold-starts", type=int, help="extra cold starts (3; quick 1)")
    ap.add_argument(
        "--max-other",
        type=float,
        default=20.0,
        help="re-measure (twice at most) a window where other processes used more "
        "than this %% CPU (default 20)",
    )
    ap.add_argument("--model-dir", type=Path, help="MODEL_DIR for the server (default models/)")
    ap.add_argument(
        "--server-cwd",
        dest="cwd",
        type=Path,
        default=REPO,
        help="where to start python -m app (default: this repository)",
    )
    ap.add_argument("--log-level", help="server LOG_LEVEL (default: the service's own, INFO)")
    ap.add_argument(
        "--only",
        choices=["protocols", "stores", "openloop", "sessions", "grpc"],
        help="run only this part",
    )
    ap.add_argument("--rounds", type=int, help="rounds of the protocol comparison (3; quick 1)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 6.0)
    reps = args.cold_starts if args.cold_starts is not None else (1 if args.quick else 3)
    model_dir = (args.model_dir or args.cwd / "models").resolve()
    digit_model = latest_version(model_dir, "mnist_lstm")
    latest_version(model_dir, "echo_rnn")
    if not (MNIST_DIR / IMAGES).is_file():
        raise SystemExit(f"MNIST test images not found: {MNIST_DIR / IMAGES}")
    tmp = args.out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    before = machine_state()
    if before["loadavg"][0] > 0.5:
        log(f"WARNING: load average {before['loadavg'][0]:.2f} > 0.5: figures will be noisy")
    t0 = time.time()
    if args.only == "protocols":
        run_protocols(args, tmp, argv, t0)
        return
    if args.only == "stores":
        run_stores(args)
        return
    if args.only == "openloop":
        run_openloop(args)
        return
    if args.only == "sessions":
        run_sessions(args)
        return
    if args.only == "grpc":
        run_grpc(args)
        return
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
            "quick": args.quick,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "cpu_count": os.cpu_count(),
            "digit_model": str(digit_model.relative_to(model_dir.parent)),
            "server_source_sha256": source_digest(),
            "batch_concurrency": BATCH_CONCURRENCY,
            "server_log_level": args.log_level or "default",
            "machine_before": before,
        }
    }
    results["raw"] = measure_raw(digit_model, args)
    results["modes"] = {
        "on": measure_mode(True, args, tmp),
        "off": measure_mode(False, args, tmp),
    }
    samples = [results["modes"][m]["server"]["ready_s"] for m in ("on", "off")]
    samples += measure_cold_starts(reps, args, tmp)
    results["cold_start_s"] = samples
    results["meta"]["machine_after"] = machine_state()
    results["meta"]["total_s"] = time.time() - t0
    paths = report.write(results, args.out)
    log(f"done in {results['meta']['total_s']:.0f}s: " + ", ".join(str(p) for p in paths))
    print(paths[0].read_text())
    run_protocols(args, tmp, argv, time.time())
    run_stores(args)
    run_openloop(args)
    run_sessions(args)
    run_grpc(args)


def run_grpc(args: argparse.Namespace) -> None:
    from bench import grpc

    log("gRPC beside HTTP and the WebSocket: digits, echo closed and open loop, the floor")
    rounds = str(min(args.rounds, 2))
    grpc.compare(
        [
            *(["--quick"] if args.quick else []),
            "--rounds",
            rounds,
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--out",
            str(args.out),
        ]
    )


def run_sessions(args: argparse.Namespace) -> None:
    from bench import sessions  # imports this module (the digest): not at the top

    log("echo sessions at scale: open rate, latency, memory, GC by open sessions")
    sessions.main([*(["--quick"] if args.quick else []), "--out", str(args.out)])


def run_openloop(args: argparse.Namespace) -> None:
    log("open loop: service vs floor at fixed offered loads")
    rounds = str(min(args.rounds, 2))
    openloop.compare(["--rounds", rounds, "--duration", str(args.duration), "--out", str(args.out)])


def run_stores(args: argparse.Namespace) -> None:
    log(f"echo stores: memory vs Redis vs Redis + replica vs 2 workers, {args.rounds} rounds")
    stores.measure(
        argparse.Namespace(
            rounds=args.rounds,
            warmup=args.warmup,
            duration=args.duration,
            out=args.out,
            configs=list(stores.CONFIGS),
        )
    )


def run_protocols(args: argparse.Namespace, tmp: Path, argv: list[str] | None, t0: float) -> None:
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "server_source_sha256": source_digest(),
        "machine_before": machine_state(),
    }
    result = protocols_report.measure(args, server_env(True, args), tmp, log, run_json_lines)
    meta["machine_after"] = machine_state()
    meta["total_s"] = time.time() - t0
    paths = protocols_report.write(meta, result, args.out)
    log(f"protocols done in {meta['total_s']:.0f}s: " + ", ".join(str(p) for p in paths))
    print(paths[0].read_text())


if __name__ == "__main__":
    main()
