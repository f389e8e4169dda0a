# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Datalist reading, up-front file checks and the preprocessing chains."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import toy_image, toy_label, write_dataset, write_nifti

from scripts.core.errors import BundleInputError
from scripts.data.cases import check_case, check_cases, load_datalist, preprocessing_transforms

LPS_ANISOTROPIC = np.diag([-3.0, -2.0, 6.0, 1.0])  # LPS axes, 3 x 2 x 6 mm voxels


def test_datalist_paths_resolve_against_dataset_dir(tmp_path):
    datalist = write_dataset(tmp_path, n=3)
    training = load_datalist(str(datalist), str(tmp_path), "training")
    assert len(training) == 2
    assert training[0]["image"] == str(tmp_path / "imagesTr" / "case0.nii.gz")
    assert load_datalist(str(datalist), str(tmp_path), "test") == []


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "datalist not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"training": [{"image": "a.nii.gz"}]}', "lacks ['label']"),
        ('{"training": {"image": 1}}', "must be a list"),
        (
            '{"training": [{"image": 3, "label": "l.nii.gz"}]}',
            "entry 0 of 'training' has image 3; expected a file path",
        ),
        ('{"training": [{"image": "i.nii.gz", "label": ["l"]}]}', "has label ['l']; expected a file path"),
    ],
)
def test_datalist_errors(tmp_path, content, expected):
    path = tmp_path / "datalist.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BundleInputError, match=r"^" + str(path)) as err:
        load_datalist(str(path), str(tmp_path))
    assert expected in str(err.value)


def test_good_cases_pass_the_checks(tmp_path, contract):
    datalist = write_dataset(tmp_path, n=3, affine=LPS_ANISOTROPIC)
    items = load_datalist(str(datalist), str(tmp_path))
    assert check_cases(items, contract, progress=False) == 2
    with pytest.raises(BundleInputError, match="no cases"):
        check_cases([], contract)


def _pair(tmp_path, image, label, image_affine=None, label_affine=None, suffix=".nii.gz"):
    return {
        "image": write_nifti(tmp_path / f"img{suffix}", image, image_affine),
        "label": write_nifti(tmp_path / f"lab{suffix}", label, label_affine),
    }


def test_missing_file(tmp_path, contract):
    item = {"image": str(tmp_path / "nope.nii.gz"), "label": str(tmp_path / "nolabel.nii.gz")}
    with pytest.raises(BundleInputError, match=r"nolabel.nii.gz: label file not found"):
        check_case(item, contract)


def test_corrupt_nifti(tmp_path, contract):
    item = _pair(tmp_path, toy_image(toy_label()), toy_label())
    data = open(item["image"], "rb").read()
    open(item["image"], "wb").write(data[: len(data) // 2])  # truncated download
    with pytest.raises(BundleInputError, match=r"img.nii.gz: cannot read image as NIfTI"):
        check_case(item, contract)


def test_non_nifti(tmp_path, contract):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG not a volume")
    with pytest.raises(BundleInputError, match=r"scan.png: label is not a NIfTI file"):
        check_case({"label": str(path)}, contract)


def test_not_3d(tmp_path, contract):
    label = toy_label()
    item = _pair(tmp_path, np.stack([toy_image(label)] * 2, -1), label)
    with pytest.raises(BundleInputError, match=r"img.nii.gz: image must be a 3D volume, got shape \(24, 24, 16, 2\)"):
        check_case(item, contract)
    # a trailing singleton dimension is a 3D volume in disguise and is accepted
    check_case(_pair(tmp_path, toy_image(label)[..., None], label), contract)


def test_shape_mismatch(tmp_path, contract):
    label = toy_label()
    item = _pair(tmp_path, toy_image(label)[:, :, :-1], label)
    with pytest.raises(BundleInputError, match=r"lab.nii.gz: label shape \(24, 24, 16\) differs from its image"):
        check_case(item, contract)


def test_affine_mismatch(tmp_path, contract):
    label = toy_label()
    shifted = np.eye(4)
    shifted[0, 3] = 2.5
    item = _pair(tmp_path, toy_image(label), label, label_affine=shifted)
    with pytest.raises(BundleInputError, match=r"lab.nii.gz: label affine differs from its image .* by up to 2.5 mm"):
        check_case(item, contract)


def test_nan_image(tmp_path, contract):
    label = toy_label()
    image = toy_image(label)
    image[3, 3, 3] = np.nan
    with pytest.raises(BundleInputError, match=r"img.nii.gz: image contains NaN or Inf"):
        check_case(_pair(tmp_path, image, label), contract)


def test_unknown_label_ids_in_file(tmp_path, contract):
    label = toy_label()
    image = toy_image(label)
    label[0, 0, 0] = 12
    with pytest.raises(BundleInputError, match=r"lab.nii.gz: unknown label ids 12"):
        check_case(_pair(tmp_path, image, label), contract)


def test_pair_chain_brings_lps_anisotropic_case_onto_the_grid(tmp_path, contract):
    label = toy_label()
    item = _pair(tmp_path, toy_image(label), label, LPS_ANISOTROPIC, LPS_ANISOTROPIC)
    chain = preprocessing_transforms(contract, spacing=(4.0, 4.0, 4.0), spatial_size=(32, 16, 32))
    out = chain(item)
    image, lab = out["image"], out["label"]
    assert image.shape == (1, 32, 16, 32) and lab.shape == (1, 32, 16, 32)
    assert image.dtype == torch.float32 and lab.dtype == torch.uint8
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), [4.0, 4.0, 4.0])
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.max()) > 0.9
    assert set(torch.unique(lab).tolist()) <= {0, 1, 2, 3, 4} and 4 in torch.unique(lab).tolist()
    # HBP ordering survives resampling and scaling: liver brighter than HCC
    assert image[lab == 1].mean() > image[lab == 4].mean()
    # physical extent is preserved: 16 voxels x 2 mm (y, before) ~ 8 voxels x 4 mm on the model grid
    liver_y_extent = torch.nonzero(lab[0] > 0)[:, 1]
    assert 7 <= int(liver_y_extent.max() - liver_y_extent.min() + 1) <= 9


def test_label_map_applies_in_the_chain(tmp_path, common_config):
    from scripts.data.labels import LabelContract

    label = toy_label()
    label[label == 4] = 9  # the dataset calls HCC 9
    contract = LabelContract(common_config["labels"], {1: 1, 2: 2, 3: 3, 9: 4})
    item = {"label": write_nifti(tmp_path / "m.nii.gz", label)}
    out = preprocessing_transforms(contract, (1.0, 1.0, 1.0), (24, 24, 16), with_image=False)(item)
    np.testing.assert_array_equal(out["label"][0].numpy(), toy_label())
    assert "image" not in out


def test_common_config_chains_instantiate(common_config, tmp_path):
    datalist = write_dataset(tmp_path, n=2)
    item = load_datalist(str(datalist), str(tmp_path))[0]
    out = common_config.get_parsed_content("pair_preprocessing", instantiate=True)(item)
    assert tuple(out["image"].shape[1:]) == tuple(common_config["spatial_size"])
    assert tuple(out["label"].shape[1:]) == tuple(common_config["spatial_size"])


def test_a_patch_size_of_the_wrong_length_says_so():
    from scripts.data.cases import check_patch_size

    with pytest.raises(BundleInputError, match=r"expected 3 sizes, one per axis"):
        check_patch_size([32, 32], [64, 64, 64])
    with pytest.raises(BundleInputError, match="does not fit"):
        check_patch_size([96, 32, 32], [64, 64, 64])
