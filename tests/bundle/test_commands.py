# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The dataset commands as a user runs them: demo data generation and the dataset check."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, run_bundle
from monai.bundle import ConfigWorkflow

from scripts.core.errors import find_input_error
from scripts.core.settings import layered_config_files
from scripts.evaluation.realism import noise_level

DEMO_DATA = layered_config_files("configs/demo_data.yaml")


def _liver_noise(dataset) -> float:
    """The Rician noise level of the first phantom's liver, relative to its median (0 for a noise-free image)."""
    first = json.loads((dataset / "datalist.json").read_text())["training"][0]
    image = np.asarray(nib.load(dataset / first["image"]).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(dataset / first["label"]).dataobj)
    return noise_level(image, label == 1)


@pytest.mark.slow
def test_demo_data_command_writes_dataset_and_refuses_to_overwrite(tmp_path):
    dataset = tmp_path / "phantom"
    args = ["--config_file", str(DEMO_DATA), "--dataset_dir", str(dataset), "--num_cases", "3", "--seed", "5"]
    first = run_bundle(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    datalist = json.loads((dataset / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    assert len(list((dataset / "imagesTr").glob("*.nii.gz"))) == 3
    assert (dataset / "figures" / "phantoms.png").stat().st_size > 10_000
    assert 0.015 < _liver_noise(dataset) < 0.06  # the default Rician sigma, 2-5 % of the liver
    before = sorted(p.stat().st_mtime_ns for p in dataset.rglob("*.nii.gz"))

    second = run_bundle(*args)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines()[-1] == (
        f"ERROR: {dataset}: exists and is not empty; pass --overwrite true or choose another folder"
    )
    assert "Traceback" not in second.stderr
    assert sorted(p.stat().st_mtime_ns for p in dataset.rglob("*.nii.gz")) == before


def _check(tiny_phantoms, tmp_path, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=layered_config_files("configs/check_data.yaml"),
        workflow_type="infer",
        dataset_dir=str(tiny_phantoms),
        output_dir=str(tmp_path),
        spacing=[10.0, 10.0, 8.0],
        spatial_size=[32, 32, 32],
        **overrides,
    )
    workflow.initialize()
    return workflow


def test_check_data_reports_every_section(tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    _check(tiny_phantoms, tmp_path).run()
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert {k: v["num_cases"] for k, v in report["sections"].items()} == {"training": 2, "validation": 1, "test": 1}
    case = report["sections"]["training"]["cases"][0]
    assert case["model_grid_shape"] == [32, 32, 32]
    assert case["voxels_per_class"]["liver"] > 0 and 0.0 <= case["image_range"][0] <= case["image_range"][1] <= 1.0


def test_check_data_rejects_ids_missing_from_label_map(tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = _check(tiny_phantoms, tmp_path, label_map={1: 1, 4: 4})  # forgets the vessels
    with pytest.raises(RuntimeError) as err:
        workflow.run()
    assert "label ids 2, 3 are not in 'label_map'" in str(find_input_error(err.value))
    assert not (tmp_path / "data_report.json").exists()


@pytest.mark.slow
def test_misspelt_setting_is_refused_and_no_means_no(tmp_path):
    """A misspelt override used to be ignored (the default ran); `--save_figure false` used to write the figure."""
    dataset = tmp_path / "phantom"
    typo = run_bundle("--config_file", str(DEMO_DATA), "--dataset_dir", str(dataset), "--num_case", "3")
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    errors = [line for line in typo.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert errors[0].startswith("ERROR: --num_case: not a setting of configs/demo_data.yaml; did you mean --num_cases")
    assert not dataset.exists()

    quiet = run_bundle(
        "--config_file", str(DEMO_DATA), "--dataset_dir", str(dataset), "--num_cases", "3", "--save_figure", "false",
        "--phantom#noise_sigma_range", "[0.0, 0.0]",  # noise-free phantoms: targets for a decoder that renders no noise
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert (dataset / "datalist.json").is_file() and not (dataset / "figures").exists()
    assert _liver_noise(dataset) < 0.006  # what remains is partial volume at vessel edges


TASKS = [
    "demo_data",
    "check_data",
    "train_autoencoder",
    "train_diffusion",
    "train_controlnet",
    "train_gan_baseline",
    "train_segmentation",
    "inference",
    "inference_autoencoder",
    "generate_unconditional",
    "inference_gan_baseline",
    "evaluate",
    "augmentation_study",
]


@pytest.mark.parametrize("task", TASKS)
def test_every_command_checks_common_settings_before_any_work(task, tmp_path, monkeypatch):
    """The checks declared once in common.yaml run first in every command: one line naming the setting."""
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=layered_config_files(f"configs/{task}.yaml"),
        workflow_type=None,
        seed=-3,
        output_dir=str(tmp_path / "out"),
        dataset_dir=str(tmp_path / "none"),
    )
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    assert str(find_input_error(caught.value)) == "config 'seed': expected an integer >= 0, got -3"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "task,setting,value,expected",
    [
        ("demo_data", "num_cases", 0, "config 'num_cases': expected an integer >= 1, got 0"),
        ("evaluate", "overwrite", "maybe", "config 'overwrite': expected true/false, got 'maybe'"),
        ("train_segmentation", "flip_prob", 2.0, "config 'flip_prob': expected a number >= 0.0 and <= 1.0, got 2.0"),
        (
            "train_gan_baseline",
            "patch_size",
            [32, 32],
            "config 'patch_size': expected a list of 3 integers, got [32, 32]",
        ),
        (
            "augmentation_study",
            "launcher",
            "slurm",
            "config 'launcher': expected one of subprocess, in_process, got 'slurm'",
        ),
        (
            "train_autoencoder",
            "key_metric",
            "val_real_contrast",
            "config 'key_metric': expected one of val_psnr, val_ssim, val_recon_contrast, got 'val_real_contrast'",
        ),
        (
            "generate_unconditional",
            "num_samples",
            "eight",
            "config 'num_samples': expected an integer >= 1, got 'eight'",
        ),
        (
            "generate_unconditional",
            "label_guided_decoder",
            True,
            "config 'label_guided_decoder': expected one of false, got True "
            "(unconditional samples have no label map to decode with)",
        ),
        (
            "inference",
            "label_guided_decoder",
            "maybe",
            "config 'label_guided_decoder': expected true/false, got 'maybe'",
        ),
    ],
)
def test_task_settings_are_checked_before_any_work(task, setting, value, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=layered_config_files(f"configs/{task}.yaml"),
        workflow_type=None,
        output_dir=str(tmp_path / "out"),
        **{setting: value},
    )
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    assert str(find_input_error(caught.value)) == expected
