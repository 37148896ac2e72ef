"""The shipped echo_rnn echoes a fresh 100,000-bit stream without a single mistake.

The stream is fed through the exported ``step`` signature in chunks of random lengths with the
state carried, as a streaming client would. The seed is random on every run (set
``ECHO_TEST_SEED`` to replay one) and printed, and it is never one of the training seeds.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from modelspec.contract import (
    ECHO_BATCH_SIZE,
    ECHO_BITS,
    ECHO_INITIAL_STATE_SIGNATURE,
    ECHO_LENGTHS,
    ECHO_MODEL,
    ECHO_PROBABILITIES,
    ECHO_STATE,
    ECHO_STEP_SIGNATURE,
    METADATA_FILE,
    list_versions,
    resolve_version_dir,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
STREAM_LENGTH = 100_000
MAX_CHUNK = 64


@pytest.mark.slow  # 100,000 bits through each shipped version: ~20 s, most of the fast tier
@pytest.mark.parametrize("version", list_versions(MODEL_DIR / ECHO_MODEL))
def test_shipped_model_echoes_a_fresh_stream_perfectly(version: int) -> None:
    version_dir = resolve_version_dir(MODEL_DIR, ECHO_MODEL, version)
    meta = json.loads((version_dir / METADATA_FILE).read_text())
    echo_step, state_dim = meta["echo_step"], meta["state_dim"]
    training_seeds = {int(v) for k, v in meta["data"].items() if k.endswith("seed")}
    seed = int(os.environ.get("ECHO_TEST_SEED", secrets.randbits(32)))
    assert seed not in training_seeds, f"seed {seed} was used in training"
    print(f"echo stream seed: {seed} (replay with ECHO_TEST_SEED={seed})")

    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, STREAM_LENGTH).astype(np.float32)
    loaded = tf.saved_model.load(str(version_dir))
    step = loaded.signatures[ECHO_STEP_SIGNATURE]
    init = loaded.signatures[ECHO_INITIAL_STATE_SIGNATURE]
    state = init(**{ECHO_BATCH_SIZE: tf.constant(1)})[ECHO_STATE]
    assert state.shape == (1, state_dim)

    predicted, start, chunks = [], 0, 0
    while start < STREAM_LENGTH:
        n = min(int(rng.integers(1, MAX_CHUNK + 1)), STREAM_LENGTH - start)
        out = step(
            **{
                ECHO_BITS: tf.constant(bits[None, start : start + n]),
                ECHO_STATE: state,
                ECHO_LENGTHS: tf.constant([n], tf.int32),
            }
        )
        predicted.append(out[ECHO_PROBABILITIES].numpy()[0] > 0.5)
        state, start, chunks = out[ECHO_STATE], start + n, chunks + 1
    predicted_bits = np.concatenate(predicted)

    # Step t must echo the input from echo_step steps earlier (the first echo_step are unscored).
    errors = np.flatnonzero(predicted_bits[echo_step:] != (bits[:-echo_step] > 0.5))
    assert len(predicted_bits) == STREAM_LENGTH and chunks > STREAM_LENGTH // MAX_CHUNK
    assert errors.size == 0, (
        f"seed {seed}: {errors.size} wrong echoes of {STREAM_LENGTH - echo_step}, "
        f"first at steps {(errors[:10] + echo_step).tolist()}"
    )
    assert meta["metrics"]["stream_accuracy"] == 1.0
