"""What one echo step costs the service without any transport, in-process:

    python -m bench.sequence_steps [--sessions 100] [--duration 4]

S closed loops of 1-bit steps on the shipped echo model (memory store, batching on, the
service's defaults), first as ``/echo`` sessions step (``EchoService.advance`` on an attached
session), then as v2 sequences step (``EchoSequences.step``: attach, advance, detach and keep
the reply for retries, each step). One JSON line each: steps/s and CPU µs per step of this
process (the event loop, the model thread and TensorFlow's), with the server's garbage
collector settings (``app.core.runtime.tune_runtime``, once the model is loaded). The difference
is what the sequence extension costs per step over a WebSocket message, whichever transport
carries it (``bench.grpc`` compares the transports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import uvloop

from app.core.config import Settings
from app.core.runtime import tune_runtime
from app.services.echo_sequences import EchoSequences
from app.services.echo_service import EchoService
from app.services.models import EchoModel
from modelspec import contract
from tests.servers import REPO, self_cpu_seconds


def load_model(model_dir: Path) -> EchoModel:
    path = contract.resolve_version_dir(model_dir, contract.ECHO_MODEL, 1)
    model = EchoModel(contract.ECHO_MODEL, int(path.name), path, contract.ModelMetadata.read(path))
    model.load(EchoModel.REQUIRED)
    model.warm_up()
    return model


async def measure(model: EchoModel, mode: str, sessions: int, duration: float) -> dict:
    unlimited = 1_000_000
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        echo_new_sessions_per_s=unlimited,
        echo_new_sessions_burst=unlimited,
        echo_max_sessions_per_client=unlimited,
    )
    echo = EchoService(settings)
    await echo.start()
    await echo.add_lane(model)
    sequences = EchoSequences(echo)
    bit = np.ones(1, np.uint8)
    count, stop = [0], [False]

    async def sequence(i: int) -> None:
        step = 0
        while not stop[0]:
            await sequences.step(
                scope="",
                sequence_id=i + 1,
                start=step == 0,
                end=False,
                request_id=f"{i}:{step}",
                bits=bit,
                version=None,
                client="127.0.0.1",
            )
            step += 1
            count[0] += 1

    async def session(i: int) -> None:
        attached = await echo.open(None, "127.0.0.1", object())  # type: ignore[arg-type]
        while not stop[0]:
            await echo.advance(attached, b"\x01")
            count[0] += 1

    loops = [
        asyncio.create_task((sequence if mode == "sequences" else session)(i))
        for i in range(sessions)
    ]
    await asyncio.sleep(1.5)
    c0, n0, t0 = self_cpu_seconds(), count[0], time.perf_counter()
    await asyncio.sleep(duration)
    c1, n1, t1 = self_cpu_seconds(), count[0], time.perf_counter()
    stop[0] = True
    await asyncio.gather(*loops, return_exceptions=True)
    await echo.stop()
    steps = n1 - n0
    return {
        "mode": mode,
        "sessions": sessions,
        "steps_per_s": steps / (t1 - t0),
        "cpu_us_per_step": 1e6 * (c1 - c0) / max(1, steps),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--model-dir", type=Path, default=REPO / "models")
    args = ap.parse_args(argv)
    model = load_model(args.model_dir)
    tune_runtime()  # as app.main does once everything is loaded: GC costs as in the server
    for mode in ("sessions", "sequences"):
        print(json.dumps(uvloop.run(measure(model, mode, args.sessions, args.duration))))


if __name__ == "__main__":
    main()
