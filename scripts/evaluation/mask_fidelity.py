# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Mask fidelity of generated images: do intensities follow the label map they were made from?

In hepatobiliary-phase MRI the enhancing liver parenchyma is bright and the portal vein, hepatic
veins and HCC are dark. A generator that follows its mask reproduces that per-class ordering, so
the metrics here are the mean generated intensity per label class and the contrast

    mean(bright classes) - mean(dark classes),   by default  mean(liver) - mean(HCC ∪ vessels),

each pooled over all voxels of the class across the validation set (so a case without HCC does
not leave a hole). MONAI has per-class overlap metrics for segmentations but nothing that scores
intensities per label, hence these small ignite metrics. Under DDP the sums are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.metrics.metric import Metric, reinit__is_reduced, sync_all_reduce

from scripts.core.errors import BundleInputError
from scripts.data.labels import class_intensity_sums, class_means

__all__ = ["contrast", "ClassIntensityMeans", "MaskContrast"]


def contrast(
    sums: Sequence[float] | torch.Tensor,
    counts: Sequence[int] | torch.Tensor,
    bright: Sequence[int],
    dark: Sequence[int],
) -> float:
    """``mean(bright classes) - mean(dark classes)``, voxels pooled within each group; NaN if a group is empty."""
    sums, counts = torch.as_tensor(sums, dtype=torch.float64), torch.as_tensor(counts, dtype=torch.float64)
    bright_count, dark_count = counts[list(bright)].sum(), counts[list(dark)].sum()
    if bright_count == 0 or dark_count == 0:
        return float("nan")
    return float(sums[list(bright)].sum() / bright_count - sums[list(dark)].sum() / dark_count)


def _class_ids(labels: Mapping[str, int], names: Sequence[str], setting: str) -> list[int]:
    unknown = [n for n in names if n not in labels]
    if unknown or not names:
        raise BundleInputError(
            f"config {setting!r}: {unknown or 'no classes'} not among the label classes {sorted(labels)}"
        )
    return [int(labels[n]) for n in names]


class ClassIntensityMeans(Metric):
    """Mean generated intensity per label class, plus the bright-dark contrast.

    ``update`` takes ``(images, labels)``: batch-first tensors or lists of channel-first ones
    (MONAI's decollated engine output), images ``(1, *spatial)``, labels in bundle ids.
    ``compute`` returns ``{"<prefix>mean_<class>": ..., "<prefix>contrast": ...}``, and
    ``"<prefix>real_contrast"`` when the real images' per-class ``reference`` sums are given,
    so the generated contrast can be read against the data's.

    Args:
        labels: class name -> bundle id.
        bright: class names expected bright (HBP: the liver).
        dark: class names expected dark (HBP: portal vein, hepatic vein, HCC).
        reference: ``(sums, counts)`` of real image intensities per class
            (``scripts.data.latent_cache.LatentCache.class_intensity_sums``).
        prefix: name prefix of the reported values.
    """

    def __init__(
        self,
        labels: Mapping[str, int],
        bright: Sequence[str] = ("liver",),
        dark: Sequence[str] = ("portal_vein", "hepatic_vein", "hcc"),
        reference: tuple[Sequence[float], Sequence[int]] | None = None,
        prefix: str = "val_",
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.labels = {str(k): int(v) for k, v in labels.items()}
        self.bright = _class_ids(self.labels, list(bright), "contrast_bright_labels")
        self.dark = _class_ids(self.labels, list(dark), "contrast_dark_labels")
        self.reference = reference
        self.prefix = prefix
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="flatten")

    @reinit__is_reduced
    def reset(self) -> None:
        self._sums = torch.zeros(len(self.labels), dtype=torch.float64, device=self._device)
        self._counts = torch.zeros(len(self.labels), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        images, labels = output
        for image, label in zip(images, labels, strict=True):
            sums, counts = class_intensity_sums(image, torch.as_tensor(label).to(self._device), len(self.labels))
            self._sums += sums
            self._counts += counts

    @sync_all_reduce("_sums", "_counts")
    def compute(self) -> dict[str, float]:
        means = class_means(self._sums.cpu(), self._counts.cpu())
        result = {f"{self.prefix}mean_{name}": float(means[i]) for name, i in self.labels.items()}
        result[f"{self.prefix}contrast"] = contrast(self._sums.cpu(), self._counts.cpu(), self.bright, self.dark)
        if self.reference is not None:
            result[f"{self.prefix}real_contrast"] = contrast(*self.reference, self.bright, self.dark)
        return result


class MaskContrast(ClassIntensityMeans):
    """The contrast alone, as one number: a key metric (higher: the mask is followed more clearly).

    A generator that ignores its mask scores only what chance overlap of its anatomy with the mask
    gives (near 0 or below); the real data's value (``real_contrast`` of
    :class:`ClassIntensityMeans`) is what a faithful generator approaches.
    """

    @sync_all_reduce("_sums", "_counts")
    def compute(self) -> float:  # type: ignore[override]
        return contrast(self._sums.cpu(), self._counts.cpu(), self.bright, self.dark)
