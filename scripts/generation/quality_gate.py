# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Quality gate for generated pairs: does a volume show the hepatobiliary-phase pattern of its mask?

In HBP MRI the enhancing liver parenchyma is brighter than the portal vein, the hepatic veins and
HCC. A generated volume in which one of those structures comes out as bright as the liver teaches a
segmentation network the wrong appearance, so inference checks every volume against its own mask
(MAISI does the same for CT with per-organ intensity ranges) and regenerates a failing one with a
new seed, up to ``max_tries`` attempts; ``pairs.json`` records every attempt.

The test is per dark class present in the mask (at least ``min_class_voxels`` voxels):
``mean(liver) - mean(class) >= min_contrast``, on the model grid and its [0, 1] scale (what the model
generated, before it is resampled onto the mask's grid and mapped to an output range). MONAI's
metrics score overlaps of segmentations, not intensities under a label, hence this small check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scripts.core.errors import BundleInputError
from scripts.core.settings import as_bool
from scripts.data.labels import class_intensity_sums, class_means

__all__ = ["HBPQualityGate", "build_quality_gate"]


class HBPQualityGate:
    """Checks a generated image against the HBP intensity pattern of its label map.

    Args:
        labels: class name -> id (the bundle's label contract).
        bright: the enhancing class (liver).
        dark: classes that must be darker than it (vessels, HCC).
        min_contrast: least ``mean(bright) - mean(dark class)`` on the [0, 1] intensity scale.
        min_class_voxels: classes with fewer voxels in a mask are not judged (a mean of a handful of
            voxels says little).
        max_tries: generation attempts per output, the first included (1: check and record only).
    """

    def __init__(
        self,
        labels: Mapping[str, int],
        bright: str = "liver",
        dark: Sequence[str] = ("portal_vein", "hepatic_vein", "hcc"),
        min_contrast: float = 0.05,
        min_class_voxels: int = 20,
        max_tries: int = 3,
    ) -> None:
        unknown = [name for name in [bright, *dark] if name not in labels]
        if unknown:
            raise BundleInputError(
                f"config 'quality_gate': classes {unknown} are not among the labels {sorted(labels)}"
            )
        if not 0.0 <= float(min_contrast) <= 1.0:
            raise BundleInputError(f"config 'quality_gate#min_contrast' must lie in [0, 1], got {min_contrast}")
        if int(max_tries) < 1 or int(min_class_voxels) < 1:
            raise BundleInputError(
                f"config 'quality_gate': max_tries and min_class_voxels must be at least 1, got {max_tries}, {min_class_voxels}"
            )
        self.bright = (bright, int(labels[bright]))
        self.dark = [(name, int(labels[name])) for name in dark]
        self.min_contrast = float(min_contrast)
        self.min_class_voxels = int(min_class_voxels)
        self.max_tries = int(max_tries)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict[str, Any]:
        """The verdict on one volume on the model grid (intensities in [0, 1]): ``passed``, ``margin`` (the smallest
        contrast minus ``min_contrast``, to rank failed attempts) and the contrast per judged class."""
        image = np.asarray(image, dtype=np.float64)
        bright_name, bright_id = self.bright
        num_classes = 1 + max(bright_id, *(class_id for _, class_id in self.dark))
        sums, counts = class_intensity_sums(image, np.asarray(label), num_classes)
        means = class_means(sums, counts)
        if counts[bright_id] < self.min_class_voxels:
            return {"passed": True, "margin": None, "contrast": {}, "note": f"too little {bright_name} to judge"}
        bright_mean = float(means[bright_id])
        contrasts = {}
        for name, class_id in self.dark:
            if counts[class_id] >= self.min_class_voxels:
                contrasts[name] = round(bright_mean - float(means[class_id]), 4)
        if not contrasts:
            return {"passed": True, "margin": None, "contrast": {}, "note": "no dark class large enough to judge"}
        margin = min(contrasts.values()) - self.min_contrast
        return {"passed": bool(margin >= 0), "margin": round(margin, 4), "contrast": contrasts}


def build_quality_gate(labels: Mapping[str, int], enabled: Any, settings: Mapping[str, Any]) -> HBPQualityGate | None:
    """The ``quality_gate_settings`` as an :class:`HBPQualityGate`, or ``None`` when ``enabled`` is false."""
    return HBPQualityGate(labels=labels, **settings) if as_bool(enabled, "quality_gate_enabled") else None
