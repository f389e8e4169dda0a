# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Output folders: only a folder the bundle wrote is replaced, never one holding an input, the bundle,
the working directory or home; a concurrent second writer is refused; leftovers of killed runs are
removed by the next run; SIGTERM cleans up like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BUNDLE_ROOT

from scripts.core.errors import BundleInputError
from scripts.core.outputs import OWNER_MARKER, publish, staging_dir
from scripts.core.settings import layered_config_files


def _write(folder: Path, name: str = "result.txt", text: str = "new", overwrite: bool = False, inputs=()) -> Path:
    staging = Path(staging_dir(str(folder), overwrite, inputs=inputs))
    (staging / name).write_text(text)
    return Path(publish(str(staging), str(folder), overwrite))


def test_a_published_folder_carries_the_marker_and_can_be_replaced_when_asked(tmp_path):
    out = _write(tmp_path / "out", text="first")
    assert (out / OWNER_MARKER).is_file() and (out / "result.txt").read_text() == "first"
    with pytest.raises(BundleInputError, match="--overwrite true"):
        _write(out, text="second")
    _write(out, text="second", overwrite=True)
    assert (out / "result.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left beside it


def test_a_users_folder_is_never_replaced_even_with_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(BundleInputError, match="not a folder this bundle wrote"):
        _write(mine, overwrite="true")
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("which", ["input", "parent of input", "cwd", "bundle", "home"])
def test_folders_holding_inputs_or_precious_places_are_refused(which, tmp_path, monkeypatch):
    out = _write(tmp_path / "out")  # a bundle-written folder: only the protection stops it
    mask = out / "masks" / "case.nii.gz"
    mask.parent.mkdir()
    mask.write_bytes(b"mask")
    target, inputs = out, []
    if which == "input":
        target, inputs = mask.parent, [str(mask)]
        (mask.parent / OWNER_MARKER).write_text("{}")
    elif which == "parent of input":
        inputs = [str(mask)]
    elif which == "cwd":
        monkeypatch.chdir(out / "masks")
    elif which == "bundle":
        target = BUNDLE_ROOT
    else:
        monkeypatch.setenv("HOME", str(out / "masks"))
    with pytest.raises(BundleInputError, match="holds"):
        staging_dir(str(target), overwrite=True, inputs=inputs)
    assert mask.read_bytes() == b"mask"


def test_a_second_writer_into_the_same_new_folder_is_refused(tmp_path):
    first, second = (Path(staging_dir(str(tmp_path / "out"))) for _ in range(2))
    (first / "a.txt").write_text("first")
    (second / "a.txt").write_text("second")
    publish(str(first), str(tmp_path / "out"))
    with pytest.raises(BundleInputError, match="another run wrote this folder"):
        publish(str(second), str(tmp_path / "out"))
    assert (tmp_path / "out" / "a.txt").read_text() == "first" and not second.exists()


def test_leftovers_of_ended_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.staging-{int(dead.stdout)}-abc"
    old = tmp_path / f".out.old-{int(dead.stdout)}-abc"
    live = tmp_path / f".out.staging-{os.getpid()}-xyz"
    for folder in (leftover, old, live):
        folder.mkdir()
        (folder / "half.nii.gz").write_bytes(b"half")
    staging = staging_dir(str(tmp_path / "out"))
    assert not leftover.exists() and not old.exists() and live.exists() and Path(staging).is_dir()


@pytest.mark.slow
def test_sigterm_removes_the_staging_folder_and_prints_one_line(tmp_path):
    dataset = tmp_path / "phantom"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(layered_config_files("configs/demo_data.yaml")),
        "--dataset_dir",
        str(dataset),
        "--num_cases",
        "200",
        "--save_figure",
        "false",
    ]
    process = subprocess.Popen(
        command,
        cwd=BUNDLE_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not any(
        (p / "imagesTr").is_dir() and any((p / "imagesTr").iterdir()) for p in tmp_path.glob(".phantom.staging-*")
    ):
        assert time.time() < deadline and process.poll() is None, "no staging folder appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("ERROR:")] == [
        "ERROR: interrupted (signal SIGTERM); nothing half-written was published"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_published_as_another_kind_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    staging = Path(staging_dir(str(out), kind="phantom dataset"))
    (staging / "datalist.json").write_text("{}")
    publish(str(staging), str(out), kind="phantom dataset")
    with pytest.raises(BundleInputError, match="holds a phantom dataset this bundle wrote, not a latent cache"):
        staging_dir(str(out), overwrite=True, kind="latent cache")
    assert (out / "datalist.json").read_text() == "{}"


@pytest.mark.parametrize("when", ["before the run", "while the run works"])
def test_files_added_after_publishing_are_never_deleted(when, tmp_path):
    out = _write(tmp_path / "out", text="first")
    if when == "before the run":
        (out / "model_last.pt").write_bytes(b"weights")
        with pytest.raises(BundleInputError, match=r"holds files the bundle did not publish there \(model_last.pt\)"):
            staging_dir(str(out), overwrite=True)
    else:
        staging = Path(staging_dir(str(out), overwrite=True))
        (staging / "result.txt").write_text("second")
        (out / "model_last.pt").write_bytes(b"weights")  # written into the old folder meanwhile
        with pytest.raises(BundleInputError, match="did not publish"):
            publish(str(staging), str(out), overwrite=True)
        assert not staging.exists()
    assert (out / "model_last.pt").read_bytes() == b"weights" and (out / "result.txt").read_text() == "first"


def test_a_marker_that_lists_nothing_is_not_trusted(tmp_path):
    out = _write(tmp_path / "out")
    (out / OWNER_MARKER).write_text("{}")  # an older bundle's marker, or an edited one
    with pytest.raises(BundleInputError, match="does not list what was published"):
        staging_dir(str(out), overwrite=True)
    assert (out / "result.txt").is_file()


def test_a_tilde_destination_is_refused_not_made_into_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleInputError, match="'~' is not expanded"):
        staging_dir("~/generated")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["the folder", "a folder above it"])
def test_a_destination_through_a_file_is_named_as_such(where, tmp_path):
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" if where == "the folder" else tmp_path / "taken" / "out"
    with pytest.raises(BundleInputError, match="is a file, not a folder") as raised:
        staging_dir(str(target))
    assert "File exists" not in str(raised.value) and (tmp_path / "taken").read_text() == "a file"
