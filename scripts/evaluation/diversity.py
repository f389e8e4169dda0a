# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Diversity of a set of volumes: mean MS-SSIM between pairs of its members.

High MS-SSIM between two different samples means they look alike: a generator whose samples
score much higher than pairs of real volumes collapses onto few modes. Pairs are disjoint
(volumes 0-1, 2-3, ... of a seeded shuffled order), so a pass over the set holds one volume
in memory at a time.

MONAI's ``MultiScaleSSIMMetric`` needs every side larger than ``(kernel_size - 1) * (levels - 1) ** 2``
(its check) and the coarsest of the ``levels`` scales (``side / 2 ** (levels - 1)``) at least one
kernel wide. With the usual kernel of 7 that means volumes over 96 voxels a side, so the bundle
uses ``kernel_size`` 3 and, on grids too small for the five standard scales, drops the coarsest
ones and renormalises the remaining standard weights (:func:`ms_ssim_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric

from scripts.core.errors import BundleInputError

__all__ = ["STANDARD_WEIGHTS", "ms_ssim_weights", "PairwiseMsSsim"]

#: Scale weights of Wang et al. (2003), finest scale first: MONAI's default.
STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_weights(spatial_size: Sequence[int], kernel_size: int = 3, levels: int | None = None) -> tuple[float, ...]:
    """Scale weights for volumes of ``spatial_size``: the first ``levels`` standard weights, renormalised.

    ``levels=None`` takes as many of the five standard scales as the smallest side allows.
    """
    side = min(int(s) for s in spatial_size)

    def fits(n: int) -> bool:
        return side // max(1, n - 1) ** 2 > kernel_size - 1 and side // 2 ** (n - 1) >= kernel_size

    if levels is None:
        levels = next((n for n in range(len(STANDARD_WEIGHTS), 0, -1) if fits(n)), 0)
        if levels == 0:
            raise BundleInputError(
                f"MS-SSIM: volumes of {list(spatial_size)} voxels are too small for kernel_size {kernel_size}"
            )
    elif not 1 <= levels <= len(STANDARD_WEIGHTS) or not fits(levels):
        raise BundleInputError(
            f"config 'ms_ssim_levels' {levels} does not fit volumes of {list(spatial_size)} voxels with kernel_size "
            f"{kernel_size}; use null (as many as fit)"
        )
    chosen = STANDARD_WEIGHTS[:levels]
    return tuple(w / sum(chosen) for w in chosen)


class PairwiseMsSsim:
    """Mean MS-SSIM over disjoint pairs of the volumes fed to :meth:`update` in turn.

    Args:
        spatial_size: size of every volume (the model grid).
        kernel_size: Gaussian window size (3 on small grids, see the module docstring).
        levels: number of scales, ``None``: as many as fit.
        max_pairs: stop pairing after this many pairs (``None``: every consecutive pair).
        data_range: intensity range of the volumes (preprocessed images lie in [0, 1]).
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        kernel_size: int = 3,
        levels: int | None = None,
        max_pairs: int | None = 100,
        data_range: float = 1.0,
    ) -> None:
        self.weights = ms_ssim_weights(spatial_size, kernel_size, levels)
        self.kernel_size = int(kernel_size)
        self.max_pairs = None if max_pairs is None else int(max_pairs)
        self.metric = MultiScaleSSIMMetric(
            spatial_dims=len(spatial_size), data_range=data_range, kernel_size=kernel_size, weights=self.weights
        )
        self.reset()

    def reset(self) -> None:
        self._pending: torch.Tensor | None = None
        self._values: list[float] = []

    def update(self, image: torch.Tensor) -> None:
        """Take the next channel-first volume ``(1, X, Y, Z)``; every second one closes a pair."""
        if self.max_pairs is not None and len(self._values) >= self.max_pairs:
            return
        if self._pending is None:
            self._pending = image.detach().float().cpu()
            return
        value = self.metric(image.detach().float().cpu()[None], self._pending[None])
        self._values.append(float(value.mean()))
        self._pending = None

    @property
    def num_pairs(self) -> int:
        return len(self._values)

    def compute(self) -> float | None:
        """Mean MS-SSIM of the pairs seen; ``None`` with fewer than two volumes."""
        return sum(self._values) / len(self._values) if self._values else None

    def settings(self) -> dict[str, object]:
        return {
            "kernel_size": self.kernel_size,
            "weights": [round(w, 6) for w in self.weights],
            "max_pairs": self.max_pairs,
            "pairs": "disjoint consecutive pairs of a seeded shuffled order",
        }
