"""End-to-end: the echo training CLI on a tiny budget, and export fidelity across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from modelspec.contract import ECHO_MODEL, METADATA_FILE
from modelspec.echo import export_echo_model
from training.train_echo import EchoConfig, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cli_trains_exports_and_documents(tmp_path: Path) -> None:
    # 3 epochs x 100 windows of 15 steps = 300 training steps.
    flags = "--series-length 7500 --epochs 3 --seed 11 --val-length 1000 --eval-length 3000"
    result = _python("-m", "training.train_echo", *flags.split(), "--model-dir", str(tmp_path))
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 3, result.stdout
    losses = [float(line.split("loss ")[1].split()[0]) for line in epoch_lines]
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"

    out = tmp_path / ECHO_MODEL / "1"
    assert (out / "saved_model.pb").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["1"]  # published: no temporary folder left
    for png in ("training_curves.png", "echo_streams.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["name"], meta["version"]) == (ECHO_MODEL, 1)
    assert (meta["state_dim"], meta["echo_step"]) == (4, 3)
    assert "training.train_echo" in meta["training_command"]
    hp = meta["hyperparameters"]
    assert {k: hp[k] for k in ("cell", "layers", "state_size", "series_length", "seed")} == {
        "cell": "rnn",
        "layers": 1,
        "state_size": 4,
        "series_length": 7500,
        "seed": 11,
    }
    assert {"window", "batch_size", "epochs", "optimizer", "learning_rate"} <= hp.keys()
    metrics = meta["metrics"]
    assert metrics["stream_length"] == 3000 and metrics["chunk_length_range"] == [1, 64]
    assert metrics["final_accuracy"] > 0.9, metrics  # 300 steps suffice to learn most echoes
    assert metrics["stream_accuracy"] > 0.9, metrics
    assert f"{100 * metrics['stream_accuracy']:.4f} %" in result.stdout.splitlines()[-1]
    assert set(meta["signatures"]) == {"step", "initial_state"}
    assert meta["training_seconds"] > 0


LOAD_AND_RUN = """
import sys, numpy as np, tensorflow as tf
step = tf.saved_model.load(sys.argv[1]).signatures["step"]
inp = np.load(sys.argv[2])
out = step(bits=tf.constant(inp["bits"]), state=tf.constant(inp["state"]),
           lengths=tf.constant(inp["lengths"]))
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


@pytest.mark.slow
def test_export_in_fresh_process_matches_in_memory_model(tmp_path: Path) -> None:
    config = EchoConfig(cell="lstm", layers=2, series_length=1500, epochs=1, val_length=100)
    model = train(config, log=lambda _: None).model
    export_echo_model(model, tmp_path / "1")

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, (3, 24)).astype(np.float32)
    state = rng.normal(size=(3, model.state_dim)).astype(np.float32)
    lengths = np.array([24, 9, 0], np.int32)
    logits, expected_state = model.run(bits, state, lengths)
    mask = np.arange(24) < lengths[:, None]
    expected_p = np.where(mask, tf.sigmoid(logits).numpy(), 0.0)

    np.savez(tmp_path / "in.npz", bits=bits, state=state, lengths=lengths)
    _python("-c", LOAD_AND_RUN, str(tmp_path / "1"), str(tmp_path / "in.npz"), str(tmp_path / "o"))
    got = np.load(tmp_path / "o.npz")
    np.testing.assert_allclose(got["probabilities"], expected_p, atol=1e-5)
    np.testing.assert_allclose(got["state"], expected_state.numpy(), atol=1e-5)
    assert not np.allclose(got["state"][0], state[0])  # the model did something
