"""Publishing a model version is atomic, and the loader serves only complete version folders.

Real tiny exports: one echo RNN trained for a few windows (module fixture), published through the
training script's own ``main`` (its training step is replaced by the fixture's result, so the
export, evaluation, plots and metadata all run for real), and copied into damaged variants.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from modelspec.contract import (
    ECHO_MODEL,
    METADATA_FILE,
    STAGING_PREFIX,
    ModelNotFoundError,
    list_versions,
    next_version,
    resolve_version_dir,
    scan_versions,
    version_problem,
)
from modelspec.echo import export_echo_model
from training import train_echo
from training.publish import plan_version, publish, rename_no_replace
from training.train_echo import EchoConfig, TrainResult

CONFIG = EchoConfig(series_length=1500, epochs=1, val_length=100, seed=3)
# What main() is given: the same tiny config, a short evaluation stream.
ARGV = ["--series-length", "1500", "--epochs", "1", "--val-length", "100", "--seed", "3"]
ARGV += ["--eval-length", "300"]
PUBLISHED_FILES = {
    METADATA_FILE,
    "saved_model.pb",
    "fingerprint.pb",
    "training_curves.png",
    "echo_streams.png",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
}


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    """A 20-window echo RNN (seconds): real weights to export."""
    return train_echo.train(CONFIG, log=lambda _: None)


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch, trained: TrainResult) -> list[EchoConfig]:
    """``train_echo.main`` with its training step returning ``trained``; records the configs."""
    calls: list[EchoConfig] = []

    def fake_train(config: EchoConfig) -> TrainResult:
        calls.append(config)
        return dataclasses.replace(trained)

    monkeypatch.setattr(train_echo, "train", fake_train)
    return calls


@pytest.fixture(scope="module")
def complete_version(tmp_path_factory: pytest.TempPathFactory, trained: TrainResult) -> Path:
    """One published version (through the script), to copy and damage."""
    model_dir = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_echo, "train", lambda config: trained)
        train_echo.main([*ARGV, "--model-dir", str(model_dir)])
    return model_dir / ECHO_MODEL / "1"


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_the_version_appears_only_once_complete(tmp_path: Path, script: list) -> None:
    """A poller (as the server's) never sees an integer folder that is not yet complete."""
    model_root = tmp_path / ECHO_MODEL
    seen: list[tuple[list[str], list[int], set[str] | None]] = []
    done = threading.Event()

    def poll() -> None:
        while True:
            finished = done.is_set()  # one more look after the publish has returned
            # Versions first: if the rename falls between the two looks, names shows it too.
            versions = list_versions(model_root)
            names = sorted(os.listdir(model_root)) if model_root.is_dir() else []
            # Every integer-named entry must already hold every file, metadata included.
            contents = files_under(model_root / "1") if "1" in names else None
            seen.append((names, versions, contents))
            if finished:
                return
            time.sleep(0.0005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        train_echo.main([*ARGV, "--model-dir", str(tmp_path)])
    finally:
        done.set()
        poller.join()
    assert len(script) == 1

    staging = [n for names, _, _ in seen for n in names if n.startswith(STAGING_PREFIX)]
    assert staging, "the poller never saw the publish in progress"
    assert all(n.startswith(f"{STAGING_PREFIX}1-") for n in staging), set(staging)
    for names, _, contents in seen:
        if "1" in names:
            assert contents is not None and contents >= PUBLISHED_FILES, contents
    # Before the rename: no "1" at all; after it: complete and listed.
    first = next(i for i, (names, _, _) in enumerate(seen) if "1" in names)
    assert all("1" not in names and versions == [] for names, versions, _ in seen[:first])

    assert sorted(os.listdir(model_root)) == ["1"]  # no temporary folder left
    assert scan_versions(model_root) == ([1], {})
    meta = json.loads((model_root / "1" / METADATA_FILE).read_text())
    assert (meta["name"], meta["version"]) == (ECHO_MODEL, 1)
    assert meta["metrics"]["stream_length"] == 300
    mode = stat.S_IMODE((model_root / "1").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask, oct(mode)  # not mkdtemp's private 0o700


def test_a_failure_midway_leaves_nothing_behind(
    tmp_path: Path, script: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SavedModel is written, then a later step fails: no version, no temporary folder."""
    written: list[set[str]] = []

    def broken_plot(step: object, initial_state: object, path: Path, **_: object) -> Path:
        written.append(files_under(path.parent))
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(train_echo, "plot_echo_streams", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        train_echo.main([*ARGV, "--model-dir", str(tmp_path)])
    assert {"saved_model.pb", "variables/variables.index"} <= written[0]  # it failed midway
    assert os.listdir(tmp_path / ECHO_MODEL) == []
    assert next_version(tmp_path, ECHO_MODEL) == 1


def test_an_interrupted_export_leaves_nothing_behind(tmp_path: Path, trained: TrainResult) -> None:
    target = plan_version(tmp_path, ECHO_MODEL, None)
    with pytest.raises(KeyboardInterrupt), publish(target) as out:
        export_echo_model(trained.model, out)
        raise KeyboardInterrupt
    assert os.listdir(tmp_path / ECHO_MODEL) == []


def test_publishing_onto_an_existing_version_fails_before_training(
    tmp_path: Path, script: list, complete_version: Path
) -> None:
    model_root = tmp_path / ECHO_MODEL
    shutil.copytree(complete_version, model_root / "1")
    before = files_under(model_root / "1")
    with pytest.raises(FileExistsError, match="already exists"):
        train_echo.main([*ARGV, "--model-dir", str(tmp_path), "--version", "1"])
    assert script == []  # refused before training
    assert files_under(model_root / "1") == before
    # Without --version it takes the next one.
    train_echo.main([*ARGV, "--model-dir", str(tmp_path)])
    assert sorted(os.listdir(model_root)) == ["1", "2"]
    assert json.loads((model_root / "2" / METADATA_FILE).read_text())["version"] == 2


@pytest.mark.parametrize("squatter", ["empty folder", "full folder", "file"])
def test_a_version_taken_during_the_export_is_not_replaced(
    tmp_path: Path, trained: TrainResult, squatter: str
) -> None:
    """Another publisher wins the race: this one fails and cleans up; theirs stays intact."""
    target = plan_version(tmp_path, ECHO_MODEL, 4)
    with pytest.raises(FileExistsError, match="already exists"), publish(target) as out:
        export_echo_model(trained.model, out)
        (out / METADATA_FILE).write_text("{}")
        if squatter == "file":
            target.path.write_text("theirs")
        else:
            target.path.mkdir()
            if squatter == "full folder":
                (target.path / "theirs.txt").write_text("theirs")
    assert os.listdir(tmp_path / ECHO_MODEL) == ["4"]
    if squatter == "file":
        assert target.path.read_text() == "theirs"
    else:
        expected = ["theirs.txt"] if squatter == "full folder" else []
        assert os.listdir(target.path) == expected


def test_the_final_rename_never_replaces_an_empty_folder(tmp_path: Path) -> None:
    """os.rename would silently replace an empty folder; the publisher's rename refuses."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("x")
    (tmp_path / "7").mkdir()
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "new", tmp_path / "7")
    assert os.listdir(tmp_path / "7") == [] and (tmp_path / "new" / "x").is_file()
    rename_no_replace(tmp_path / "new", tmp_path / "8")
    assert (tmp_path / "8" / "x").read_text() == "x"


def _damage(path: Path, how: str) -> None:
    if how == "missing variables index":
        (path / "variables" / "variables.index").unlink()
    elif how == "missing variables data":
        for shard in (path / "variables").glob("variables.data-*"):
            shard.unlink()
    elif how == "missing variables folder":
        shutil.rmtree(path / "variables")
    elif how == "missing metadata":
        (path / METADATA_FILE).unlink()
    elif how == "missing saved_model.pb":
        (path / "saved_model.pb").unlink()
    elif how == "empty saved_model.pb":
        (path / "saved_model.pb").write_bytes(b"")
    elif how == "missing shard 2 of 2":
        data = path / "variables" / "variables.data-00000-of-00001"
        data.rename(path / "variables" / "variables.data-00000-of-00002")
    else:
        raise AssertionError(how)


DAMAGES = {
    "missing variables index": "missing variables/variables.index",
    "missing variables data": "missing variables/variables.data-* shards",
    "missing variables folder": "missing variables/variables.index",
    "missing metadata": f"missing {METADATA_FILE}",
    "missing saved_model.pb": "missing saved_model.pb",
    "empty saved_model.pb": "empty saved_model.pb",
    "missing shard 2 of 2": "missing variables shard(s) variables.data-00001-of-00002",
}


def test_incomplete_and_odd_folders_are_ignored_and_reported(
    tmp_path: Path, complete_version: Path
) -> None:
    model_root = tmp_path / ECHO_MODEL
    model_root.mkdir()
    shutil.copytree(complete_version, model_root / "1")
    shutil.copytree(complete_version, model_root / "3")
    # Truncated, but every file is present: it counts (loading it is the server's check).
    pb = model_root / "3" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:100])
    expected: dict[str, str] = {}
    for number, (how, reason) in enumerate(DAMAGES.items(), start=10):
        shutil.copytree(complete_version, model_root / str(number))
        _damage(model_root / str(number), how)
        expected[str(number)] = reason
    (model_root / "20").mkdir()  # empty: e.g. a `cp -r` that has just begun
    expected["20"] = "missing saved_model.pb"
    (model_root / "21").write_text("a file, not a folder")
    expected["21"] = "not a directory"
    for odd in (f"{STAGING_PREFIX}22-0a1b2c3d", "v23", "023", "latest"):
        shutil.copytree(complete_version, model_root / odd)  # complete, but not a version name
    expected[f"{STAGING_PREFIX}22-0a1b2c3d"] = (
        "temporary folder of a publish in progress (or interrupted)"
    )
    expected["v23"] = expected["latest"] = "name is not an integer version"
    expected["023"] = "not a canonical version number (use 23)"
    (model_root / "README.md").write_text("not listed: a plain file with a non-integer name")

    complete, incomplete = scan_versions(model_root)
    assert complete == [1, 3]
    assert incomplete == expected
    assert list_versions(model_root) == [1, 3]
    assert resolve_version_dir(tmp_path, ECHO_MODEL) == model_root / "3"
    assert resolve_version_dir(tmp_path, ECHO_MODEL, 1) == model_root / "1"
    with pytest.raises(ModelNotFoundError, match=r"version 12 is incomplete \(missing variables/"):
        resolve_version_dir(tmp_path, ECHO_MODEL, 12)
    with pytest.raises(ModelNotFoundError, match="version 2 not found"):
        resolve_version_dir(tmp_path, ECHO_MODEL, 2)
    # Incomplete integer folders are not served, but their names are taken.
    assert next_version(tmp_path, ECHO_MODEL) == 22
    with pytest.raises(FileExistsError):
        plan_version(tmp_path, ECHO_MODEL, 12)
    assert version_problem(complete_version) is None


def test_only_incomplete_versions_resolve_to_nothing(
    tmp_path: Path, complete_version: Path
) -> None:
    model_root = tmp_path / ECHO_MODEL
    shutil.copytree(complete_version, model_root / "1")
    _damage(model_root / "1", "missing metadata")
    with pytest.raises(ModelNotFoundError, match=r"no complete SavedModel.*1/: missing metadata"):
        resolve_version_dir(tmp_path, ECHO_MODEL)
    assert scan_versions(tmp_path / "absent") == ([], {})
    assert list_versions(tmp_path / "absent") == [] and next_version(tmp_path, "absent") == 1
