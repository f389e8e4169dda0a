# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The pix2pix GAN baseline: training (configs/train_gan_baseline.yaml) with checkpoint and resume, and
pair generation from masks (configs/inference_gan_baseline.yaml) in the layout of configs/inference.yaml."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigWorkflow
from stage_helpers import TINY, one_thread  # noqa: F401

from scripts.core.errors import find_input_error
from scripts.core.settings import layered_config_files
from scripts.data.pairs import find_pairs

TRAIN = layered_config_files("configs/train_gan_baseline.yaml")
INFER = layered_config_files("configs/inference_gan_baseline.yaml")


def _train(dataset: Path, output: Path, max_epochs: int, **settings) -> ConfigWorkflow:
    assert Path(os.getcwd()).resolve() == BUNDLE_ROOT
    workflow = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        dataset_dir=str(dataset),
        output_dir=str(output),
        device="$torch.device('cpu')",
        max_epochs=max_epochs,
        val_interval=1,
        batch_size=2,
        patch_size=[32, 32, 32],
        **TINY,
        **settings,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def trained(tiny_phantoms, tmp_path_factory) -> Path:
    """One epoch: the two training phantoms in one batch, i.e. one generator and one discriminator step."""
    os.chdir(BUNDLE_ROOT)
    output = tmp_path_factory.mktemp("gan")
    workflow = _train(tiny_phantoms, output, max_epochs=1)
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 1
    return output


def test_one_iteration_writes_last_and_best_checkpoints(trained):
    for kind in ("last", "best"):
        checkpoint = torch.load(
            trained / "gan_baseline" / f"gan_baseline_{kind}.pt", map_location="cpu", weights_only=True
        )
        assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 1
        assert {"generator", "discriminator", "g_optimizer", "d_optimizer", "trainer"} <= set(checkpoint)
        assert checkpoint["labels"]["hcc"] == 4 and np.isfinite(checkpoint["best_metric"])  # validation PSNR


def test_rerun_resumes_from_the_last_checkpoint(trained, tiny_phantoms, tmp_path):
    output = tmp_path / "resumed"
    shutil.copytree(trained, output)
    before = torch.load(output / "gan_baseline" / "gan_baseline_last.pt", weights_only=True)["generator"]
    _train(tiny_phantoms, output, max_epochs=2)
    after = torch.load(output / "gan_baseline" / "gan_baseline_last.pt", weights_only=True)
    assert after["epoch"] == 2 and after["iteration"] == 2  # one more epoch, not two from scratch
    assert any(not torch.equal(before[k], after["generator"][k]) for k in before)


def test_kept_epochs_stay_as_they_were_when_training_goes_on(trained, tiny_phantoms, tmp_path):
    """keep_epochs (train_base.yaml): a copy of an earlier epoch, e.g. stage 2's autoguidance guide."""
    output = tmp_path / "kept"
    shutil.copytree(trained, output)
    _train(tiny_phantoms, output, max_epochs=3, keep_epochs=[2])
    folder = output / "gan_baseline"
    kept, last = (torch.load(folder / f"gan_baseline_{k}.pt", weights_only=True) for k in ("epoch2", "last"))
    assert kept["epoch"] == 2 and last["epoch"] == 3 and not (folder / "gan_baseline_epoch3.pt").exists()
    assert any(not torch.equal(kept["generator"][k], last["generator"][k]) for k in kept["generator"])


def test_generates_pairs_in_the_inference_layout(trained, tiny_phantoms, tmp_path):
    masks = sorted((tiny_phantoms / "labelsTr").glob("*.nii.gz"))[:2]
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for path in masks:
        shutil.copy(path, mask_dir / path.name)
    output = tmp_path / "pairs"
    workflow = ConfigWorkflow(
        config_file=INFER,
        workflow_type=None,
        run_id="inference",
        mask_dir=str(mask_dir),
        output_dir=str(output),
        gan_path=str(trained / "gan_baseline" / "gan_baseline_best.pt"),
        device="$torch.device('cpu')",
        **TINY,
    )
    workflow.initialize()
    workflow.run()
    record = json.loads((output / "pairs.json").read_text())
    assert sorted(p["mask"] for p in record["pairs"]) == sorted(str(p) for p in mask_dir.glob("*.nii.gz"))
    for path in masks:
        name = path.name[: -len(".nii.gz")]
        given, label, image = (
            nib.load(p) for p in (path, output / f"{name}_label.nii.gz", output / f"{name}_image.nii.gz")
        )
        assert np.array_equal(np.asanyarray(label.dataobj), np.asanyarray(given.dataobj))
        assert image.shape == given.shape and np.allclose(image.affine, given.affine, atol=1e-5)
        pixels = np.asanyarray(image.dataobj)
        assert np.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 1 and pixels.std() > 0
    assert len(find_pairs(str(output), labels_required=False)) == 2  # what configs/evaluate.yaml reads


def test_missing_gan_weights_are_one_error_naming_the_file(tiny_phantoms, tmp_path):
    workflow = ConfigWorkflow(
        config_file=INFER,
        workflow_type=None,
        run_id="inference",
        mask_dir=str(tiny_phantoms / "labelsTr"),
        output_dir=str(tmp_path / "out"),
        gan_path=str(tmp_path / "absent.pt"),
        device="$torch.device('cpu')",
        **TINY,
    )
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    error = find_input_error(caught.value)
    assert error is not None and str(tmp_path / "absent.pt") in str(error) and "train_gan_baseline.yaml" in str(error)
    assert not (tmp_path / "out").exists()
