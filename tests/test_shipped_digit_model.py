"""The shipped ``mnist_lstm`` SavedModel on the full real 10,000-image test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_MODEL,
    DIGIT_OUTPUT,
    DIGIT_SIGNATURE,
    ModelMetadata,
    resolve_version_dir,
)
from modelspec.digits import scale_pixels
from training.mnist_data import FILES, MnistData

MIN_TEST_ACCURACY = 0.990


@pytest.fixture(scope="module")
def shipped(repo_root: Path) -> Path:
    return resolve_version_dir(repo_root / "models", DIGIT_MODEL)


@pytest.fixture(scope="module")
def test_probabilities(shipped: Path, mnist: MnistData) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(shipped)).signatures[DIGIT_SIGNATURE]
    images = scale_pixels(mnist.x_test)
    batches = [
        serve(**{DIGIT_INPUT: tf.constant(images[i : i + 2000])})[DIGIT_OUTPUT].numpy()
        for i in range(0, len(images), 2000)
    ]
    return np.concatenate(batches)


def test_shipped_model_accuracy(test_probabilities: np.ndarray, mnist: MnistData) -> None:
    assert test_probabilities.shape == (10000, 10)
    np.testing.assert_allclose(test_probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((test_probabilities.argmax(axis=1) == mnist.y_test).mean())
    assert accuracy >= MIN_TEST_ACCURACY, f"test accuracy {accuracy:.4f} < {MIN_TEST_ACCURACY}"


def test_metadata_matches_measurement(
    shipped: Path, test_probabilities: np.ndarray, mnist: MnistData
) -> None:
    meta = ModelMetadata.read(shipped)
    predicted = test_probabilities.argmax(axis=1)
    accuracy = float((predicted == mnist.y_test).mean())
    assert meta.metrics["test_accuracy"] == pytest.approx(accuracy, abs=0.0005)
    per_class = {str(d): float((predicted[mnist.y_test == d] == d).mean()) for d in range(10)}
    assert meta.metrics["test_per_class_accuracy"] == pytest.approx(per_class, abs=0.002)
    assert meta.metrics["val_accuracy"] >= MIN_TEST_ACCURACY - 0.01
    assert meta.data["md5"] == dict(FILES.values())
    assert meta.data["test_size"] == 10000
    assert meta.hyperparameters["cell"] == "lstm" and meta.hyperparameters["units"] == 128


def test_shipped_model_is_small(shipped: Path) -> None:
    """Only the model's weights are saved (LSTM-128 + dense: ~81k floats), no optimizer slots."""
    size = sum(f.stat().st_size for f in (shipped / "variables").iterdir())
    assert size < 500_000, f"variables take {size} bytes"
