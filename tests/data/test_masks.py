# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Mask editing: elastic deformation, HCC removal, resizing and insertion, and the dict transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from scipy import ndimage

from scripts.core.errors import BundleInputError
from scripts.data.labels import LABELS, LabelContract
from scripts.data.masks import MaskEditor, MaskEditord
from tests.conftest import COMMON, toy_label

BACKGROUND, LIVER, PORTAL, HEPATIC, HCC = range(5)
SPACING = (1.5, 1.5, 3.0)  # anisotropic, as in thick-slice MRI
ALL_NODULES = np.ones((3, 3, 3), dtype=bool)


def _offsets_mm(shape, centre, spacing=SPACING):
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def synthetic_liver(hcc_centres=((26, 28, 14),), hcc_radius_mm: float = 6.0) -> np.ndarray:
    """A 40^3 ellipsoid liver (60 x 60 x 120 mm) with a portal and a hepatic vein and HCC balls."""
    shape = (40, 40, 40)
    x, y, z = _offsets_mm(shape, (20, 20, 20))
    label = np.zeros(shape, dtype=np.uint8)
    label[(x / 27) ** 2 + (y / 27) ** 2 + (z / 54) ** 2 <= 1] = LIVER
    label[19:21, 19:21, 8:32] = PORTAL
    label[8:32, 12, 26] = HEPATIC
    for centre in hcc_centres:
        cx, cy, cz = _offsets_mm(shape, centre)
        label[np.sqrt(cx**2 + cy**2 + cz**2) <= hcc_radius_mm] = HCC
    return label


def _components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=ALL_NODULES)[1]


def _assert_valid(label: np.ndarray) -> None:
    assert set(np.unique(label).tolist()) <= set(LABELS.values())
    LabelContract(LABELS).check(label, "edited.nii.gz")


def test_no_op_editor_returns_input_unchanged():
    label = synthetic_liver()
    editor = MaskEditor(LABELS)
    out, summary = editor(label, SPACING, seed=0)
    assert not editor.enabled and out is label and summary == {}
    np.testing.assert_array_equal(out, synthetic_liver())


def test_inserted_nodule_is_in_parenchyma_clear_of_vessels_and_of_the_right_size():
    label = synthetic_liver()
    editor = MaskEditor(LABELS, insert_hcc_diameters_mm=[15], vessel_margin_mm=3.0, boundary_margin_mm=2.0)
    out, summary = editor(label, SPACING, seed=1)
    assert out.shape == label.shape and out.dtype == label.dtype
    _assert_valid(out)
    new = (out == HCC) & (label != HCC)
    assert np.all(label[new] == LIVER)  # only former parenchyma was painted
    assert np.array_equal(out[~new], label[~new])  # nothing else changed
    # volume of a 15 mm sphere on a 1.5 x 1.5 x 3 mm grid, within 15 %
    expected = 4 / 3 * math.pi * 7.5**3 / np.prod(SPACING)
    assert abs(new.sum() - expected) / expected < 0.15
    vessels = np.isin(label, [PORTAL, HEPATIC])
    to_vessel = ndimage.distance_transform_edt(~vessels, sampling=SPACING)
    assert to_vessel[new].min() >= 3.0
    to_outside = ndimage.distance_transform_edt(label != BACKGROUND, sampling=SPACING)
    assert to_outside[new].min() > 2.0
    (entry,) = summary["hcc_inserted"]
    assert entry["diameter_mm"] == 15 and entry["voxels"] == new.sum() and new[tuple(entry["centre_voxel"])]


def test_several_nodules_stay_separate_and_irregular_ones_stay_inside():
    label = synthetic_liver()
    editor = MaskEditor(LABELS, insert_hcc_diameters_mm=[12, 9], irregularity=0.2)
    out, summary = editor(label, SPACING, seed=5)
    _assert_valid(out)
    new = (out == HCC) & (label != HCC)
    assert np.all(label[new] == LIVER)
    assert _components(out == HCC) == 3  # the old nodule and two new ones, none merged
    assert [e["diameter_mm"] for e in summary["hcc_inserted"]] == [12, 9]


def test_same_seed_same_edit_other_seed_other_edit():
    editor = MaskEditor(LABELS, elastic_displacement_mm=4.0, remove_hcc=1, hcc_scale=1.2, insert_hcc_diameters_mm=[10])
    label = synthetic_liver(hcc_centres=((26, 28, 14), (14, 26, 28)))
    first, summary = editor(label, SPACING, seed=7)
    again, summary_again = editor(label, SPACING, seed=np.random.default_rng(7))
    other, _ = editor(label, SPACING, seed=8)
    np.testing.assert_array_equal(first, again)
    assert summary == summary_again
    assert set(summary) == {"elastic_displacement_mm", "hcc_removed", "hcc_resized", "hcc_inserted"}
    assert not np.array_equal(first, other)
    _assert_valid(first)


def test_remove_all_hcc_turns_it_into_liver():
    label = synthetic_liver(hcc_centres=((26, 28, 14), (14, 26, 28)))
    out, summary = MaskEditor(LABELS, remove_hcc="all")(label, SPACING, seed=0)
    assert summary == {"hcc_removed": 2}
    assert not np.any(out == HCC)
    assert np.all(out[label == HCC] == LIVER)
    np.testing.assert_array_equal(out[label != HCC], label[label != HCC])


def test_remove_a_number_of_nodules():
    label = synthetic_liver(hcc_centres=((26, 28, 14), (14, 26, 28)))
    out, summary = MaskEditor(LABELS, remove_hcc=1)(label, SPACING, seed=0)
    assert summary == {"hcc_removed": 1}
    assert _components(out == HCC) == 1
    assert np.all(out[(label == HCC) & (out != HCC)] == LIVER)
    # asking for more than there are removes them all
    out, summary = MaskEditor(LABELS, remove_hcc=5)(label, SPACING, seed=0)
    assert summary == {"hcc_removed": 2} and not np.any(out == HCC)


def test_growing_hcc_stays_in_liver_and_spares_vessels():
    # the nodule touches the portal vein, so growth must go around it
    label = synthetic_liver(hcc_centres=((24, 20, 20),), hcc_radius_mm=5.0)
    out, summary = MaskEditor(LABELS, hcc_scale=1.5)(label, SPACING, seed=0)
    _assert_valid(out)
    before, after = (label == HCC).sum(), (out == HCC).sum()
    assert after > 2 * before
    assert np.all(np.isin(label[out == HCC], [LIVER, HCC]))  # inside liver ∪ old footprint
    np.testing.assert_array_equal(out[label != LIVER], label[label != LIVER])  # vessels untouched
    (entry,) = summary["hcc_resized"]
    assert entry["diameter_mm_after"] > entry["diameter_mm_before"]


def test_shrinking_hcc_keeps_its_core_and_returns_the_rim_to_liver():
    label = synthetic_liver(hcc_radius_mm=7.0)
    out, summary = MaskEditor(LABELS, hcc_scale=0.5)(label, SPACING, seed=0)
    _assert_valid(out)
    before, after = (label == HCC).sum(), (out == HCC).sum()
    assert 0 < after < 0.5 * before
    assert np.all(label[out == HCC] == HCC)
    assert np.all(out[(label == HCC) & (out != HCC)] == LIVER)
    assert summary["hcc_resized"][0]["diameter_mm_after"] < summary["hcc_resized"][0]["diameter_mm_before"]


@pytest.mark.parametrize("scale", [1.5, 0.8])
def test_free_nodule_volume_follows_the_scale_cubed(scale):
    label = synthetic_liver()  # the nodule sits clear of vessels and the liver edge
    out, _ = MaskEditor(LABELS, hcc_scale=scale)(label, SPACING, seed=0)
    ratio = (out == HCC).sum() / (label == HCC).sum()
    assert ratio == pytest.approx(scale**3, rel=0.2)


def test_elastic_deformation_changes_the_map_and_keeps_valid_ids():
    label = synthetic_liver()
    out, summary = MaskEditor(LABELS, elastic_displacement_mm=6.0, elastic_smoothness_mm=30.0)(label, SPACING, seed=3)
    _assert_valid(out)
    assert summary == {"elastic_displacement_mm": 6.0}
    assert not np.array_equal(out, label)
    assert 0.8 < (out == LIVER).sum() / (label == LIVER).sum() < 1.2  # a deformation, not a mess
    assert np.any(out == HCC) and np.any(out == PORTAL)


def test_toy_label_supports_every_step():
    label = toy_label((32, 32, 24))
    editor = MaskEditor(
        LABELS, elastic_displacement_mm=1.0, hcc_scale=1.3, insert_hcc_diameters_mm=[3], vessel_margin_mm=1.0
    )
    out, summary = editor(label, (1.0, 1.0, 1.0), seed=0)
    _assert_valid(out)
    assert len(summary["hcc_inserted"]) == 1


def test_nodule_larger_than_liver_is_a_one_line_error_naming_the_file():
    with pytest.raises(BundleInputError) as err:
        MaskEditor(LABELS, insert_hcc_diameters_mm=[200])(synthetic_liver(), SPACING, seed=0, source="case_3.nii.gz")
    message = str(err.value)
    assert message.startswith("case_3.nii.gz: ") and "200 mm HCC nodule" in message and "\n" not in message


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"hcc_scale": 0}, "hcc_scale"),
        ({"remove_hcc": "some"}, "remove_hcc"),
        ({"remove_hcc": True}, "remove_hcc"),
        ({"insert_hcc_diameters_mm": [-5]}, "insert_hcc_diameters_mm"),
    ],
)
def test_bad_settings_are_named(setting, expected):
    with pytest.raises(BundleInputError, match=expected):
        MaskEditor(LABELS, **setting)


def test_spacing_from_a_rotated_affine():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    # the spacing MaskEditord hands the editor: MONAI's column norms of the affine's 3x3 block
    assert affine_to_spacing(affine, r=3, suppress_zeros=False) == pytest.approx(SPACING)


def test_dict_transform_keeps_affine_and_meta_and_uses_the_case_seed():
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-30.0, 10.0, 5.0])
    array = synthetic_liver()
    label = MetaTensor(torch.as_tensor(array)[None], affine=affine, meta={"filename_or_obj": "case_1.nii.gz"})
    editor = MaskEditor(LABELS, insert_hcc_diameters_mm=[12])
    transform = MaskEditord(keys="label", editor=editor, summary_key="label_edits")
    out = transform({"label": label, "seed": 11})
    edited = out["label"]
    assert isinstance(edited, MetaTensor) and edited.shape == (1, 40, 40, 40) and edited.dtype == label.dtype
    torch.testing.assert_close(edited.affine, affine)
    assert edited.meta["filename_or_obj"] == "case_1.nii.gz"
    # the spacing came from the affine and the seed from the dictionary
    expected, summary = editor(array, SPACING, seed=11)
    np.testing.assert_array_equal(edited[0].numpy(), expected)
    assert out["label_edits"] == summary
    assert not torch.equal(transform({"label": label, "seed": 12})["label"], edited)
    with pytest.raises(KeyError, match="seed"):
        transform({"label": label})


def test_editor_is_configured_from_yaml():
    parser = ConfigParser()
    parser.read_config(str(COMMON))
    parser["mask_editor"] = {
        "_target_": "scripts.data.masks.MaskEditor",
        "labels": "@labels",
        "remove_hcc": "all",
        "insert_hcc_diameters_mm": [15, 25],
    }
    editor = parser.get_parsed_content("mask_editor", instantiate=True)
    assert isinstance(editor, MaskEditor) and editor.enabled
    assert editor.insert_hcc_diameters_mm == [15.0, 25.0] and editor.hcc == HCC
