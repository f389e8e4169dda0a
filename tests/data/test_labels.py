# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The label contract: validation, remapping and one-hot conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.core.errors import BundleInputError
from scripts.data.labels import LABELS, LabelContract, LabelContractd


def test_contract_comes_from_common_config(contract):
    """configs/common.yaml `labels` and the code's one copy (scripts.data.labels.LABELS) agree."""
    assert contract.labels == LABELS
    assert contract.num_classes == 5
    assert contract.names == ["background", "liver", "portal_vein", "hepatic_vein", "hcc"]


def test_valid_map_passes_unchanged():
    label = np.array([[[0, 1, 2, 3, 4]]], dtype=np.float32)
    out = LabelContract(LABELS).prepare(label, "a.nii.gz")
    np.testing.assert_array_equal(out, label)


def test_label_map_remaps_all_pairs_at_once():
    # swap 1 <-> 2 and drop 7: a sequential remap would turn every 1 into 1 again
    contract = LabelContract(LABELS, {1: 2, 2: 1, 7: 0, 4: 4})
    out = contract.prepare(np.array([0, 1, 2, 7, 4], dtype=np.float32), "a.nii.gz")
    np.testing.assert_array_equal(out, [0, 2, 1, 0, 4])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 1, 5, 9], "unknown label ids 5, 9"),
        ([0, 1, 2.5], "non-integer values 2.5"),
        ([0, 1, np.nan], "NaN or Inf"),
        ([0, np.inf], "NaN or Inf"),
        ([0, 0, 0], "no foreground"),
    ],
)
def test_bad_label_maps_name_file_and_values(values, expected):
    with pytest.raises(BundleInputError) as err:
        LabelContract(LABELS).prepare(np.array(values, dtype=np.float32), "case_7.nii.gz")
    message = str(err.value)
    assert message.startswith("case_7.nii.gz: ") and expected in message
    assert "\n" not in message


def test_label_map_must_list_every_dataset_id():
    # a dataset numbering spleen 1 and liver 6 must not have its spleen taken for liver
    contract = LabelContract(LABELS, {6: 1})
    with pytest.raises(BundleInputError, match=r"^amos.nii.gz: label ids 1, 3 are not in 'label_map'"):
        contract.prepare(np.array([0, 1, 3, 6], dtype=np.float32), "amos.nii.gz")
    np.testing.assert_array_equal(contract.prepare(np.array([0, 6], dtype=np.float32), "amos.nii.gz"), [0, 1])


def test_mapping_to_background_only_counts_as_empty():
    with pytest.raises(BundleInputError, match="no foreground"):
        LabelContract(LABELS, {6: 0}).prepare(np.array([0, 6, 6], dtype=np.float32), "amos.nii.gz")


def test_bad_contract_configs_are_rejected():
    with pytest.raises(BundleInputError, match="ids must be 0..N-1"):
        LabelContract({"background": 0, "liver": 2})
    with pytest.raises(BundleInputError, match="targets 9"):
        LabelContract(LABELS, {1: 9})


def test_one_hot_has_one_channel_per_class():
    label = torch.tensor([0, 1, 2, 3, 4, 4]).reshape(1, 1, 1, 2, 3)
    encoded = LabelContract(LABELS).one_hot(label)
    assert encoded.shape == (1, 5, 1, 2, 3)
    assert torch.all(encoded.sum(1) == 1)
    assert torch.equal(encoded.argmax(1, keepdim=True), label)


def test_dictionary_transform_names_the_loaded_file():
    from monai.data import MetaTensor

    bad = MetaTensor(torch.tensor([[[[0.0, 8.0]]]]), meta={"filename_or_obj": "/data/x_label.nii.gz"})
    with pytest.raises(BundleInputError, match=r"^/data/x_label.nii.gz: unknown label ids 8"):
        LabelContractd(keys="label", contract=LabelContract(LABELS))({"label": bad})
