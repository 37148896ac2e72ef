"""The NumPy echo step (``modelspec.echo_numpy``) against the model it copies.

Against Keras for every cell type (rnn, lstm, gru; one and two layers; random weights and biases,
ragged lengths), and against the shipped SavedModels through ``EchoModel``, which must send the
calls it measured cheaper to NumPy and answer the same either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from app.services import models as models_module
from app.services.models import EchoModel
from modelspec import contract
from modelspec.echo import EchoRNN
from modelspec.echo_numpy import EchoStepNumpy, matches


def keras_step(model: EchoRNN):  # type: ignore[no-untyped-def]
    """What the exported ``step`` signature computes, straight from the Keras model."""

    def step(bits: np.ndarray, state: np.ndarray, lengths: np.ndarray):  # type: ignore[no-untyped-def]
        logits, new_state = model.run(bits, tf.constant(state), tf.constant(lengths))
        valid = tf.sequence_mask(lengths, bits.shape[1])
        return tf.where(valid, tf.sigmoid(logits), 0.0).numpy(), new_state.numpy()

    return step


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_numpy_step_computes_what_keras_does(cell: str, layers: int) -> None:
    model = EchoRNN(cell, units=5, layers=layers)
    rng = np.random.default_rng(layers)
    for variable in model.variables:  # biases too (Keras starts them at zero)
        variable.assign(rng.normal(0, 0.7, variable.shape).astype(np.float32))
    twin = EchoStepNumpy(cell, layers, 5, {v.path: v.numpy() for v in model.variables})
    assert twin.state_dim == model.state_dim
    for seed in range(3):
        worst = matches(twin, keras_step(model), atol=1e-5, seed=seed)
        assert worst is not None, f"{cell} x{layers} differs from Keras by more than 1e-5"


def test_numpy_step_refuses_what_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="cell"):
        EchoStepNumpy("transformer", 1, 4, {})
    with pytest.raises(KeyError):
        EchoStepNumpy("gru", 1, 4, {"rnn_0/kernel": np.zeros((1, 4))})


@pytest.fixture(scope="module", params=[1, 2])
def shipped(request: pytest.FixtureRequest, repo_root: Path) -> EchoModel:
    """A shipped echo_rnn version (1: rnn, 2: three lstm layers), loaded and XLA-compiled."""
    path = contract.resolve_version_dir(repo_root / "models", contract.ECHO_MODEL, request.param)
    model = EchoModel(contract.ECHO_MODEL, int(path.name), path, contract.ModelMetadata.read(path))
    model.load(EchoModel.REQUIRED)
    model.compile_xla(8)
    return model


def test_shipped_models_answer_the_same_through_numpy(shipped: EchoModel) -> None:
    assert shipped.use_numpy_step(8) is True  # both shipped cells are cheaper in NumPy at 1 bit
    twin = shipped._numpy_step
    assert twin is not None
    used: list[tuple[int, int]] = []

    def counting(bits: np.ndarray, state: np.ndarray, lengths: np.ndarray):  # type: ignore[no-untyped-def]
        used.append(bits.shape)
        return twin(bits, state, lengths)

    shipped._numpy_step = counting  # type: ignore[assignment]
    rng = np.random.default_rng(4)
    try:
        for rows, steps in ((1, 1), (3, 1), (8, 1), (5, 32), (8, 32)):
            bits = rng.integers(0, 2, (rows, steps)).astype(np.float32)
            state = rng.normal(0, 0.5, (rows, shipped.state_dim)).astype(np.float32)
            lengths = rng.integers(1, steps + 1, rows).astype(np.int32)
            got_p, got_s = shipped.infer(bits, state, lengths)
            want_p, want_s = shipped.step(bits, state, lengths)
            np.testing.assert_allclose(got_p, want_p, atol=1e-5)
            np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    finally:
        shipped._numpy_step = twin
    assert (1, 1) in used and (8, 1) in used  # one bit a row: NumPy
    assert (8, 32) not in used  # 32 steps of 8 rows: TensorFlow's one call is cheaper


def test_a_numpy_step_that_disagrees_is_not_used(
    shipped: EchoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = models_module.weights_by_name

    def skewed(variables: list) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
        return {name: w * 1.01 for name, w in real(variables).items()}

    monkeypatch.setattr(models_module, "weights_by_name", skewed)
    shipped._numpy_step = None
    assert shipped.use_numpy_step(8) is False
    assert shipped._numpy_step is None
    monkeypatch.setitem(shipped.metadata.hyperparameters, "cell", "gru")  # not what was saved
    assert shipped.use_numpy_step(8) is False
    assert shipped._numpy_step is None
