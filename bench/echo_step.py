"""One echo model call, NumPy beside TensorFlow: ``python -m bench.echo_step [--out DIR]``.

For each shipped ``echo_rnn`` version, CPU µs per call (this process, every thread) of the
XLA-compiled SavedModel step and of its NumPy copy (``modelspec.echo_numpy``), at calls of
``rows`` sessions × ``steps`` bits, and which of the two ``EchoModel.infer`` picks from what
``use_numpy_step`` measured at load. Writes ``echo_step.md`` to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.services.models import EchoModel
from modelspec import contract
from tests.servers import REPO

ROWS = (1, 16, 256, 4096)
STEPS = (1, 4, 32)


def cpu_us(call, rows: int, steps: int, state_dim: int) -> float:  # type: ignore[no-untyped-def]
    bits = np.ones((rows, steps), np.float32)
    state = np.zeros((rows, state_dim), np.float32)
    lengths = np.full(rows, steps, np.int32)
    call(bits, state, lengths)
    calls = max(5, 4000 // (rows * steps))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(calls):
            call(bits, state, lengths)
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app", "modelspec", "bench", ":!bench/results"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    head += "+uncommitted" if dirty else ""
    lines = [
        "# One echo model call: NumPy beside TensorFlow (XLA)",
        "",
        f"`python -m bench.echo_step`, {datetime.now(UTC).isoformat(timespec='seconds')}, "
        f"commit `{head}`, load average before {os.getloadavg()[0]:.2f}. CPU µs per call "
        "(this process, every thread), least of 3 repeats.",
        "",
        "| version | cell × layers | rows × steps | TensorFlow µs | NumPy µs | NumPy / TF "
        "| infer picks |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for version in contract.list_versions(REPO / "models" / contract.ECHO_MODEL):
        path = contract.resolve_version_dir(REPO / "models", contract.ECHO_MODEL, version)
        model = EchoModel(
            contract.ECHO_MODEL, int(path.name), path, contract.ModelMetadata.read(path)
        )
        model.load(EchoModel.REQUIRED)
        model.compile_xla(max(ROWS))
        hyper = model.metadata.hyperparameters
        model.use_numpy_step(max(ROWS))
        numpy_step = model._numpy_step
        assert numpy_step is not None
        for rows in ROWS:
            for steps in STEPS:
                model._numpy_step = None
                tf_us = cpu_us(model.infer, rows, steps, model.state_dim)
                np_us = cpu_us(numpy_step, rows, steps, model.state_dim)
                model._numpy_step = numpy_step
                pick = model.numpy_takes(rows, steps)
                row = (
                    f"| {version} | {hyper['cell']} × {hyper['layers']} | {rows} × {steps} | "
                    f"{tf_us:,.0f} | {np_us:,.0f} | {np_us / tf_us:.2f} | "
                    f"{'NumPy' if pick else 'TensorFlow'} |"
                )
                print(row, flush=True)
                lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "echo_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
