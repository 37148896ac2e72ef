"""The MNIST digit classifier: input scaling, the Keras model, and its SavedModel export.

Each 28×28 image is read row by row as 28 time steps of 28 pixels by a recurrent layer; a dense
softmax over the 10 digits reads the last step's output.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_OUTPUT,
    DIGIT_SIGNATURE,
    IMAGE_SIZE,
    NUM_CLASSES,
)

RECURRENT_LAYERS = {
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
    "rnn": keras.layers.SimpleRNN,
}


def scale_pixels(images: np.ndarray, pixel_max: float = 255.0) -> np.ndarray:
    """MNIST-style pixels (0 = background, ``pixel_max`` = ink) → float32 in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / np.float32(pixel_max)).astype(np.float32)


def build_digit_model(cell: str = "lstm", units: int = 128, layers: int = 1) -> keras.Model:
    """Rows as time steps → ``layers`` stacked recurrent layers → dense softmax."""
    if cell not in RECURRENT_LAYERS:
        raise ValueError(f"cell must be one of {sorted(RECURRENT_LAYERS)}, got {cell!r}")
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE), name=DIGIT_INPUT)
    x = inputs
    for i in range(layers):
        x = RECURRENT_LAYERS[cell](units, return_sequences=i < layers - 1, name=f"{cell}_{i}")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name=DIGIT_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="mnist_rnn")


def export_digit_model(model: keras.Model, version_dir: Path) -> None:
    """Save ``model`` with the fixed ``serving_default`` signature (images → probabilities).

    Only the model's weights are tracked (no optimizer slots, no second Keras endpoint).
    """
    module = tf.Module()
    module.model_variables = list(model.variables)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32, name=DIGIT_INPUT)
        ]
    )
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {DIGIT_OUTPUT: model(images, training=False)}

    module.serve = serve
    tf.saved_model.save(module, str(version_dir), signatures={DIGIT_SIGNATURE: serve})
