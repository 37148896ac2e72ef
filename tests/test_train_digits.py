"""A tiny real training run through the CLI, and the export checked in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from modelspec.contract import DIGIT_MODEL, ModelMetadata, resolve_version_dir
from modelspec.digits import scale_pixels
from training.mnist_data import FILES, MnistData

pytestmark = pytest.mark.slow

# A few hundred images, one epoch, a small LSTM: seconds, not minutes.
TINY = ["--limit-train", "256", "--validation-size", "128", "--epochs", "1", "--units", "16"]
TINY += ["--batch-size", "64", "--seed", "7"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Run in a fresh interpreter: load the export, report its signature and its outputs.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, images_path, out_dir = sys.argv[1:]
    sig = tf.saved_model.load(export_dir).signatures["serving_default"]
    _, inputs = sig.structured_input_signature
    spec = lambda s: {"shape": s.shape.as_list(), "dtype": s.dtype.name}
    info = {
        "signatures": sorted(tf.saved_model.load(export_dir).signatures),
        "inputs": {k: spec(v) for k, v in inputs.items()},
        "outputs": {k: spec(v) for k, v in sig.structured_outputs.items()},
    }
    outputs = sig(images=tf.constant(np.load(images_path)))
    np.save(f"{out_dir}/probabilities.npy", outputs["probabilities"].numpy())
    with open(f"{out_dir}/signature.json", "w") as f:
        json.dump(info, f)
    """
)


def run_python(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run ``python args...``; fail with its output unless it exits 0; return its stdout."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cli_run(
    tmp_path_factory: pytest.TempPathFactory,
    mnist_dir: Path,
    subprocess_env: dict[str, str],
    repo_root: Path,
) -> tuple[Path, str]:
    """``python -m training.train_digits`` on a tiny slice: (model dir, stdout)."""
    model_dir = tmp_path_factory.mktemp("models")
    argv = ["-m", "training.train_digits", "--data-dir", str(mnist_dir)]
    stdout = run_python([*argv, "--model-dir", str(model_dir), *TINY], subprocess_env, repo_root)
    return model_dir, stdout


def test_cli_trains_and_exports(cli_run: tuple[Path, str], mnist_dir: Path) -> None:
    model_dir, stdout = cli_run
    export_dir = resolve_version_dir(model_dir, DIGIT_MODEL)
    assert export_dir == model_dir / DIGIT_MODEL / "1"  # the first free version
    assert [p.name for p in export_dir.parent.iterdir()] == ["1"]  # no temporary folder left
    assert (export_dir / "saved_model.pb").is_file()
    assert any((export_dir / "variables").glob("variables.data-*"))
    assert re.search(r"^\d+/\d+ - .* - val_accuracy: [\d.]+", stdout, re.M)  # Keras progress

    summary = stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"test_accuracy=([\d.]+) val_accuracy=([\d.]+) epochs=1 best_epoch=1 time=\d+s "
        r"export=(.+)",
        summary,
    )
    assert match, summary
    assert Path(match[3]) == export_dir

    meta = ModelMetadata.read(export_dir)
    assert (meta.name, meta.version) == (DIGIT_MODEL, 1)
    assert "training.train_digits" in meta.training_command
    assert meta.hyperparameters["units"] == 16
    assert meta.hyperparameters["cell"] == "lstm"
    assert meta.data["source"] == str(mnist_dir.resolve())
    assert meta.data["md5"] == dict(FILES.values())
    assert (meta.data["train_size"], meta.data["val_size"], meta.data["test_size"]) == (
        256,
        128,
        10000,
    )
    metrics = meta.metrics
    assert metrics["test_accuracy"] == pytest.approx(float(match[1]), abs=1e-4)
    assert metrics["val_accuracy"] == pytest.approx(float(match[2]), abs=1e-4)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert sorted(metrics["test_per_class_accuracy"]) == [str(d) for d in range(10)]
    confusion = np.array(metrics["test_confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 10000
    assert np.trace(confusion) / 10000 == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert meta.signatures["serving_default"]["inputs"]["images"]["shape"] == [None, 28, 28]
    assert meta.training_seconds > 0

    for plot in ("training_curves.png", "confusion_matrix.png"):
        assert (export_dir / plot).read_bytes()[:8] == PNG_MAGIC, plot


def test_cli_refuses_an_existing_version(
    cli_run: tuple[Path, str],
    mnist_dir: Path,
    subprocess_env: dict[str, str],
    repo_root: Path,
) -> None:
    """A pinned version that already exists is refused before any training starts."""
    model_dir, _ = cli_run
    argv = ["-m", "training.train_digits", "--data-dir", str(mnist_dir)]
    proc = subprocess.run(
        [sys.executable, *argv, "--model-dir", str(model_dir), "--version", "1", *TINY],
        cwd=repo_root,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "already exists" in proc.stderr
    assert "Epoch" not in proc.stdout


def test_export_matches_in_memory_model(
    tmp_path: Path, mnist_dir: Path, mnist: MnistData, subprocess_env: dict[str, str]
) -> None:
    from training import train_digits

    result = train_digits.main(
        ["--data-dir", str(mnist_dir), "--model-dir", str(tmp_path), "--verbose", "0", *TINY]
    )
    images = scale_pixels(mnist.x_test[:200])
    expected = result.model.predict(images, verbose=0)
    np.save(tmp_path / "images.npy", images)

    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    run_python(
        [str(script), str(result.export_dir), str(tmp_path / "images.npy"), str(tmp_path)],
        subprocess_env,
        tmp_path,
    )
    info = json.loads((tmp_path / "signature.json").read_text())
    assert info["signatures"] == ["serving_default"]
    assert info["inputs"] == {"images": {"shape": [None, 28, 28], "dtype": "float32"}}
    assert info["outputs"] == {"probabilities": {"shape": [None, 10], "dtype": "float32"}}

    reloaded = np.load(tmp_path / "probabilities.npy")
    assert reloaded.shape == (200, 10) and reloaded.dtype == np.float32
    np.testing.assert_allclose(reloaded.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(reloaded, expected, atol=1e-5, rtol=0)
    assert not np.allclose(expected, expected[:1])  # the outputs depend on the image
