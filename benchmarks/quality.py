# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Quality beside speed: the numbers a sampler setting is reported with, computed on its own outputs.

A faster sampler is only worth having at equal quality, so every setting of the sampling suite
passes the images it generated (on the model grid, with the label maps they were generated from)
through :func:`quality_report`. Today that is mask fidelity (``scripts.mask_fidelity``: mean
intensity per class and the HBP contrast liver - (vessels ∪ HCC)). It means something only for
trained weights; with seeded random weights the report is ``None`` with the reason.

Hook for FID: the evaluation module (FID 2.5D/3D, MS-SSIM) is written separately. Add it as one
more entry of :data:`QUALITY_METRICS`: a function ``(images, labels, context) -> dict | None``
(``context`` holds ``labels`` (class ids), ``device`` and ``reference_dataset``), e.g.
``QUALITY_METRICS["fid"] = fid_against_reference``. FID needs many volumes: raise the suite's
``--num-masks`` (or sample several seeds per mask) when it is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from scripts.mask_fidelity import ClassIntensityMeans, MaskContrast

__all__ = ["QUALITY_METRICS", "mask_fidelity", "quality_report"]


def mask_fidelity(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], context: Mapping[str, Any]) -> dict[str, Any]:
    """Per-class mean intensity and the bright-dark contrast, pooled over all volumes and per volume.

    ``images`` and ``labels`` are channel-first ``(1, *spatial)`` tensors on the model grid.
    """
    means = ClassIntensityMeans(labels=context["labels"], prefix="")
    means.update((list(images), list(labels)))
    result = dict(means.compute())
    per_volume = []
    for image, label in zip(images, labels):
        metric = MaskContrast(labels=context["labels"], prefix="")
        metric.update(([image], [label]))
        per_volume.append(metric.compute())
    result["contrast_per_volume"] = per_volume
    return result


def fid_not_available(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], context: Mapping[str, Any]) -> None:
    """Placeholder until the evaluation module's FID is wired in (see the module docstring)."""
    return None


#: name -> metric function; each entry becomes a key of the quality report.
QUALITY_METRICS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "mask_fidelity": mask_fidelity,
    "fid": fid_not_available,
}


def quality_report(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    class_ids: Mapping[str, int],
    reason_unavailable: str | None = None,
) -> dict[str, Any]:
    """``{"quality": {metric: value} | None, "quality_reason": str | None}`` for one sampler setting.

    ``reason_unavailable`` (e.g. "random weights") turns the report into ``None`` with that reason.
    """
    if reason_unavailable is not None:
        return {"quality": None, "quality_reason": reason_unavailable}
    context = {"labels": dict(class_ids)}
    images = [i.detach().float().cpu() for i in images]
    labels = [l.detach().cpu() for l in labels]
    report = {name: metric(images, labels, context) for name, metric in QUALITY_METRICS.items()}
    reason = None if report.get("fid") is not None else "fid: evaluation module not wired in yet (benchmarks/quality.py)"
    report["num_volumes"] = len(images)
    return {"quality": report, "quality_reason": reason}
