"""Side-by-side A/B of server configurations on one scenario, in alternating rounds.

    python -m bench.ab digits:64:1 --config base= --config off=BATCHING_ENABLED=false --rounds 3
    python -m bench.ab echo:1000:1 --config sansio=@app.main:app \
        --config legacy=@app.main:app,UVICORN_WS=websockets
    python -m bench.ab digits:64:1 --config service= --config floor=@bench.floor:app
    python -m bench.ab digits:64:1 --config edge= --config plain=EDGE_LIMITS=false --rounds 3
    python -m bench.ab digits:64:1 --config new=@app.main:app \
        --config old=@app.main:app,cwd=../old-checkout --rounds 3

Each ``--config NAME=ENV`` starts one server, ``python -m app`` (``ENV``: comma-separated
``KEY=VALUE`` pairs added to the environment; ``@module:app`` serves another ASGI app with the
``uvicorn`` command, whose options ``UVICORN_*`` variables set). All servers stay up; every round
drives each of them in turn with ``bench.loadgen``, so slow drifts of a shared machine hit all
configurations alike. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import servers as server


def parse_config(text: str) -> tuple[str, dict[str, str], str | None, Path]:
    """``NAME=K=V,...``; ``@module:app`` serves another ASGI app, ``cwd=DIR`` another checkout."""
    name, _, spec = text.partition("=")
    app: str | None = None  # the service, python -m app
    env: dict[str, str] = {}
    cwd = server.REPO
    for item in filter(None, spec.split(",")):
        if item.startswith("@"):
            app = item[1:]
        elif item.startswith("cwd="):
            cwd = Path(item[4:]).resolve()
        else:
            key, _, value = item.partition("=")
            env[key] = value
    return name, env, app, cwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", help="digits:C:N or echo:S:B")
    parser.add_argument("--config", action="append", required=True, help="NAME=K=V,K=V or @app")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    kind, _, rest = args.scenario.partition(":")
    if kind not in ("digits", "echo"):
        parser.error("the scenario is digits:C:N or echo:S:B")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    servers = {}
    try:
        for name, env, app, cwd in map(parse_config, args.config):
            servers[name] = server.start(env, tmp / f"{name}.log", cwd=cwd, app=app)
        for r in range(args.rounds):
            for name, srv in servers.items():
                cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(srv.port)]
                cmd += ["--server-pid", str(srv.pid), f"--{kind}={rest}"]
                cmd += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
                done = subprocess.run(cmd, cwd=server.REPO, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name}: load generator failed:\n{done.stderr[-2000:]}")
                for line in done.stdout.splitlines():
                    d = json.loads(line)
                    if "msgs_per_s" not in d:  # not a result line
                        print(f"{name:>10} round {r}: {line[:300]}", file=sys.stderr)
                        continue
                    print(
                        f"{name:>10} round {r}: {d['msgs_per_s']:8,.0f} msgs/s"
                        f"  p50 {d['p50_ms']:6.2f}  p99 {d['p99_ms']:6.2f} ms"
                        f"  server {d['server_cpu_pct']:5.1f} % CPU"
                        f" {d['server_cpu_ms_per_msg']:.3f} ms/msg"
                        f"  rows/call {d['rows_per_call']:.1f}  other {d['other_cpu_pct']:.0f} %",
                        flush=True,
                    )
    finally:
        for srv in servers.values():
            server.stop(srv)


if __name__ == "__main__":
    main()
