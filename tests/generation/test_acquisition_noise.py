# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Acquisition noise: the level asked for is the level found, drawn per seed, and off when asked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scripts.core.errors import BundleInputError
from scripts.data.labels import LABELS
from scripts.evaluation.realism import noise_level
from scripts.generation.acquisition_noise import acquisition_noise


def _smooth_case() -> tuple[np.ndarray, np.ndarray]:
    """A noise-free image as a decoder renders it: a liver at 0.8 with a smooth ramp, darker vessels, a dim body."""
    label = np.zeros((40, 40, 32), dtype=np.uint8)
    label[4:36, 4:36, 4:28] = LABELS["liver"]
    label[18:22, 10:30, 10:20] = LABELS["portal_vein"]
    image = np.where(label == LABELS["liver"], 0.8, 0.2).astype(np.float32)
    image[label == LABELS["portal_vein"]] = 0.4
    image *= np.linspace(0.9, 1.1, 40, dtype=np.float32)[:, None, None]
    return ndimage.gaussian_filter(image, 1.0), label


def test_the_noise_added_is_the_level_drawn_and_within_the_range():
    image, label = _smooth_case()
    noise = acquisition_noise([0.025, 0.045], LABELS["liver"])
    levels = []
    for seed in range(4):
        noisy, level = noise(image, label, seed)
        assert noisy.dtype == np.float32 and noisy.shape == image.shape
        assert 0.025 <= level <= 0.045
        assert noise_level(noisy, label == LABELS["liver"]) == pytest.approx(level, rel=0.1)
        levels.append(level)
    assert len(set(levels)) == 4  # drawn per output
    again, level = noise(image, label, 2)
    np.testing.assert_array_equal(again, noise(image, label, 2)[0])  # the same seed, the same file
    assert not np.array_equal(again, noise(image, label, 3)[0])


def test_no_noise_when_off_or_without_a_liver():
    image, label = _smooth_case()
    assert acquisition_noise(None, LABELS["liver"]) is None
    assert acquisition_noise("null", LABELS["liver"]) is None  # as --acquisition_noise null arrives
    assert acquisition_noise([0.0, 0.0], LABELS["liver"]) is None
    unchanged, level = acquisition_noise([0.03, 0.03], LABELS["liver"])(image, np.zeros_like(label), 0)
    assert unchanged is image and level is None


@pytest.mark.parametrize("setting", [[0.05, 0.02], [-0.01, 0.02], [0.1, 0.9]])
def test_a_bad_range_is_one_error_line(setting):
    with pytest.raises(BundleInputError, match=r"config 'acquisition_noise' must be \[low, high\] with 0 <= low"):
        acquisition_noise(setting, LABELS["liver"])
