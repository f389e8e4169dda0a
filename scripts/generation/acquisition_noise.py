# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Acquisition noise: the Rician noise of an MR magnitude image, added to each generated volume.

The decoder learns to reproduce real images under an L1 loss, so it renders their conditional median:
the scanner's noise averages out. On the demo data the generated liver's noise level
(:func:`scripts.evaluation.realism.noise_level`) is about a quarter of the real one (0.009 against
0.035 of the liver intensity), and the body outside the liver lacks its grain. Adding the noise back,
at a level drawn per output from the range measured on the training images, makes each output one
acquisition rather than the mean of many. MONAI's ``RandRicianNoise`` draws it (two Gaussian
channels, magnitude taken); its standard deviation is set relative to the output's median liver
intensity, so the setting does not depend on the intensity scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import RandRicianNoise

from scripts.core.errors import BundleInputError
from scripts.core.settings import as_optional

__all__ = ["AcquisitionNoise", "acquisition_noise"]


class AcquisitionNoise:
    """Rician noise with a standard deviation drawn per output from ``relative_sigma`` x the median
    intensity of the ``reference_label`` class (the liver).

    Args:
        relative_sigma: ``[low, high]`` noise standard deviation relative to the reference class's
            median intensity, drawn uniformly per output (``[s, s]``: always ``s``).
        reference_label: label id of the homogeneous class the level refers to.
    """

    def __init__(self, relative_sigma: Sequence[float], reference_label: int) -> None:
        self.low, self.high = (float(v) for v in relative_sigma)
        self.reference_label = int(reference_label)

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, float | None]:
        """``image`` (float32, on ``label``'s grid) with noise drawn from ``seed``, and the relative level
        used (None, and the image unchanged, when the label has no reference class)."""
        reference = np.asarray(label) == self.reference_label
        if not reference.any():
            return image, None
        rng = np.random.default_rng(seed)
        relative = float(rng.uniform(self.low, self.high))
        noise = RandRicianNoise(prob=1.0, std=relative * float(np.median(image[reference])), sample_std=False)
        noise.set_random_state(seed=int(rng.integers(2**31)))
        return np.asarray(noise(np.asarray(image, dtype=np.float32)[None]))[0].astype(np.float32), relative


def acquisition_noise(relative_sigma: Sequence[float] | None, reference_label: int) -> AcquisitionNoise | None:
    """The config's ``acquisition_noise`` setting (``[low, high]`` or null; its type is checked with the
    other settings) as a noise step: None for null or ``[0, 0]``, no noise."""
    relative_sigma = as_optional(relative_sigma)  # --acquisition_noise null arrives as text
    if relative_sigma is None:
        return None
    low, high = (float(v) for v in relative_sigma)
    if not 0.0 <= low <= high <= 0.5:
        raise BundleInputError(
            f"config 'acquisition_noise' must be [low, high] with 0 <= low <= high <= 0.5 (noise sigma relative to "
            f"the liver's median intensity), got {list(relative_sigma)}"
        )
    return None if high == 0.0 else AcquisitionNoise((low, high), reference_label)
