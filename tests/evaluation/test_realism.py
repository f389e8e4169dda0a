# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The realism measures see what degrades an image: blurred, denoised and intensity-shifted copies of
real phantoms come out worse than the phantoms, and the classifier test tells a blurred set apart."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scripts.data.labels import LABELS
from scripts.evaluation.realism import SHARPNESS_MEASURES, classifier_two_sample_test, noise_level, paired_measures
from scripts.tools.phantom import generate_phantom


def test_noise_level_finds_the_noise_the_phantoms_were_made_with():
    """Each phantom's Rician sigma (relative to a liver of intensity 1 before a smooth bias field of up
    to +-30 %) is found from the image alone, through texture, vessels and bias."""
    for seed in (40, 41, 42):
        case = generate_phantom(seed, shape=(64, 64, 48), max_hcc=3)
        liver = case.label == LABELS["liver"]
        found = noise_level(case.image, liver) * np.median(case.image[liver])  # back to absolute units
        assert found == pytest.approx(case.info["noise_sigma"], rel=0.15), seed
    assert np.isnan(noise_level(case.image, np.zeros_like(liver)))


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[np.ndarray, np.ndarray]]:
    cases = [generate_phantom(seed, shape=(48, 48, 40), max_hcc=3) for seed in range(40, 46)]
    return [(case.image.astype(np.float64), case.label) for case in cases]


def _blurred(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=1.0)


def _denoised(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Noise removed inside each class, edges between classes kept: each class smoothed on its own
    (a Gaussian of the class's voxels divided by that of its mask)."""
    out = np.empty_like(image)
    for value in np.unique(label):
        mask = (label == value).astype(np.float64)
        smooth = ndimage.gaussian_filter(image * mask, sigma=1.5) / np.maximum(ndimage.gaussian_filter(mask, 1.5), 1e-6)
        out[label == value] = smooth[label == value]
    return out


def _shifted(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Vessels and HCC moved halfway to the liver's intensity."""
    out = image.copy()
    liver, dark = label == LABELS["liver"], np.isin(label, [2, 3, 4])
    out[dark] += 0.5 * (image[liver].mean() - image[dark].mean())
    return out


def _mean_ratio(phantoms, degrade, measure: str) -> float:
    ratios = []
    for image, label in phantoms:
        real = paired_measures(image, label, LABELS)[measure]
        copy = paired_measures(degrade(image, label), label, LABELS)[measure]
        if np.isfinite(real) and np.isfinite(copy) and real != 0:
            ratios.append(copy / real)
    assert ratios, measure
    return float(np.mean(ratios))


@pytest.mark.parametrize("measure", SHARPNESS_MEASURES)
def test_blur_lowers_every_sharpness_measure(phantoms, measure):
    assert _mean_ratio(phantoms, _blurred, measure) < 0.8


@pytest.mark.parametrize("measure", ["liver_grain", "body_detail"])
def test_removing_noise_with_edges_kept_lowers_the_grain(phantoms, measure):
    assert _mean_ratio(phantoms, _denoised, measure) < 0.8


@pytest.mark.parametrize("measure", ["contrast", "hcc_conspicuity", "threshold_dice"])
def test_shifted_intensities_lower_contrast_and_conspicuity(phantoms, measure):
    assert _mean_ratio(phantoms, _shifted, measure) < 0.8


def test_a_real_image_scores_itself_exactly(phantoms):
    image, label = phantoms[0]
    assert paired_measures(image, label, LABELS) == paired_measures(image.copy(), label.copy(), LABELS)


@pytest.mark.slow
def test_the_classifier_test_tells_a_blurred_set_apart_and_not_a_set_from_itself(phantoms):
    real = [image for image, _ in phantoms]
    blurred = [ndimage.gaussian_filter(image, sigma=1.5) for image in real]
    settings = {"folds": 3, "epochs": 6, "crop": 24, "channels": (4, 8, 8, 8), "batch_size": 4}
    apart = classifier_two_sample_test(real, blurred, **settings)
    assert apart["auc"] > 0.8 and apart["folds"] == 3 and apart["volumes"] == [6, 6]  # every fold ran
    same = classifier_two_sample_test(real, [image.copy() for image in real], **settings)
    assert same["auc"] == pytest.approx(0.5) and same["accuracy"] == pytest.approx(0.5)
