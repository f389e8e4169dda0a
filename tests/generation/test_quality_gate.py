# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The HBP quality gate of generated pairs: liver brighter than vessels and HCC by a margin."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.core.errors import BundleInputError
from scripts.core.settings import as_bool
from scripts.data.labels import LABELS
from scripts.generation.quality_gate import HBPQualityGate


def _case(vein: float, hcc: float, hcc_voxels: int = 27) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((16, 16, 16), dtype=np.uint8)
    label[2:14, 2:14, 2:14] = 1
    label[4:12, 8, 8] = 2
    label[8, 4:12, 4] = 3
    side = round(hcc_voxels ** (1 / 3))
    label[10 : 10 + side, 10 : 10 + side, 10 : 10 + side] = 4
    image = np.where(label == 1, 0.8, 0.1).astype(np.float32)
    image[label == 2] = vein
    image[label == 3] = vein
    image[label == 4] = hcc
    return image, label


def test_hbp_pattern_passes_and_a_bright_structure_fails():
    gate = HBPQualityGate(LABELS, min_contrast=0.1, min_class_voxels=5)
    verdict = gate(*_case(vein=0.3, hcc=0.4))
    assert verdict["passed"] and verdict["contrast"] == pytest.approx(
        {"portal_vein": 0.5, "hepatic_vein": 0.5, "hcc": 0.4}
    )
    assert verdict["margin"] == pytest.approx(0.3)
    bright_hcc = gate(*_case(vein=0.3, hcc=0.75))  # darker than the liver, but by less than the margin
    assert not bright_hcc["passed"] and bright_hcc["margin"] == pytest.approx(-0.05)


def test_classes_too_small_to_judge_are_skipped():
    gate = HBPQualityGate(LABELS, min_contrast=0.1, min_class_voxels=20)
    verdict = gate(*_case(vein=0.3, hcc=0.95, hcc_voxels=8))  # a bright but 8-voxel HCC
    assert verdict["passed"] and "hcc" not in verdict["contrast"]
    only_liver = np.where(np.arange(16**3).reshape(16, 16, 16) < 2000, 1, 0)
    assert gate(np.ones((16, 16, 16)), only_liver)["passed"]


@pytest.mark.parametrize("settings", [{"min_contrast": 2.0}, {"max_tries": 0}, {"dark": ["spleen"]}])
def test_bad_gate_settings_are_one_error(settings):
    with pytest.raises(BundleInputError, match="quality_gate"):
        HBPQualityGate(LABELS, **settings)


@pytest.mark.parametrize(
    "value,expected", [(True, True), ("false", False), ("No", False), ("YES", True), (0, False), ("1", True)]
)
def test_yes_no_settings_read_the_words_the_command_line_passes(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, "flase"])
def test_other_yes_no_values_are_refused_naming_the_setting(value):
    with pytest.raises(BundleInputError, match="'overwrite'"):
        as_bool(value, "overwrite")
