"""The echo RNN: stacked recurrent cells with an explicit, packed state, and its export.

The state of every layer (``h``, plus ``c`` for LSTM) is packed side by side into one float32
``[batch, state_dim]`` tensor, so a server can keep one row per session and stack rows of many
sessions into a single call. :meth:`EchoRNN.run` advances a batch of rows of different valid
lengths at once; padded positions leave a row's state untouched, like ``sequence_length`` in
TF1's ``dynamic_rnn``. Training and the exported ``step`` signature both use it.
"""

from __future__ import annotations

from pathlib import Path

import keras
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

CELLS = {
    "rnn": keras.layers.SimpleRNNCell,
    "lstm": keras.layers.LSTMCell,
    "gru": keras.layers.GRUCell,
}


def make_echo_series(
    rng: np.random.Generator, streams: int, length: int, echo_step: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random bit streams and their targets: each input delayed by ``echo_step`` (first ones 0)."""
    x = rng.integers(0, 2, size=(streams, length)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, echo_step:] = x[:, :-echo_step]
    return x, y


class EchoRNN:
    """``layers`` stacked ``cell`` cells of ``units`` each, and a sigmoid readout of the top one."""

    def __init__(self, cell: str = "rnn", units: int = 4, layers: int = 1) -> None:
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.cell_type, self.units, self.num_layers = cell, units, layers
        self.cells = [CELLS[cell](units, name=f"{cell}_{i}") for i in range(layers)]
        self.readout = keras.layers.Dense(1, name="readout")
        per_layer = 2 if cell == "lstm" else 1
        self.state_sizes = [units] * (per_layer * layers)
        self.state_dim = sum(self.state_sizes)
        # Build every weight now so that variables exist before tracing or saving.
        self.step_logits(tf.zeros([1, 1]), tf.zeros([1, self.state_dim]))

    @property
    def variables(self) -> list[tf.Variable]:
        return [v for layer in [*self.cells, self.readout] for v in layer.variables]

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return [v for layer in [*self.cells, self.readout] for v in layer.trainable_variables]

    def zero_state(self, batch_size: int | tf.Tensor) -> tf.Tensor:
        return tf.zeros(tf.stack([batch_size, self.state_dim]), tf.float32)

    def step_logits(self, x_t: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One time step: input ``[batch, 1]`` and packed state → logit ``[batch]``, new state."""
        parts = tf.split(state, self.state_sizes, axis=1)
        per_layer = len(parts) // self.num_layers
        new_parts: list[tf.Tensor] = []
        h = x_t
        for i, cell in enumerate(self.cells):
            layer_state = parts[i * per_layer : (i + 1) * per_layer]
            h, new_state = cell(h, layer_state if per_layer > 1 else layer_state[0])
            new_parts.extend(new_state if isinstance(new_state, list | tuple) else [new_state])
        return tf.squeeze(self.readout(h), axis=1), tf.concat(new_parts, axis=1)

    def run(
        self, bits: tf.Tensor, state: tf.Tensor, lengths: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Advance each row over its first ``lengths`` bits.

        Returns logits ``[batch, time]`` (0 at padded positions) and the state after each row's
        last valid step.
        """
        bits = tf.convert_to_tensor(bits, tf.float32)
        time = tf.shape(bits)[1]
        inputs = tf.transpose(bits)[:, :, tf.newaxis]  # [time, batch, 1]
        valid = tf.transpose(tf.sequence_mask(lengths, time))[:, :, tf.newaxis]  # [time, batch, 1]
        logits = tf.TensorArray(tf.float32, size=time)

        def body(t: tf.Tensor, state: tf.Tensor, logits: tf.TensorArray):
            logit, new_state = self.step_logits(inputs[t], state)
            keep = valid[t]
            state = tf.where(keep, new_state, state)
            return t + 1, state, logits.write(t, tf.where(keep[:, 0], logit, 0.0))

        _, state, logits = tf.while_loop(
            lambda t, *_: t < time, body, (tf.constant(0), state, logits)
        )
        # An empty TensorArray cannot be stacked when the batch size is unknown (as in the
        # exported signature), so an empty input gets its [batch, 0] logits directly.
        logits = tf.cond(
            time > 0, lambda: tf.transpose(logits.stack()), lambda: tf.zeros_like(bits)
        )
        return logits, state


def export_echo_model(model: EchoRNN, version_dir: Path) -> None:
    """Save ``model`` with the fixed ``step`` and ``initial_state`` signatures."""
    module = tf.Module()
    module.model_variables = model.variables  # the EchoRNN object itself stays untracked

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.float32, name=ECHO_BITS),
            tf.TensorSpec([None, model.state_dim], tf.float32, name=ECHO_STATE),
            tf.TensorSpec([None], tf.int32, name=ECHO_LENGTHS),
        ]
    )
    def step(bits: tf.Tensor, state: tf.Tensor, lengths: tf.Tensor) -> dict[str, tf.Tensor]:
        logits, new_state = model.run(bits, state, lengths)
        valid = tf.sequence_mask(lengths, tf.shape(bits)[1])
        probabilities = tf.where(valid, tf.sigmoid(logits), 0.0)
        return {ECHO_PROBABILITIES: probabilities, ECHO_STATE: new_state}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name=ECHO_BATCH_SIZE)])
    def initial_state(batch_size: tf.Tensor) -> dict[str, tf.Tensor]:
        return {ECHO_STATE: model.zero_state(batch_size)}

    module.step, module.initial_state = step, initial_state
    tf.saved_model.save(
        module,
        str(version_dir),
        signatures={ECHO_STEP_SIGNATURE: step, ECHO_INITIAL_STATE_SIGNATURE: initial_state},
    )
