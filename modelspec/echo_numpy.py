"""The exported echo ``step`` signature in NumPy, for calls too small for TensorFlow's dispatch.

Why: a call of the XLA-compiled step costs ~0.15-0.2 ms of CPU however small it is (TensorFlow's
eager dispatch, tensor conversions); one session's one-bit message under open-loop traffic is
exactly such a call, so at a few thousand messages a second that fixed cost was most of the
server's CPU. The same step in NumPy costs ~0.01-0.05 ms for a few rows (``python -m
bench.echo_step``). It computes what :meth:`modelspec.echo.EchoRNN.run` does, with the
formulas of Keras 3's ``SimpleRNNCell``, ``LSTMCell`` and ``GRUCell`` (``reset_after=True``)
and their default activations, from the variables the SavedModel saved.

The serving side builds it only after checking it against the SavedModel's own signature
(:func:`matches`), and uses it for the call shapes it measured to be cheaper
(``app.services.models.EchoModel``); ``tests/test_echo_numpy.py`` ties it to all three cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

CELL_TYPES = ("rnn", "lstm", "gru")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a large positive float32 overflows to inf, which gives the right limit (0) here
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


class EchoStepNumpy:
    """``step(bits [n, t], state [n, d], lengths [n])`` → ``(probabilities [n, t], state)``,
    as the exported signature computes it (float32)."""

    def __init__(
        self, cell: str, layers: int, units: int, weights: Mapping[str, np.ndarray]
    ) -> None:
        if cell not in CELL_TYPES:
            raise ValueError(f"cell must be one of {CELL_TYPES}, got {cell!r}")
        self.cell, self.layers, self.units = cell, layers, units
        self.per_layer = 2 if cell == "lstm" else 1
        self.state_dim = units * self.per_layer * layers
        self._cell: Callable[[np.ndarray, list[np.ndarray], int], list[np.ndarray]] = {
            "rnn": self._rnn,
            "lstm": self._lstm,
            "gru": self._gru,
        }[cell]
        self._weights = [
            tuple(
                _f32(weights[f"{cell}_{i}/{name}"])
                for name in ("kernel", "recurrent_kernel", "bias")
            )
            for i in range(layers)
        ]
        self.readout_kernel = _f32(weights["readout/kernel"])  # [units, 1]
        self.readout_bias = _f32(weights["readout/bias"])  # [1]

    def __call__(
        self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n, t = bits.shape
        u, per = self.units, self.per_layer
        parts = [state[:, j * u : (j + 1) * u].astype(np.float32) for j in range(per * self.layers)]
        probs = np.zeros((n, t), np.float32)
        for s in range(t):
            valid = lengths > s
            if not valid.any():
                break
            every = bool(valid.all())
            h = bits[:, s : s + 1].astype(np.float32, copy=False)
            new_parts: list[np.ndarray] = []
            for i in range(self.layers):
                out = self._cell(h, parts[i * per : (i + 1) * per], i)
                new_parts.extend(out)
                h = out[0]
            logit = h @ self.readout_kernel + self.readout_bias
            p = _sigmoid(logit[:, 0])
            if every:
                parts = new_parts
                probs[:, s] = p
            else:
                keep = valid[:, None]
                parts = [
                    np.where(keep, new, old) for new, old in zip(new_parts, parts, strict=True)
                ]
                probs[:, s] = np.where(valid, p, np.float32(0))
        return probs, np.concatenate(parts, axis=1)

    def _rnn(self, x: np.ndarray, layer: list[np.ndarray], i: int) -> list[np.ndarray]:
        kernel, recurrent, bias = self._weights[i]
        return [np.tanh(x @ kernel + bias + layer[0] @ recurrent)]

    def _lstm(self, x: np.ndarray, layer: list[np.ndarray], i: int) -> list[np.ndarray]:
        kernel, recurrent, bias = self._weights[i]
        h_prev, c_prev = layer
        z = x @ kernel + h_prev @ recurrent + bias
        u = self.units
        gate_i = _sigmoid(z[:, :u])
        gate_f = _sigmoid(z[:, u : 2 * u])
        c = gate_f * c_prev + gate_i * np.tanh(z[:, 2 * u : 3 * u])
        gate_o = _sigmoid(z[:, 3 * u :])
        return [gate_o * np.tanh(c), c]

    def _gru(self, x: np.ndarray, layer: list[np.ndarray], i: int) -> list[np.ndarray]:
        kernel, recurrent, bias = self._weights[i]  # bias [2, 3u]: input, recurrent
        (h_prev,) = layer
        u = self.units
        xs = x @ kernel + bias[0]
        rs = h_prev @ recurrent + bias[1]
        z = _sigmoid(xs[:, :u] + rs[:, :u])
        r = _sigmoid(xs[:, u : 2 * u] + rs[:, u : 2 * u])
        hh = np.tanh(xs[:, 2 * u :] + r * rs[:, 2 * u :])
        return [z * h_prev + (1 - z) * hh]


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32)


def weights_by_name(variables: list) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    """A SavedModel's restored variables as ``{"rnn_0/kernel": array, ...}`` (``:0`` dropped)."""
    return {v.name.rsplit(":", 1)[0]: v.numpy() for v in variables}


def matches(
    twin: EchoStepNumpy,
    reference: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    atol: float = 1e-5,
    seed: int = 0,
) -> float | None:
    """Compare ``twin`` with ``reference`` (the SavedModel's step) on random bits, states and
    ragged lengths; the largest difference, or ``None`` if any exceeds ``atol``."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for rows, steps in ((1, 1), (3, 1), (5, 7), (16, 3)):
        bits = rng.integers(0, 2, (rows, steps)).astype(np.float32)
        state = rng.normal(0, 0.5, (rows, twin.state_dim)).astype(np.float32)
        lengths = rng.integers(0, steps + 1, rows).astype(np.int32)
        lengths[0] = steps
        want_p, want_s = reference(bits, state, lengths)
        got_p, got_s = twin(bits, state, lengths)
        if got_p.shape != want_p.shape or got_s.shape != want_s.shape:
            return None
        worst = max(worst, float(np.abs(got_p - want_p).max()), float(np.abs(got_s - want_s).max()))
    return worst if worst <= atol else None
