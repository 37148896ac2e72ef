"""Side-by-side A/B of checkouts on the gRPC stream echo, in alternating rounds:

    python -m bench.grpc_ab --config old=../old-checkout --config new=. [--rounds 2] \
        [--case echo:grpc:100 --case echo:grpc:1000]

Each ``--config NAME=DIR`` is a checkout (``git archive <commit> | tar -x -C DIR`` will do);
every round starts a server from each in turn (``python -m app`` in DIR, every other round in
reverse order) and drives it with ``bench.grpc``'s load generator (this checkout's) for each
case: one JSON line per measurement, with the server's CPU µs per message, the echo model's rows
per call and the other processes' CPU (on a shared machine, compare CPU per message rather than
messages per second).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import servers as server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args(argv)
    configs = [(n, Path(d).resolve()) for n, _, d in (c.partition("=") for c in args.config)]
    cases = args.case or ["echo:grpc:100"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-ab-"))
    for r in range(args.rounds):
        for name, cwd in configs if r % 2 == 0 else configs[::-1]:
            srv = server.start({"LOG_LEVEL": "WARNING"}, tmp / f"{name}-{r}.log", cwd=cwd)
            try:
                for case in cases:
                    load = [
                        sys.executable, "-m", "bench.grpc", "load", "--port", str(srv.port),
                        "--grpc-port", str(srv.grpc_port), "--server-pid", str(srv.pid),
                        "--warmup", str(args.warmup), "--duration", str(args.duration),
                        f"--case={case}",
                    ]  # fmt: skip
                    out = subprocess.run(load, cwd=server.REPO, capture_output=True, text=True)
                    for line in out.stdout.splitlines():
                        if line.startswith("{"):
                            print(json.dumps(_row(r, name, case, json.loads(line))), flush=True)
            finally:
                server.stop(srv)


def _row(round_: int, name: str, case: str, got: dict) -> dict:
    return {
        "round": round_,
        "config": name,
        "case": case,
        "msgs_per_s": round(got["msgs_per_s"]),
        "server_cpu_us_per_msg": round(1000 * got["server_cpu_ms_per_msg"], 1),
        "rows_per_call": round(got["rows_per_call"], 1),
        "other_cpu_pct": round(got["other_cpu_pct"]),
        "errors": got["errors"],
    }


if __name__ == "__main__":
    main()
