"""Where the server's CPU goes under load: ``python -m bench.profile digits:64:1 --batching on``.

Starts a fresh server, drives one scenario with the load generator and, after the warm-up, takes
(1) a per-thread CPU split from ``/proc/<pid>/task`` (the event-loop thread is the main thread;
TensorFlow's compute pools are native threads that py-spy does not see) and (2) a py-spy
profile of the Python threads. Prints the top functions by self and inclusive samples, and writes
the raw py-spy stacks (collapsed, one stack per line) to ``--out``.

Scenarios: ``digits:C:N`` (C connections, N images per request) or ``echo:S:B`` (S sessions,
B bits per message). ``--store redis`` keeps echo sessions in a real ``redis-server``;
``--store redis-r1`` in a primary with one replica and ``ECHO_STORE_MIN_REPLICAS=1`` (as
``bench.stores``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.stores import PERSISTENCE
from tests import servers as server
from tests.redis_cluster import running_cluster
from tests.redis_server import running_redis
from tests.servers import CLK_TCK, REPO

PY_SPY = Path(sys.executable).with_name("py-spy")
LINE_NO = re.compile(r":\d+\)$")
OWN_CODE = ("app/", "modelspec/")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (the main thread as ``event-loop``)."""
    out: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_bytes()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        fields = raw.rsplit(b")", 1)[1].split()
        key = "event-loop (main thread)" if task.name == str(pid) else name
        out[key] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return dict(out)


def summarize(raw_path: Path, top: int) -> list[str]:
    """Top functions by self and by inclusive samples from py-spy's ``--format raw`` output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [LINE_NO.sub(")", f) for f in stack.split(";")]
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            if f.split("(")[-1].startswith(OWN_CODE):
                incl[f] += n
    lines = [f"py-spy: {total} samples (Python threads only; idle excluded)", "", "by thread:"]
    lines += [f"  {100 * c / total:5.1f}%  {t}" for t, c in threads.most_common(8)]
    lines += ["", "self (by function):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive (the service's own functions):"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return lines


def loadgen_args(spec: str) -> list[str]:
    kind, a, b = spec.split(":")
    return [f"--digits={a}:{b}"] if kind == "digits" else [f"--echo={a}:{b}"]


@contextlib.contextmanager
def store_env(store: str) -> Iterator[dict[str, str]]:
    """The server's settings for ``store``, with its Redis running meanwhile."""
    if store == "memory":
        yield {}
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    if store == "redis":
        with running_redis(tmp) as redis:
            yield {"ECHO_STORE_URL": redis.url}
        return
    with running_cluster(tmp, replicas=1, sentinels=0, server_args=PERSISTENCE) as cluster:
        yield {"ECHO_STORE_URL": cluster.primary_url, "ECHO_STORE_MIN_REPLICAS": "1"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("scenario", help="digits:C:N or echo:S:B")
    ap.add_argument("--batching", choices=["on", "off"], default="on")
    ap.add_argument("--seconds", type=float, default=6.0, help="profiled seconds")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--store", choices=["memory", "redis", "redis-r1"], default="memory")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tmp" / "profile")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with store_env(args.store) as env:
        profile(args, env)


def profile(args: argparse.Namespace, env: dict[str, str]) -> None:
    env = {**env, "BATCHING_ENABLED": "true" if args.batching == "on" else "false"}
    if args.model_dir:
        env["MODEL_DIR"] = str(args.model_dir)
    srv = server.start(env, args.out / "server.log")
    tag = args.scenario.replace(":", "-") + "-" + args.batching + ("-gil" if args.gil else "")
    tag += "" if args.store == "memory" else f"-{args.store}"
    raw = args.out / f"{tag}.txt"
    try:
        warmup = 3.0
        cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(srv.port)]
        cmd += ["--server-pid", str(srv.pid), "--warmup", str(warmup)]
        cmd += ["--duration", str(args.seconds + 2), *loadgen_args(args.scenario)]
        gen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        time.sleep(warmup + 0.5)
        t0, c0 = time.perf_counter(), thread_cpu(srv.pid)
        spy = [str(PY_SPY), "record", "--pid", str(srv.pid), "--duration", str(int(args.seconds))]
        spy += ["--rate", str(args.rate), "--nonblocking", "--threads"]
        spy += ["--gil"] if args.gil else []
        subprocess.run([*spy, "--format", "raw", "--output", str(raw)], capture_output=True)
        wall, c1 = time.perf_counter() - t0, thread_cpu(srv.pid)
        out, _ = gen.communicate(timeout=120)
        result = json.loads(out.splitlines()[0])
    finally:
        server.stop(srv)
    print(f"{args.scenario} batching {args.batching}: {result.get('msgs_per_s', 0):,.0f} msgs/s, "
          f"p50 {result.get('p50_ms', 0):.2f} ms, p99 {result.get('p99_ms', 0):.2f} ms, "
          f"{result.get('rows_per_call', 0):.1f} rows/model call, server "
          f"{result.get('server_cpu_ms_per_msg', 0):.3f} CPU-ms/msg")  # fmt: skip
    print(f"\nserver CPU by thread over {wall:.1f} s (% of one core):")
    for name in sorted(c1, key=lambda k: c0.get(k, 0) - c1[k]):
        used = c1[name] - c0.get(name, 0)
        if used > 0:
            print(f"  {100 * used / wall:6.1f}%  {name}")
    print("\n" + "\n".join(summarize(raw, args.top)))
    print(f"\nraw py-spy stacks: {raw}")


if __name__ == "__main__":
    main()
