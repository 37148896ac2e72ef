"""Loading one SavedModel version, checking it, calling it, and unloading it.

The thin wrappers below take and return NumPy arrays; which versions are loaded is
``app.services.model_repository``'s business, batching and concurrency the batchers'.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from modelspec.contract import (
    DIGIT_INPUT,
    DIGIT_OUTPUT,
    DIGIT_SIGNATURE,
    ECHO_BATCH_SIZE,
    ECHO_BITS,
    ECHO_INITIAL_STATE_SIGNATURE,
    ECHO_LENGTHS,
    ECHO_PROBABILITIES,
    ECHO_STATE,
    ECHO_STEP_SIGNATURE,
    IMAGE_SIZE,
    NUM_CLASSES,
    ModelMetadata,
    ModelNotFoundError,
)
from modelspec.echo_numpy import EchoStepNumpy, matches, weights_by_name

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model folder exists but does not hold a usable SavedModel."""


@dataclass
class ServedModel:
    """One loaded model version and what the API reports about it."""

    name: str
    version: int
    path: Path
    metadata: ModelMetadata
    signatures: dict[str, Any] = field(default_factory=dict)
    _loaded: Any = None

    @property
    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def describe(self) -> dict[str, Any]:
        """Name, version, signature specs and the metrics recorded at training time."""
        sigs = {}
        for sig_name, fn in self.signatures.items():
            inputs = fn.structured_input_signature[1]
            outputs = fn.structured_outputs
            sigs[sig_name] = {
                "inputs": {k: _spec(v) for k, v in inputs.items()},
                "outputs": {k: _spec(v) for k, v in outputs.items()},
            }
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "signatures": sigs,
            "loaded": self._loaded is not None,
            "metrics": self.metadata.metrics,
            "created_at": self.metadata.created_at,
        }

    def load(self, required: dict[str, set[str]]) -> None:
        """Load the SavedModel and check that it offers the ``required`` signatures/inputs."""
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:  # TF raises many types for a broken SavedModel
            raise ModelLoadError(f"cannot load SavedModel {self.path}: {exc}") from exc
        for sig_name, inputs in required.items():
            fn = self._loaded.signatures.get(sig_name)
            if fn is None:
                raise ModelLoadError(f"{self.path} has no signature {sig_name!r}")
            missing = inputs - set(fn.structured_input_signature[1])
            if missing:
                raise ModelLoadError(f"{self.path} signature {sig_name!r} lacks inputs {missing}")
            self.signatures[sig_name] = fn

    def unload(self) -> None:
        """Drop every reference to the loaded SavedModel so that its memory can be freed."""
        self._loaded = None
        self.signatures = {}


def _spec(spec: tf.TensorSpec) -> dict[str, Any]:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


class DigitModel(ServedModel):
    """``images`` float32 [n, 28, 28] in [0, 1] → ``probabilities`` float32 [n, 10].

    :meth:`infer` runs the XLA-compiled function once :meth:`compile_xla` built it: the
    SavedModel's signature in a ``jit_compile`` function runs 1.5–3× faster on CPU at every batch
    size and on one thread. XLA compiles once per input shape, so calls are padded with zero
    images to the next *bucket* (1, 2, 4 … then the largest call; coarser steps waste too much:
    under load batches settle at about half the clients and a 33-row batch would compute 64).
    ``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`` lets later starts reuse them.
    """

    REQUIRED: ClassVar[dict[str, set[str]]] = {DIGIT_SIGNATURE: {DIGIT_INPUT}}
    _compiled: Any = None  # the XLA concrete function, once built
    buckets: tuple[int, ...] = ()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The plain SavedModel signature."""
        out = self.signatures[DIGIT_SIGNATURE](**{DIGIT_INPUT: tf.constant(images, tf.float32)})
        return out[DIGIT_OUTPUT].numpy()

    def infer(self, images: np.ndarray) -> np.ndarray:
        """The model on ``images``: XLA-compiled and padded to the next bucket, if compiled."""
        n = len(images)
        i = bisect.bisect_left(self.buckets, n)
        if self._compiled is None or i == len(self.buckets):
            return self.predict(images)
        size = self.buckets[i]
        if size != n:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.float32)])
        return self._compiled(tf.constant(images)).numpy()[:n]

    def compile_xla(self, largest: int) -> None:
        """Build the XLA function and compile it for every bucket up to ``largest`` rows
        (blocking, ~0.4–1 s per bucket: call it off the event loop, before serving)."""
        buckets = [1 << i for i in range(largest.bit_length()) if 1 << i < largest] + [largest]
        signature = self.signatures[DIGIT_SIGNATURE]
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32)

        @tf.function(input_signature=[spec], jit_compile=True)
        def compiled(images: tf.Tensor) -> tf.Tensor:
            return signature(**{DIGIT_INPUT: images})[DIGIT_OUTPUT]

        concrete = compiled.get_concrete_function()  # calling it skips ~0.4 ms of dispatch
        start = time.monotonic()

        def warm(size: int) -> None:
            concrete(tf.zeros((size, IMAGE_SIZE, IMAGE_SIZE), tf.float32))

        # Compiling is single-threaded C++ that releases the GIL: use every core for it.
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(warm, reversed(buckets)))  # the slowest (largest) first
        self._compiled, self.buckets = concrete, tuple(buckets)
        log.info(
            "digit model compiled with XLA",
            extra={"batch_sizes": buckets, "seconds": round(time.monotonic() - start, 2)},
        )

    def warm_up(self) -> None:
        """A call on a blank and a random batch: the output's shape, finite, sums to 1."""
        images = np.random.default_rng(0).random((4, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        images[0] = 0
        probs = self.predict(images)
        if probs.shape != (4, NUM_CLASSES):
            raise ModelLoadError(f"{self.path}: unexpected output shape {probs.shape}")
        if not np.isfinite(probs).all() or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
            raise ModelLoadError(f"{self.path}: the warm-up outputs are not probabilities")

    def unload(self) -> None:
        super().unload()
        self._compiled, self.buckets = None, ()


class EchoModel(ServedModel):
    """The echo RNN's ``step`` over a batch of sessions, state packed as [n, state_dim].

    :meth:`infer` runs the step XLA-compiled once :meth:`compile_xla` built it: a call then
    costs ~0.2 ms of CPU instead of ~0.45 ms for one bit per row, and 8x less for 32 bits (the
    plain signature runs the time loop op by op). XLA compiles once per input shape, so a call
    is padded to powers of two in rows (zero rows of length 0, which change nothing) and in
    time steps (positions past a row's ``lengths`` leave it as it is): each new shape compiles
    once, ~0.1-0.2 s, on the model thread.
    """

    REQUIRED: ClassVar[dict[str, set[str]]] = {
        ECHO_STEP_SIGNATURE: {ECHO_BITS, ECHO_STATE, ECHO_LENGTHS},
        ECHO_INITIAL_STATE_SIGNATURE: {ECHO_BATCH_SIZE},
    }
    _compiled: Any = None  # the XLA concrete function, once built
    _numpy_step: EchoStepNumpy | None = None  # once use_numpy_step() found it good and cheaper
    _numpy_costs: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def state_dim(self) -> int:
        return int(self.metadata.model_extra["state_dim"])  # type: ignore[index]

    @property
    def echo_step(self) -> int:
        return int(self.metadata.model_extra["echo_step"])  # type: ignore[index]

    def initial_state(self, batch_size: int) -> np.ndarray:
        fn = self.signatures[ECHO_INITIAL_STATE_SIGNATURE]
        return fn(**{ECHO_BATCH_SIZE: tf.constant(batch_size, tf.int32)})[ECHO_STATE].numpy()

    def step(
        self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance each row by its first ``lengths`` bits → (probabilities [n, t], state)."""
        out = self.signatures[ECHO_STEP_SIGNATURE](
            **{
                ECHO_BITS: tf.constant(bits, tf.float32),
                ECHO_STATE: tf.constant(state, tf.float32),
                ECHO_LENGTHS: tf.constant(lengths, tf.int32),
            }
        )
        return out[ECHO_PROBABILITIES].numpy(), out[ECHO_STATE].numpy()

    @staticmethod
    def padded_shape(rows: int, steps: int) -> tuple[int, int]:
        """The shape :meth:`infer` runs a ``[rows, steps]`` call at: powers of two."""
        return _next_power_of_two(rows), _next_power_of_two(steps)

    def infer(
        self, bits: np.ndarray, state: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`step`: in NumPy where :meth:`use_numpy_step` measured that cheaper, else
        XLA-compiled and padded to power-of-two shapes, if compiled."""
        numpy_step = self._numpy_step
        if numpy_step is not None and self.numpy_takes(*bits.shape):
            return numpy_step(bits, state, lengths)
        if self._compiled is None:
            return self.step(bits, state, lengths)
        n, t = bits.shape
        rows, steps = self.padded_shape(n, t)
        if (rows, steps) != (n, t):
            padded = np.zeros((rows, steps), np.float32)
            padded[:n, :t] = bits
            bits = padded
            state = np.concatenate([state, np.zeros((rows - n, state.shape[1]), np.float32)])
            lengths = np.concatenate([lengths, np.zeros(rows - n, np.int32)])
        probs, new_state = self._compiled(
            tf.constant(bits, tf.float32), tf.constant(state, tf.float32), tf.constant(lengths)
        )
        return probs.numpy()[:n, :t], new_state.numpy()[:n]

    def compile_xla(self, largest: int) -> None:
        """Build the XLA step and compile it for one bit per row at every row bucket up to
        ``largest`` (blocking, ~0.1-0.2 s each: call it off the event loop, before serving)."""
        signature = self.signatures[ECHO_STEP_SIGNATURE]
        specs = [
            tf.TensorSpec([None, None], tf.float32),
            tf.TensorSpec([None, self.state_dim], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ]

        @tf.function(input_signature=specs, jit_compile=True)
        def compiled(bits: tf.Tensor, state: tf.Tensor, lengths: tf.Tensor) -> Any:
            out = signature(**{ECHO_BITS: bits, ECHO_STATE: state, ECHO_LENGTHS: lengths})
            return out[ECHO_PROBABILITIES], out[ECHO_STATE]

        concrete = compiled.get_concrete_function()
        start = time.monotonic()

        def warm(rows: int) -> None:
            concrete(tf.zeros((rows, 1)), tf.zeros((rows, self.state_dim)), tf.ones(rows, tf.int32))

        sizes = [1 << i for i in range(_next_power_of_two(largest).bit_length())]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(warm, reversed(sizes)))
        self._compiled = concrete
        log.info(
            "echo model compiled with XLA",
            extra={"rows": sizes, "seconds": round(time.monotonic() - start, 2)},
        )

    def numpy_takes(self, rows: int, steps: int) -> bool:
        """Whether :meth:`infer` runs a ``[rows, steps]`` call in NumPy (see
        :meth:`use_numpy_step`)."""
        if self._numpy_step is None:
            return False
        per_row_step, per_step, per_row_call, per_call = self._numpy_costs
        return steps * (per_step + per_row_step * rows) < per_call + per_row_call * rows

    def use_numpy_step(self, largest: int) -> bool:
        """Run calls in NumPy (``modelspec.echo_numpy``) where that is cheaper than TensorFlow.

        The NumPy step is built from ``metadata.json``'s ``cell``, ``layers`` and
        ``state_size`` and the SavedModel's variables, and used only if it matches the
        signature on random inputs (1e-5). Then both are timed on this machine, one bit per row
        at 1 row and at ``min(largest, 1024)`` rows: a call of ``[n, t]`` goes to NumPy when
        ``t`` NumPy steps of ``n`` rows cost less than one TensorFlow call of ``n`` rows (the
        TensorFlow call's own growth with ``t`` is left out, which only errs towards
        TensorFlow). Blocking, ~0.1 s: call it off the event loop, after :meth:`compile_xla`.
        Returns whether NumPy takes any calls.
        """
        hyper = self.metadata.hyperparameters
        try:
            twin = EchoStepNumpy(
                str(hyper["cell"]),
                int(hyper["layers"]),
                int(hyper["state_size"]),
                weights_by_name(list(self._loaded.model_variables)),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.info("echo model has no NumPy step", extra={"reason": repr(exc)})
            return False
        if twin.state_dim != self.state_dim or matches(twin, self.step) is None:
            log.warning("echo model's NumPy step disagrees with its SavedModel; not used")
            return False
        rows = max(2, min(largest, 1024))
        numpy_1, numpy_n = (_cpu_per_call(twin, r, self.state_dim) for r in (1, rows))
        tf_1, tf_n = (_cpu_per_call(self.infer, r, self.state_dim) for r in (1, rows))
        self._numpy_costs = (
            max(0.0, (numpy_n - numpy_1) / (rows - 1)),
            numpy_1,
            max(0.0, (tf_n - tf_1) / (rows - 1)),
            tf_1,
        )
        self._numpy_step = twin
        cheaper = numpy_1 < tf_1 or numpy_n < tf_n
        log.info(
            "echo model's NumPy step measured",
            extra={
                "numpy_us": [round(numpy_1 * 1e6), round(numpy_n * 1e6)],
                "tensorflow_us": [round(tf_1 * 1e6), round(tf_n * 1e6)],
                "rows": [1, rows],
                "used_for_small_calls": cheaper,
            },
        )
        return cheaper

    def unload(self) -> None:
        super().unload()
        self._compiled = None
        self._numpy_step = None

    def warm_up(self) -> None:
        """Two sessions, 8 steps: state and output shapes, finite probabilities."""
        for extra in ("state_dim", "echo_step"):
            if extra not in (self.metadata.model_extra or {}):
                raise ModelLoadError(f"{self.path}/metadata.json lacks {extra!r}")
        state = self.initial_state(2)
        if state.shape != (2, self.state_dim):
            raise ModelLoadError(
                f"{self.path}: state shape {state.shape} != metadata state_dim {self.state_dim}"
            )
        bits = np.random.default_rng(0).integers(0, 2, (2, 8)).astype(np.float32)
        probs, new_state = self.step(bits, state, np.array([8, 5], np.int32))
        if probs.shape != (2, 8) or new_state.shape != state.shape:
            raise ModelLoadError(
                f"{self.path}: step returned shapes {probs.shape}, {new_state.shape}"
            )
        if not (np.isfinite(probs).all() and np.isfinite(new_state).all()):
            raise ModelLoadError(f"{self.path}: the warm-up outputs are not finite")


def _cpu_per_call(call: Any, rows: int, state_dim: int, repeats: int = 3) -> float:
    """The least CPU seconds of the calling thread per call of one bit on ``rows`` rows (work
    TensorFlow hands to its own threads is not counted, which only errs towards TensorFlow)."""
    bits = np.ones((rows, 1), np.float32)
    state = np.zeros((rows, state_dim), np.float32)
    lengths = np.ones(rows, np.int32)
    calls = max(3, 200 // rows)
    call(bits, state, lengths)  # anything lazy happens here, not in the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            call(bits, state, lengths)
        best = min(best, (time.thread_time() - start) / calls)
    return best


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def compute_device() -> str:
    """What TensorFlow computes on: the first GPU's name, or ``CPU``."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU ({details.get('device_name', gpus[0].name)})"


def read_metadata(path: Path) -> ModelMetadata:
    """A version folder's ``metadata.json``; ``ModelLoadError`` if it is not valid."""
    try:
        return ModelMetadata.read(path)
    except ModelNotFoundError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"invalid {path}/metadata.json: {exc}") from exc
