# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""A finer grid aligned with the model grid, for a decoder that decodes onto it (``decoder_upsampling``).

The refined grid splits each model-grid voxel into ``factor`` voxels per axis: same field of view, voxel centres
placed symmetrically around the coarse centre, so a nearest ``factor``-times upsampling of a model-grid volume
lands exactly on it. Image and label are resampled once, from the case as read (after RAS reorientation), never
from the coarse volume; the image takes the intensity scale of the model-grid image (the same percentiles), so a
decoder trained to reproduce the fine image and an encoder reading the coarse one see one scale.

MONAI resamples onto a given affine (``SpatialResample``), but has no transform that derives that affine from
another key's grid, nor one that reuses the percentiles another key was scaled with; hence these two.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, SpatialResample
from monai.transforms.utils_pytorch_numpy_unification import percentile

__all__ = ["refinement", "RecordIntensityRanged", "RefinedGridd"]


def refinement(factor: int) -> torch.Tensor:
    """Voxel-to-voxel affine from the refined grid to the coarse one: coarse index = (fine index + 1/2) / factor - 1/2."""
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] /= factor
    matrix[:3, 3] = (1.0 / factor - 1.0) / 2.0
    return matrix


class RecordIntensityRanged(MapTransform):
    """Store the ``lower`` and ``upper`` percentiles of ``key`` under ``range_key``, computed as MONAI's
    ``ScaleIntensityRangePercentilesd`` computes them (put it right before that transform)."""

    def __init__(self, key: str, lower: float, upper: float, range_key: str) -> None:
        super().__init__(keys=key)
        self.lower, self.upper, self.range_key = float(lower), float(upper), range_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.keys[0]]
        d[self.range_key] = (float(percentile(image, self.lower)), float(percentile(image, self.upper)))
        return d


class RefinedGridd(MapTransform):
    """Resample ``keys`` (the case as read, RAS) onto the ``factor``-times refinement of ``reference_key``'s grid.

    Args:
        keys: the image and label copies to resample, in the order of ``modes``.
        reference_key: a volume already on the model grid (its affine and size define the refined grid).
        factor: voxels per model-grid voxel and axis.
        modes: interpolation per key (``bilinear`` for images, ``nearest`` for labels).
        range_key: where :class:`RecordIntensityRanged` stored the model-grid image's intensity range; keys
            resampled with ``bilinear`` are scaled by it onto [0, 1] (clipped). The entry is removed. ``None``:
            labels only.
    """

    def __init__(
        self, keys: Sequence[str], reference_key: str, factor: int, modes: Sequence[str], range_key: str | None = None
    ) -> None:
        super().__init__(keys=keys)
        if len(modes) != len(self.keys):
            raise ValueError("RefinedGridd needs one interpolation mode per key")
        if range_key is None and any(mode != "nearest" for mode in modes):
            raise ValueError("RefinedGridd scales images by a recorded intensity range: give range_key")
        self.reference_key, self.factor, self.modes, self.range_key = reference_key, int(factor), list(modes), range_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d[self.reference_key]
        affine = torch.as_tensor(reference.affine, dtype=torch.float64) @ refinement(self.factor)
        size = [self.factor * int(s) for s in reference.shape[1:]]
        low, high = d.pop(self.range_key) if self.range_key else (0.0, 1.0)
        for key, mode in zip(self.keys, self.modes, strict=True):
            volume = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            resampled = SpatialResample(mode=mode, padding_mode="zeros")(
                volume.float(), dst_affine=affine, spatial_size=size
            )
            if mode != "nearest":
                resampled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(resampled)
            d[key] = resampled
        return d
