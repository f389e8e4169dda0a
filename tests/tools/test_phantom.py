# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Procedural HBP liver phantoms: determinism, contrast, anatomy, orientation, dataset writing."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.core.errors import BundleInputError
from scripts.tools.phantom import LABELS, _split_counts, case_seed, generate_phantom, write_phantom_dataset

TINY = (32, 32, 24)
SMALL = (48, 48, 40)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.fixture(scope="module")
def small_cases():
    return [generate_phantom(seed, shape=SMALL) for seed in range(8)]


def test_same_seed_is_bit_identical():
    a, b = generate_phantom(11, shape=TINY), generate_phantom(11, shape=TINY)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert a.info == b.info


def test_different_seeds_differ():
    a, b = generate_phantom(1, shape=TINY), generate_phantom(2, shape=TINY)
    assert not np.array_equal(a.label, b.label)
    assert not np.array_equal(a.affine, b.affine)


def test_types_shapes_and_label_ids(small_cases):
    for case in small_cases:
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert case.affine.dtype == np.float64 and case.affine.shape == (4, 4)
        assert case.image.shape == case.label.shape == tuple(case.info["shape"])
        assert sorted(case.image.shape) == sorted(SMALL)
        assert np.all(np.isfinite(case.image)) and case.image.min() >= 0.0
        assert set(np.unique(case.label).tolist()) <= set(LABELS.values())
        assert (case.label == LABELS["liver"]).sum() > 500
        assert case.info["n_hcc"] == len(case.info["hcc_diameters_mm"]) <= 3
        assert all(8.0 <= d <= 40.0 for d in case.info["hcc_diameters_mm"])
        json.dumps(case.info)  # metadata must be serialisable as-is


def test_hbp_contrast_liver_brighter_than_vessels_and_hcc(small_cases):
    seen = dict.fromkeys(("portal_vein", "hepatic_vein", "hcc"), 0)
    for case in small_cases:
        liver = case.image[case.label == LABELS["liver"]].mean()
        assert 0.6 < liver < 1.4  # ~1.0 up to bias field and noise
        for name in seen:
            mask = case.label == LABELS[name]
            if mask.sum() >= 3:
                seen[name] += 1
                assert case.image[mask].mean() < 0.85 * liver, (case.info["seed"], name)
    # the loop above must have exercised every class, else it proves nothing
    assert all(count >= 2 for count in seen.values()), seen


def test_hcc_lies_inside_the_liver(small_cases):
    n_checked = 0
    for case in small_cases:
        hcc = case.label == LABELS["hcc"]
        if not hcc.any():
            continue
        n_checked += 1
        liver_tissue = np.isin(case.label, [LABELS["liver"], LABELS["portal_vein"], LABELS["hepatic_vein"]])
        # nodules are holes in the (1-voxel dilated) liver: enclosed by it on every side
        envelope = ndimage.binary_fill_holes(ndimage.binary_dilation(liver_tissue, iterations=1))
        assert not (hcc & ~envelope).any(), case.info["seed"]
        # the voxels around each nodule are liver tissue, not fat, bowel or air
        shell = ndimage.binary_dilation(hcc, iterations=1) & ~hcc
        assert liver_tissue[shell].mean() > 0.9, case.info["seed"]
    assert n_checked >= 2


def test_zero_hcc_when_disabled():
    case = generate_phantom(3, shape=TINY, max_hcc=0)
    assert case.info["n_hcc"] == 0 and not (case.label == LABELS["hcc"]).any()


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "RPI", "PSR"])
def test_orientation_codes_keep_world_geometry(code):
    case = generate_phantom(5, shape=SMALL, orientations=(code,))
    reference = generate_phantom(5, shape=SMALL, orientations=("RAS",))
    assert case.info["axcodes"] == code
    assert "".join(nib.aff2axcodes(case.affine)) == code
    # the array is the RAS grid permuted to the code's axis order
    expected_shape = tuple(SMALL["RLAPSI".index(c) // 2] for c in code)
    assert case.image.shape == expected_shape
    liver = case.label == LABELS["liver"]
    centroid = _world_centroid(liver, case.affine)
    ref_centroid = _world_centroid(reference.label == LABELS["liver"], reference.affine)
    assert np.linalg.norm(centroid - ref_centroid) < 4.0
    body_centroid = _world_centroid(case.image > 0.2, case.affine)
    # RAS+ world: the patient's right is +x, where the liver sits
    assert centroid[0] > body_centroid[0] + 20.0


def test_spacing_follows_shape_and_range():
    case = generate_phantom(2, shape=(40, 32, 24), orientations=("RAS",), max_rotation_deg=0.0)
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), [8.0, 10.0, 10.0])
    assert np.allclose(case.affine[:3, :3], np.diag([8.0, 10.0, 10.0]))
    drawn = generate_phantom(2, spacing_range=((4.0, 5.0), (4.0, 5.0), (6.0, 8.0)), orientations=("LPS",))
    sp = drawn.info["spacing_ras"]
    assert 4.0 <= sp[0] <= 5.0 and 4.0 <= sp[1] <= 5.0 and 6.0 <= sp[2] <= 8.0
    assert drawn.image.shape == tuple(int(round(f / s)) for f, s in zip((320.0, 320.0, 240.0), sp, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"orientations": ("RAX",)}, "axis code"),
        ({"orientations": ("RRS",)}, "axis code"),
        ({"shape": (32, 32)}, "shape"),
        ({"max_hcc": -1}, "max_hcc"),
        ({"spacing_range": ((2, 1), (1, 2), (1, 2))}, "spacing"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_phantom(0, **kwargs)


def test_split_counts():
    assert _split_counts(1, 0.2, 0.2) == (1, 0, 0)
    assert _split_counts(2, 0.2, 0.2) == (2, 0, 0)
    assert _split_counts(3, 0.2, 0.2) == (1, 1, 1)
    assert _split_counts(10, 0.2, 0.2) == (6, 2, 2)
    assert _split_counts(5, 0.0, 0.0) == (5, 0, 0)


def _load(path: str) -> nib.Nifti1Image:
    return nib.load(path)


def test_write_phantom_dataset(tmp_path):
    root = tmp_path / "phantoms"
    datalist_path = write_phantom_dataset(str(root), num_cases=4, seed=3, shape=TINY)
    assert datalist_path == str(root / "datalist.json")
    assert sorted(os.listdir(tmp_path)) == ["phantoms"]  # no temporary folder left behind
    datalist = json.loads((root / "datalist.json").read_text())
    assert set(datalist) == {"training", "validation", "test"}
    assert all(len(datalist[k]) >= 1 for k in datalist)
    names = [item["image"] for k in datalist for item in datalist[k]]
    assert sorted(names) == [f"imagesTr/phantom_{i:03d}.nii.gz" for i in range(4)]  # disjoint and complete
    for split in datalist.values():
        for item in split:
            assert not os.path.isabs(item["image"]) and not os.path.isabs(item["label"])
            image, label = _load(str(root / item["image"])), _load(str(root / item["label"]))
            assert label.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.float32
            assert image.shape == label.shape
            assert int(image.header["qform_code"]) > 0 and int(image.header["sform_code"]) > 0
            assert np.allclose(image.get_qform(), image.affine, atol=1e-4)
            assert np.allclose(label.affine, image.affine)
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= set(LABELS.values())
    # case i is generate_phantom(case_seed(seed, i)), whatever the number of cases
    case = generate_phantom(case_seed(3, 2), shape=TINY)
    stored = _load(str(root / "imagesTr" / "phantom_002.nii.gz"))
    assert np.array_equal(np.asarray(stored.dataobj), case.image)
    assert np.array_equal(np.asarray(_load(str(root / "labelsTr" / "phantom_002.nii.gz")).dataobj), case.label)
    assert np.allclose(stored.affine, case.affine, atol=1e-5)
    other = tmp_path / "fewer"
    write_phantom_dataset(str(other), num_cases=3, seed=3, shape=TINY)
    assert np.array_equal(
        np.asarray(_load(str(other / "imagesTr" / "phantom_002.nii.gz")).dataobj), np.asarray(stored.dataobj)
    )


def test_write_phantom_dataset_refuses_then_overwrites(tmp_path):
    root = tmp_path / "ds"
    write_phantom_dataset(str(root), num_cases=1, seed=0, shape=TINY)
    before = np.asarray(_load(str(root / "imagesTr" / "phantom_000.nii.gz")).dataobj)
    with pytest.raises(BundleInputError, match="--overwrite true"):
        write_phantom_dataset(str(root), num_cases=1, seed=1, shape=TINY)
    assert np.array_equal(np.asarray(_load(str(root / "imagesTr" / "phantom_000.nii.gz")).dataobj), before)
    write_phantom_dataset(str(root), num_cases=2, seed=1, shape=TINY, overwrite=True)
    after = json.loads((root / "datalist.json").read_text())
    assert len(after["training"]) == 2 and after["validation"] == [] and after["test"] == []
    assert not np.array_equal(np.asarray(_load(str(root / "imagesTr" / "phantom_000.nii.gz")).dataobj), before)
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_phantom_dataset(str(empty), num_cases=1, seed=0, shape=TINY)  # an empty folder is fine
    assert (empty / "datalist.json").is_file()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_cases": 0}, "num_cases"),
        ({"num_cases": 2, "val_fraction": 0.6, "test_fraction": 0.4}, "< 1"),
        ({"num_cases": 2, "val_fraction": -0.1}, "val_fraction"),
        ({"num_cases": 2, "seed": -1}, "seed"),
    ],
)
def test_write_phantom_dataset_rejects_bad_arguments(tmp_path, kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_phantom_dataset(str(tmp_path / "x"), shape=TINY, **kwargs)
    assert not (tmp_path / "x").exists()
