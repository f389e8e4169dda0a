# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Realism on the grid the pairs are delivered on: each image against the real image of the same mask.

Generation samples on the model grid and resamples each volume onto its mask's own grid, where a user
trains on it. The model-grid measures cannot see what that round trip loses (stair-stepped edges, faded
thin vessels), so each synthetic image is also compared, on its mask's grid, with the real image of the
same mask (matched by mask name, as the classifier test's folds are) through
:func:`scripts.evaluation.realism.paired_measures`. The ratio synthetic / real is taken per case and
averaged over cases. Sets that exist only on the model grid (or a refining decoder's finer grid) come back
onto the real image's grid first: the real set itself (what the grid alone allows) and the reconstruction row
(what grid and decoder allow).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

from scripts.data.cases import read_nifti
from scripts.data.labels import LabelContract
from scripts.evaluation.realism import paired_measures

__all__ = ["DELIVERED_MEASURES", "DeliveredGridComparison"]

logger = logging.getLogger(__name__)

#: The paired measures reported on the delivered grid (the model card's targets are set in these).
DELIVERED_MEASURES = ("contrast", "threshold_dice", "hcc_conspicuity", "liver_grain", "body_detail", "structure_edges")


@dataclass
class _Reference:
    """The real image of one mask on its own grid: its label (bundle ids), grid and measures."""

    label: np.ndarray
    affine: np.ndarray
    measures: dict[str, float]


class DeliveredGridComparison:
    """Paired realism ratios on the delivered grid, against the real images of ``real_items``.

    Args:
        real_items: the real set's datalist entries (``image``, ``label``), keyed by ``mask_key``.
        mask_key: the mask an entry belongs to (``scripts.evaluation.evaluation.mask_key``).
        contract: the real labels' contract (``label_map`` applied as everywhere else).
    """

    def __init__(self, real_items: Sequence[Mapping[str, str]], mask_key, contract: LabelContract) -> None:
        self.mask_key = mask_key
        self.real = {mask_key(item): item for item in real_items}
        self.contract = contract
        self._references: dict[str, _Reference] = {}
        self._resample = ResampleToMatch(mode="bilinear", padding_mode="zeros")

    def _reference(self, key: str) -> _Reference:
        if key not in self._references:  # read once per mask, on first use
            item = self.real[key]
            image, affine = read_nifti(item["image"], role="image")
            label, _ = read_nifti(item["label"], role="label")
            label = np.asarray(self.contract.prepare(label, item["label"]))
            measures = paired_measures(image, label, self.contract.labels)
            self._references[key] = _Reference(label, affine, measures)
        return self._references[key]

    def _ratios(self, reference: _Reference, image: np.ndarray) -> dict[str, float]:
        measures = paired_measures(image, reference.label, self.contract.labels)
        out = {}
        for name in DELIVERED_MEASURES:
            real, synthetic = reference.measures[name], measures[name]
            finite = math.isfinite(real) and math.isfinite(synthetic) and abs(real) > 1e-12
            out[name] = synthetic / real if finite else float("nan")
        return out

    def from_files(self, item: Mapping[str, str]) -> dict[str, float] | None:
        """Ratios of a synthetic pair as written (image and label on the mask's grid); ``None`` when no real
        image has its mask, or the pair's grid or label map differs from it (an edited layout)."""
        key = self.mask_key(item)
        if key not in self.real or "label" not in item:
            return None
        reference = self._reference(key)
        image, affine = read_nifti(item["image"], role="image")
        label, _ = read_nifti(item["label"], role="label")
        if image.shape != reference.label.shape or not np.allclose(affine, reference.affine, atol=1e-3):
            logger.warning(f"{item['image']}: not on the grid of the real image of its mask: not compared there")
            return None
        if not np.array_equal(label, reference.label):
            return None  # another layout (edited mask): nothing real to compare it with
        return self._ratios(reference, image)

    def from_model_grid(self, item: Mapping[str, str], image: MetaTensor) -> dict[str, float] | None:
        """Ratios of an image of a real case on the model grid, or on a refining decoder's finer grid (channel
        first, with its affine), resampled onto that case's own grid as generation resamples its volumes."""
        key = self.mask_key(item)
        if key not in self.real:
            return None
        reference = self._reference(key)
        target = MetaTensor(torch.zeros((1, *reference.label.shape)), affine=torch.as_tensor(reference.affine))
        native = self._resample(image, img_dst=target)[0].numpy()
        return self._ratios(reference, native)

    @staticmethod
    def summary(ratios: Sequence[Mapping[str, float] | None]) -> dict[str, float | None] | None:
        """Mean ratio per measure over the cases where it is defined; ``None`` when no case was compared."""
        compared = [r for r in ratios if r is not None]
        if not compared:
            return None
        out: dict[str, float | None] = {"cases": len(compared)}
        for name in DELIVERED_MEASURES:
            values = [r[name] for r in compared if math.isfinite(r[name])]
            out[name] = float(np.mean(values)) if values else None
        return out
