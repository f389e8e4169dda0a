# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Writes that fail for a reason the user has to resolve (full disk, quota, read-only file system,
no permission): one ``ERROR:`` line naming the folder being written and the cause, a non-zero exit,
no traceback, and nothing staged left behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE_ROOT, toy_label, write_nifti
from stage_helpers import INFERENCE_CONFIG, TINY, build_weights, one_thread  # noqa: F401

from scripts.core.errors import error_line
from scripts.core.outputs import atomic_path, publish, staging_dir

FULL_DEVICE = "/dev/full"  # every write to it fails with ENOSPC: a full disk without filling one
needs_full_device = pytest.mark.skipif(not os.path.exists(FULL_DEVICE), reason="no /dev/full on this system")

#: What a user sees for each errno (the C library's text).
CAUSES = {code: os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The tiny weights of test_inference, built for this module."""
    return build_weights(tmp_path_factory)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR:")]


@needs_full_device
@pytest.mark.slow
def test_full_disk_during_inference_is_one_error_line_naming_the_output_folder(weights, tmp_path):
    """The real command, the real NIfTI writer: the first image file it writes lies on a full disk."""
    masks = tmp_path / "masks"
    for name in ("a", "b"):
        write_nifti(masks / f"{name}.nii.gz", toy_label(), np.diag([9.0, 9.0, 12.0, 1.0]))
    out = tmp_path / "out"
    args = [
        "run",
        "inference",
        "--config_file",
        str(INFERENCE_CONFIG),
        "--mask_dir",
        str(masks),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--num_inference_steps",
        "2",
        "--quality_gate_enabled",
        "false",
    ]
    for key, value in {**TINY, **weights["ddpm"]}.items():
        args += [f"--{key}", str(value)]
    script = (
        "import os, runpy, sys\n"
        "import scripts.generation.inference as inference\n"
        "save = inference._save\n"
        "def save_on_full_disk(array, like, path, dtype):\n"
        f"    os.symlink({FULL_DEVICE!r}, path)\n"
        "    save(array, like, path, dtype)\n"
        "inference._save = save_on_full_disk\n"
        f"sys.argv = ['monai.bundle'] + {args!r}\n"
        "runpy.run_module('monai.bundle', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _errors(result.stderr) == [
        f"ERROR: {out}: cannot write the output ({CAUSES[errno.ENOSPC]}); nothing half-written was kept: "
        "free space there or choose another folder"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]  # no output, no staging folder


@pytest.mark.parametrize("code", list(CAUSES))
@pytest.mark.parametrize("names_file", [True, False])
def test_a_failed_write_into_a_staging_folder_names_the_destination_and_removes_the_staging(code, names_file, tmp_path):
    """Whether the error names the file (open, rename) or not (a compressor's write): the line names
    the folder the user asked for, even if the command did not remove its staging folder itself."""
    out = tmp_path / "results"
    staging = Path(staging_dir(str(out)))
    (staging / "done.nii.gz").write_bytes(b"written before the disk filled up")
    try:
        raise OSError(code, os.strerror(code), *([str(staging / "next.nii.gz")] if names_file else []))
    except OSError as e:
        try:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e  # as MONAI wraps it
        except RuntimeError as wrapped:
            line = error_line(wrapped)
    assert line is not None and line.startswith(f"ERROR: {out}: cannot write the output ({CAUSES[code]}); ")
    assert "\n" not in line and not staging.exists() and not out.exists()


def test_a_failed_atomic_file_write_names_its_folder_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoints" / "model.pt"
    target.parent.mkdir()
    target.write_text("the previous checkpoint")
    with pytest.raises(OSError) as caught:
        with atomic_path(str(target)) as tmp:
            Path(tmp).write_text("half a checkp")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert error_line(caught.value) == (
        f"ERROR: {target.parent}: cannot write model.pt ({CAUSES[errno.EDQUOT]}); nothing half-written was kept: "
        "free space within your quota or choose another folder"
    )
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"] and target.read_text() == "the previous checkpoint"


def test_the_hook_prints_the_line_instead_of_a_traceback(tmp_path, capsys):
    from scripts.core.errors import _one_line_hook

    out = tmp_path / "out"
    staging = staging_dir(str(out))
    error = OSError(errno.EROFS, os.strerror(errno.EROFS))
    _one_line_hook(OSError, error, None)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"ERROR: {out}: cannot write the output ({CAUSES[errno.EROFS]}); nothing half-written "
        "was kept: choose a folder on a writable file system"
    ]
    assert not Path(staging).exists()


def test_a_full_disk_outside_the_bundle_writers_names_the_file(tmp_path):
    log = tmp_path / "logs" / "events.out"
    assert error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log))) == (
        f"ERROR: {log.parent}: cannot write events.out ({CAUSES[errno.ENOSPC]}); nothing half-written was kept: "
        "free space there or choose another folder"
    )


def test_an_unreadable_input_and_a_bug_are_not_taken_for_write_errors(tmp_path):
    out = tmp_path / "out"
    staging = staging_dir(str(out))  # a write under way
    mask = tmp_path / "mask.nii.gz"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", str(mask))) == (
        f"ERROR: [Errno 13] Permission denied: {str(mask)!r}"
    )  # as before: the file that could not be read
    assert error_line(ValueError("a bug")) is None  # the traceback is shown
    publish(staging, str(out))
    assert out.is_dir()
