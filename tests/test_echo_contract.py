"""The echo RNN's exported ``step``/``initial_state`` contract, on real SavedModels.

Every check runs against the shipped ``echo_rnn`` export and against a freshly built, untrained
2-layer LSTM exported to a temporary folder (so a multi-layer packed ``(h, c)`` state is covered).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
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
    resolve_version_dir,
)
from modelspec.echo import EchoRNN, export_echo_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
TOL = 1e-5


@dataclass
class Exported:
    loaded: Any  # keeps the restored variables alive
    step: Any
    initial_state: Any
    state_dim: int
    model: EchoRNN | None = None  # the in-memory model, where we built it here

    def run(
        self, bits: np.ndarray, state: np.ndarray, lengths: list[int]
    ) -> tuple[np.ndarray, ...]:
        out = self.step(
            **{
                ECHO_BITS: tf.constant(bits, tf.float32),
                ECHO_STATE: tf.constant(state, tf.float32),
                ECHO_LENGTHS: tf.constant(lengths, tf.int32),
            }
        )
        return out[ECHO_PROBABILITIES].numpy(), out[ECHO_STATE].numpy()


def _load(version_dir: Path, state_dim: int, model: EchoRNN | None = None) -> Exported:
    loaded = tf.saved_model.load(str(version_dir))
    return Exported(
        loaded,
        loaded.signatures[ECHO_STEP_SIGNATURE],
        loaded.signatures[ECHO_INITIAL_STATE_SIGNATURE],
        state_dim,
        model,
    )


@pytest.fixture(scope="module")
def shipped() -> Exported:
    version_dir = resolve_version_dir(MODEL_DIR, ECHO_MODEL)
    meta = json.loads((version_dir / METADATA_FILE).read_text())
    return _load(version_dir, meta["state_dim"])


@pytest.fixture(scope="module")
def fresh_lstm(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """An untrained 2-layer LSTM of 3 units: state [h0, c0, h1, c1], 12 wide."""
    keras.utils.set_random_seed(1)
    model = EchoRNN("lstm", units=3, layers=2)
    version_dir = tmp_path_factory.mktemp("echo_lstm") / "1"
    export_echo_model(model, version_dir)
    return _load(version_dir, 2 * 2 * 3, model)


@pytest.fixture(params=["shipped", "fresh_lstm"])
def exported(request: pytest.FixtureRequest) -> Exported:
    return request.getfixturevalue(request.param)


def _stream(seed: int, rows: int, time: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (rows, time)).astype(np.float32)


def _state(exported: Exported, seed: int, rows: int) -> np.ndarray:
    """A realistic non-zero state: the one reached after a random warm-up stream."""
    warm = _stream(seed, rows, 9)
    zero = np.zeros((rows, exported.state_dim), np.float32)
    return exported.run(warm, zero, [9] * rows)[1]


def test_chunked_equals_whole(exported: Exported) -> None:
    bits, state = _stream(0, 3, 150), _state(exported, 1, 3)
    whole_p, whole_state = exported.run(bits, state, [150] * 3)
    parts, s, start = [], state, 0
    for size in [1, 2, 64, 5, 17, 1, 60]:  # sums to 150
        p, s = exported.run(bits[:, start : start + size], s, [size] * 3)
        parts.append(p)
        start += size
    assert start == 150
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole_p, atol=TOL)
    np.testing.assert_allclose(s, whole_state, atol=TOL)
    assert not np.allclose(whole_state, state)  # the stream did move the state


def test_padded_batch_equals_rows_alone(exported: Exported) -> None:
    lengths = [13, 0, 20, 1, 7]
    bits, state = _stream(2, len(lengths), 20), _state(exported, 3, len(lengths))
    batch_p, batch_state = exported.run(bits, state, lengths)
    for i, n in enumerate(lengths):
        row_p, row_state = exported.run(bits[i : i + 1, :n], state[i : i + 1], [n])
        np.testing.assert_allclose(batch_p[i, :n], row_p[0], atol=TOL)
        np.testing.assert_allclose(batch_state[i], row_state[0], atol=TOL)
        assert np.all(batch_p[i, n:] == 0.0), "padded positions must give probability 0"
    np.testing.assert_array_equal(batch_state[1], state[1])  # length 0: state untouched
    # Different junk in the padded positions changes nothing.
    junk = np.where(np.arange(20) < np.array(lengths)[:, None], bits, 1.0 - bits)
    junk_p, junk_state = exported.run(junk, state, lengths)
    np.testing.assert_allclose(junk_p, batch_p, atol=TOL)
    np.testing.assert_allclose(junk_state, batch_state, atol=TOL)


@pytest.mark.parametrize("n", [1, 4])
def test_initial_state_is_zeros(exported: Exported, n: int) -> None:
    state = exported.initial_state(**{ECHO_BATCH_SIZE: tf.constant(n, tf.int32)})[ECHO_STATE]
    assert state.dtype == tf.float32
    assert state.shape == (n, exported.state_dim)
    assert not np.any(state.numpy())


def test_signature_names_dtypes_shapes(exported: Exported) -> None:
    args, kwargs = exported.step.structured_input_signature
    assert args == ()
    assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == {
        ECHO_BITS: (tf.float32, [None, None]),
        ECHO_STATE: (tf.float32, [None, exported.state_dim]),
        ECHO_LENGTHS: (tf.int32, [None]),
    }
    outputs = exported.step.structured_outputs
    assert {k: (v.dtype, v.shape.as_list()) for k, v in outputs.items()} == {
        ECHO_PROBABILITIES: (tf.float32, [None, None]),
        ECHO_STATE: (tf.float32, [None, exported.state_dim]),
    }
    args, kwargs = exported.initial_state.structured_input_signature
    assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == {
        ECHO_BATCH_SIZE: (tf.int32, [])
    }
    assert list(exported.initial_state.structured_outputs) == [ECHO_STATE]


def test_packed_state_matches_keras_rnn_reference(fresh_lstm: Exported) -> None:
    """Packing is ``[h_0, c_0, h_1, c_1, ...]``: the export equals Keras' own stacked RNN."""
    exported, model = fresh_lstm, fresh_lstm.model
    assert model is not None
    bits, state = _stream(4, 2, 12), _state(exported, 5, 2)
    probabilities, new_state = exported.run(bits, state, [12, 12])
    parts = np.split(state, len(model.state_sizes), axis=1)
    reference = keras.layers.RNN(model.cells, return_sequences=True, return_state=True)
    sequence, *states = reference(
        bits[:, :, None], initial_state=[parts[i : i + 2] for i in range(0, len(parts), 2)]
    )
    expected_p = tf.sigmoid(model.readout(sequence)[..., 0]).numpy()
    np.testing.assert_allclose(probabilities, expected_p, atol=TOL)
    np.testing.assert_allclose(new_state, np.concatenate(tf.nest.flatten(states), 1), atol=TOL)
