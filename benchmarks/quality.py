# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Quality beside speed: the numbers a sampler setting is reported with, computed on its own outputs.

A faster sampler is only worth having at equal quality, so every setting of the sampling suite
passes the images it generated (on the model grid, with the label maps they were generated from)
through :func:`quality_report`: mask fidelity (``scripts.evaluation.mask_fidelity``: mean intensity per class
and the HBP contrast liver - (vessels ∪ HCC)) and the 2.5D FID of ``configs/evaluate.yaml``
(``scripts.evaluation.fid``, with its offline default extractor, the shipped stage-1 encoder) against the
real test split of the phantom dataset, next to the FID between two halves of that split. It
means something only for trained weights; with seeded random weights the report is ``None`` with
the reason. More metrics: one more entry of :data:`QUALITY_METRICS`, a function
``(images, labels, context) -> dict | None``. FID needs many volumes: with the suite's few masks
it ranks settings only roughly (raise ``--num-masks``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from benchmarks.common import BUNDLE_ROOT, MODELS
from scripts.evaluation.mask_fidelity import ClassIntensityMeans, MaskContrast

#: Real volumes the FID compares against: the test split of the demo phantom dataset.
REFERENCE_DATASET = BUNDLE_ROOT / "datasets" / "phantom"

__all__ = ["QUALITY_METRICS", "mask_fidelity", "quality_report"]


def mask_fidelity(
    images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], context: Mapping[str, Any]
) -> dict[str, Any]:
    """Per-class mean intensity and the bright-dark contrast, pooled over all volumes and per volume.

    ``images`` and ``labels`` are channel-first ``(1, *spatial)`` tensors on the model grid.
    """
    means = ClassIntensityMeans(labels=context["labels"], prefix="")
    means.update((list(images), list(labels)))
    result = dict(means.compute())
    per_volume = []
    for image, label in zip(images, labels, strict=True):
        metric = MaskContrast(labels=context["labels"], prefix="")
        metric.update(([image], [label]))
        per_volume.append(metric.compute())
    result["contrast_per_volume"] = per_volume
    return result


@functools.lru_cache(maxsize=1)
def _fid_reference() -> tuple[Any, list[dict[str, torch.Tensor]]] | None:
    """The 2.5D protocol with the offline extractor, and the features of the real test volumes."""
    datalist = REFERENCE_DATASET / "datalist.json"
    autoencoder_path = MODELS / "autoencoder.pt"
    if not datalist.is_file() or not autoencoder_path.is_file():
        return None
    from monai.bundle import ConfigParser

    from scripts.core.checkpoints import load_network_weights
    from scripts.data.cases import load_datalist
    from scripts.evaluation.fid import fid_protocol

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "common.yaml"))
    autoencoder = parser.get_parsed_content("autoencoder_def", instantiate=True)
    load_network_weights(autoencoder, str(autoencoder_path), "autoencoder", "autoencoder weights")
    protocol = fid_protocol(
        2,
        "autoencoder",
        autoencoder=autoencoder,
        autoencoder_path=str(autoencoder_path),
        compression=parser.get_parsed_content("autoencoder_compression"),
    )
    preprocessing = parser.get_parsed_content("pair_preprocessing", instantiate=True)
    cases = load_datalist(str(datalist), str(REFERENCE_DATASET), "test")
    real = [protocol.volume_features(preprocessing(case)["image"].as_tensor()) for case in cases]
    return protocol, real


def fid_2_5d(
    images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], context: Mapping[str, Any]
) -> dict[str, Any] | None:
    """2.5D FID (offline autoencoder extractor) of ``images`` against the real test split, and the
    FID between two halves of that split for scale; None without the phantom dataset."""
    reference = _fid_reference()
    if reference is None:
        return None
    protocol, real = reference
    synthetic = [protocol.volume_features(image) for image in images]
    distance = protocol.distance(synthetic, real)
    halves = protocol.distance(real[0::2], real[1::2])
    return {
        "fid_2_5d": distance["mean"],
        "per_plane": {p: distance[p] for p in ("xy", "yz", "zx")},
        "real_halves_fid_2_5d": halves["mean"],
        "real_volumes": len(real),
        "extractor": "offline stage-1 encoder (models/autoencoder.pt): not comparable with published FIDs",
    }


#: name -> metric function; each entry becomes a key of the quality report.
QUALITY_METRICS: dict[str, Callable[..., dict[str, Any] | None]] = {"mask_fidelity": mask_fidelity, "fid": fid_2_5d}


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
    reason = None if report.get("fid") is not None else f"fid: no real reference ({REFERENCE_DATASET}/datalist.json)"
    report["num_volumes"] = len(images)
    return {"quality": report, "quality_reason": reason}
