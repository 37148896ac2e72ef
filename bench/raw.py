"""Raw in-process model throughput, the ceiling for the server: ``python -m bench.raw``.

Loads ``<model_dir>/mnist_lstm/<version>`` with ``tf.saved_model.load`` and calls its
``serving_default`` signature back to back on real MNIST test images, one batch size at a time;
prints one JSON object per batch size (images/s, ms per call, this process's CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(fn: Any, batch: int, duration: float, warmup: float) -> dict[str, float]:
    import numpy as np
    import tensorflow as tf

    from bench import mnist

    images, labels = mnist.load(batch)
    x = np.frombuffer(b"".join(images), np.uint8).reshape(batch, 28, 28)
    inp = tf.constant(x.astype(np.float32) / 255.0)
    digits = np.argmax(fn(images=inp)["probabilities"].numpy(), axis=1)
    accuracy = float(np.mean(digits == np.asarray(labels)))
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn(images=inp)["probabilities"].numpy()
    calls = 0
    t0, c0 = time.perf_counter(), os.times()
    end = t0 + duration
    while time.perf_counter() < end:
        fn(images=inp)["probabilities"].numpy()
        calls += 1
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {
        "batch": batch,
        "calls": calls,
        "window_s": wall,
        "images_per_s": calls * batch / wall,
        "ms_per_call": 1e3 * wall / calls,
        "cpu_pct": 100 * cpu / wall,
        "cpu_ms_per_image": 1e3 * cpu / (calls * batch),
        "accuracy": accuracy,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("models/mnist_lstm/1"))
    ap.add_argument("--batch", type=int, action="append", help="repeatable (default: 512)")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    args = ap.parse_args(argv)
    import tensorflow as tf

    fn = tf.saved_model.load(str(args.model)).signatures["serving_default"]
    for batch in args.batch or [512]:
        result = measure(fn, batch, args.duration, args.warmup)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
