# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the bundle root, the label contract from common.yaml, and NIfTI writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
COMMON = BUNDLE_ROOT / "configs" / "common.yaml"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    """Save ``array`` as NIfTI at ``path`` (folders created) and return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def toy_label(shape: tuple[int, int, int] = (24, 24, 16)) -> np.ndarray:
    """A liver block holding one voxel line of each vessel and a small HCC cube."""
    label = np.zeros(shape, dtype=np.uint8)
    label[4:20, 4:20, 3:13] = 1
    label[6:18, 10, 8] = 2
    label[12, 6:18, 6] = 3
    label[14:17, 14:17, 9:12] = 4
    return label


def toy_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """HBP-like intensities for ``toy_label``: bright liver, dark vessels and HCC, plus noise."""
    rng = np.random.default_rng(seed)
    levels = np.array([50.0, 1000.0, 300.0, 300.0, 450.0], dtype=np.float32)
    return (levels[label] + rng.normal(0, 20, label.shape)).astype(np.float32)


def write_dataset(root: Path, n: int = 3, affine: np.ndarray | None = None) -> Path:
    """A tiny MSD-style dataset of toy cases; returns the datalist path."""
    entries = []
    for i in range(n):
        label = toy_label()
        write_nifti(root / "imagesTr" / f"case{i}.nii.gz", toy_image(label, i), affine)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", label, affine)
        entries.append({"image": f"imagesTr/case{i}.nii.gz", "label": f"labelsTr/case{i}.nii.gz"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:-1], "validation": entries[-1:], "test": []}))
    return datalist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is present and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_acceptance.py measures the rest)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def common_config() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(COMMON))
    return parser


@pytest.fixture
def contract(common_config: ConfigParser):
    return common_config.get_parsed_content("label_contract", instantiate=True)


def run_bundle(
    *args: str, cwd: Path = BUNDLE_ROOT, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run ...`` in the bundle root (or ``cwd``), as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


#: Model-grid overrides that make training tests fast: 32^3 voxels covering the phantom field of view.
TINY_GRID = ["--spacing", "[10.0, 10.0, 8.0]", "--spatial_size", "[32, 32, 32]", "--patch_size", "[32, 32, 32]"]


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """Four small phantoms (2 training, 1 validation, 1 test) written by the bundle's generator."""
    from scripts.tools.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms") / "dataset"
    write_phantom_dataset(str(root), num_cases=4, seed=3, val_fraction=0.25, test_fraction=0.25, shape=(40, 40, 32))
    return root
