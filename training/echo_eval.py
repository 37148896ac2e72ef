"""Measure an exported echo RNN through its ``step`` signature, and draw its echo.

The evaluation feeds one long random bit stream in chunks of random lengths, carrying the state
from chunk to chunk exactly as a streaming client would, and scores the predicted bits
(probability > 0.5) against the input delayed by ``echo_step`` on every step after the first
``echo_step`` ones (whose targets are padding zeros).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from modelspec.contract import (
    ECHO_BATCH_SIZE,
    ECHO_BITS,
    ECHO_INITIAL_STATE_SIGNATURE,
    ECHO_LENGTHS,
    ECHO_PROBABILITIES,
    ECHO_STATE,
    ECHO_STEP_SIGNATURE,
)
from modelspec.echo import make_echo_series

EVAL_STREAM_LENGTH = 100_000
MAX_CHUNK = 64  # chunk lengths are drawn uniformly from 1..MAX_CHUNK

Signature = Callable[..., dict[str, tf.Tensor]]


def load_signatures(version_dir: Path) -> tuple[Any, Signature, Signature]:
    """The loaded SavedModel (keep it alive) and its ``step`` and ``initial_state`` signatures."""
    loaded = tf.saved_model.load(str(version_dir))
    return (
        loaded,
        loaded.signatures[ECHO_STEP_SIGNATURE],
        loaded.signatures[ECHO_INITIAL_STATE_SIGNATURE],
    )


def feed_in_chunks(
    step: Signature, initial_state: Signature, bits: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Feed one bit stream through ``step`` in random-length chunks; return P(bit) per step."""
    state = initial_state(**{ECHO_BATCH_SIZE: tf.constant(1)})[ECHO_STATE]
    probabilities: list[np.ndarray] = []
    start = 0
    while start < len(bits):
        size = min(int(rng.integers(1, MAX_CHUNK + 1)), len(bits) - start)
        out = step(
            **{
                ECHO_BITS: tf.constant(bits[np.newaxis, start : start + size]),
                ECHO_STATE: state,
                ECHO_LENGTHS: tf.constant([size], tf.int32),
            }
        )
        probabilities.append(out[ECHO_PROBABILITIES].numpy()[0])
        state = out[ECHO_STATE]
        start += size
    return np.concatenate(probabilities)


def stream_accuracy(
    step: Signature,
    initial_state: Signature,
    *,
    echo_step: int,
    seed: int,
    length: int = EVAL_STREAM_LENGTH,
) -> dict[str, Any]:
    """Accuracy of the echoed bits on a fresh ``length``-bit stream fed in random chunks."""
    rng = np.random.default_rng(seed)
    bits, targets = make_echo_series(rng, 1, length, echo_step)
    probabilities = feed_in_chunks(step, initial_state, bits[0], rng)
    p, y = probabilities[echo_step:], targets[0, echo_step:]
    correct = (p > 0.5) == (y > 0.5)
    return {
        "stream_accuracy": float(correct.mean()),
        "stream_errors": int((~correct).sum()),
        "stream_length": length,
        "scored_steps": len(y),
        "chunk_length_range": [1, MAX_CHUNK],
        "stream_seed": seed,
        # The confidence margin: the smallest probability given to the correct bit.
        "min_correct_probability": float(np.where(y > 0.5, p, 1.0 - p).min()),
    }


def plot_echo_streams(
    step: Signature,
    initial_state: Signature,
    path: Path,
    *,
    echo_step: int,
    seed: int,
    streams: int = 5,
    steps: int = 40,
) -> Path:
    """The tutorial's picture: input (blue), target (red) and predicted (green) bits per stream."""
    rng = np.random.default_rng(seed)
    bits, targets = make_echo_series(rng, streams, steps, echo_step)
    out = step(
        **{
            ECHO_BITS: tf.constant(bits),
            ECHO_STATE: tf.zeros(
                [streams, step.structured_input_signature[1][ECHO_STATE].shape[1]]
            ),
            ECHO_LENGTHS: tf.fill([streams], steps),
        }
    )
    predicted = (out[ECHO_PROBABILITIES].numpy() > 0.5).astype(np.float32)
    fig, axes = plt.subplots(streams, 1, figsize=(10, 1.3 * streams), sharex=True, squeeze=False)
    t = np.arange(steps)
    for i, ax in enumerate(axes[:, 0]):
        ax.bar(t, bits[i], width=1, color="tab:blue", label="input")
        ax.bar(
            t, targets[i] * 0.5, width=1, color="tab:red", label=f"target (input {echo_step} back)"
        )
        ax.bar(t, predicted[i] * 0.3, width=1, color="tab:green", label="predicted")
        ax.axvspan(-0.5, echo_step - 0.5, color="0.9", zorder=0)  # padding targets, not scored
        ax.set_ylim(0, 1.05)
        ax.set_yticks([])
        ax.set_ylabel(f"stream {i}")
    axes[0, 0].legend(loc="upper center", bbox_to_anchor=(0.5, 1.9), ncol=3, frameon=False)
    axes[-1, 0].set_xlabel("time step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
