# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Realism measures that do not take their features from the generator: texture and sharpness per
class, and a classifier two-sample test.

A generator can follow its masks (right class intensities, a segmenter finds the structures) and
still be told from real scans at a glance: smooth where the data has grain, soft where it has edges.
FIDs built on the generator's own encoder miss that. The measures here look at the images only.

Paired measures (:func:`paired_measures`) compare an image with the real image of the same mask,
each scaled by its own 1st-99th percentiles: contrast liver - (vessels, HCC), Otsu-threshold Dice of
the dark structures, HCC conspicuity, liver grain (high-pass detail inside the eroded liver), body
detail (the same in the body outside the labels) and structure edges (gradient magnitude on the
vessel and HCC boundaries), plus the share of spectral power above 0.25 cycles/voxel and the slope of
the radially averaged power spectrum. MONAI has no texture statistics of this kind (its metrics
compare images voxel by voxel or by learned features), hence the numpy/scipy code.

The classifier two-sample test (:func:`classifier_two_sample_test`) trains a small MONAI ``ResNet``
(fully convolutional with global pooling: trained on cubes, scored on whole volumes) to tell two
sets apart, k-fold with the folds grouped by mask (so a mask's two images are never
split between training and testing), and reports accuracy and ROC AUC (MONAI's
``compute_roc_auc``) with their spread over folds: 0.5 means the sets cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.networks.nets import ResNet
from scipy import ndimage
from tqdm import tqdm

__all__ = ["scale_by_percentiles", "noise_level", "paired_measures", "spectral_measures", "classifier_two_sample_test"]

#: Measures for which a degraded (blurred, denoised) image scores lower than the real one.
SHARPNESS_MEASURES = ("liver_grain", "body_detail", "structure_edges", "high_frequency_share")


def scale_by_percentiles(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """``image`` mapped so that its ``low`` and ``high`` percentiles become 0 and 1 (not clipped)."""
    image = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(image, [low, high])
    return (image - lo) / max(hi - lo, 1e-8)


def noise_level(image: np.ndarray, region: np.ndarray) -> float:
    """Standard deviation of the voxel noise inside ``region`` (a homogeneous tissue, e.g. the liver),
    relative to the region's median intensity.

    The residual of each voxel against the mean of its 6 face neighbours removes what varies slowly
    (texture, bias field) and keeps uncorrelated noise with variance sigma^2 (1 + 1/6); its median
    absolute deviation makes the estimate robust to the vessels and edges left in the region. The
    region is eroded twice first so that its border does not count. NaN for a region too small.
    """
    image = np.asarray(image, dtype=np.float64)
    inner = ndimage.binary_erosion(np.asarray(region, dtype=bool), iterations=2)
    if inner.sum() < 100:
        return float("nan")
    kernel = np.zeros((3, 3, 3))
    kernel[1, 1, 1] = 1.0
    for offset in ((0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)):
        kernel[offset] = -1.0 / 6.0
    residual = ndimage.convolve(image, kernel, mode="nearest")[inner]
    deviation = 1.4826 * np.median(np.abs(residual - np.median(residual)))  # the MAD as a Gaussian sigma
    return float(deviation / np.sqrt(1.0 + 1.0 / 6.0) / max(np.median(image[inner]), 1e-8))


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (between-class variance maximised over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[int(np.argmax(between[:-1]))])


def spectral_measures(image: np.ndarray, cutoff: float = 0.25) -> dict[str, float]:
    """Share of spectral power above ``cutoff`` cycles/voxel and the log-log slope of the radial spectrum."""
    image = np.asarray(image, dtype=np.float64)
    power = np.abs(np.fft.fftn(image - image.mean())) ** 2
    radius = np.sqrt(sum(f**2 for f in np.meshgrid(*[np.fft.fftfreq(n) for n in image.shape], indexing="ij")))
    share = float(power[radius > cutoff].sum() / max(power[radius > 0].sum(), 1e-12))
    bins = np.linspace(1.0 / min(image.shape), 0.5, 16)
    which = np.digitize(radius, bins)
    freqs, means = [], []
    for k in range(1, len(bins)):
        ring = which == k
        if ring.any():
            freqs.append(radius[ring].mean())
            means.append(power[ring].mean())
    slope = float(np.polyfit(np.log(freqs), np.log(np.maximum(means, 1e-20)), 1)[0]) if len(freqs) > 2 else float("nan")
    return {"high_frequency_share": share, "spectral_slope": slope}


def paired_measures(image: np.ndarray, label: np.ndarray, labels: Mapping[str, int]) -> dict[str, float]:
    """The realism measures of one image on its label map (bundle ids), image scaled by its own percentiles.

    Compare each with the same measure of the real image of the same mask (generated / real).
    NaN where a measure's structures are missing (e.g. no HCC in the mask).
    """
    image = scale_by_percentiles(image)
    label = np.asarray(label)
    liver = label == labels["liver"]
    hcc = label == labels["hcc"]
    dark = np.isin(label, [labels["portal_vein"], labels["hepatic_vein"], labels["hcc"]])
    nan = float("nan")
    measures: dict[str, float] = {}
    measures["contrast"] = float(image[liver].mean() - image[dark].mean()) if liver.any() and dark.any() else nan
    foreground = label > 0
    if dark.any() and foreground.any():
        below = (image < _otsu(image[foreground])) & foreground
        measures["threshold_dice"] = float(2 * (below & dark).sum() / max(below.sum() + dark.sum(), 1))
    else:
        measures["threshold_dice"] = nan
    liver_std = image[liver].std() if liver.any() else nan
    measures["hcc_conspicuity"] = float((image[liver].mean() - image[hcc].mean()) / liver_std) if hcc.any() else nan
    high_pass = image - ndimage.gaussian_filter(image, sigma=1.0)
    inner_liver = ndimage.binary_erosion(liver, iterations=1)
    measures["liver_grain"] = float(high_pass[inner_liver].std()) if inner_liver.any() else nan
    measures["body_detail"] = nan
    if liver.any():  # the body: brighter than a tenth of the liver, away from the labelled structures
        body = (image > 0.1 * image[liver].mean()) & ~ndimage.binary_dilation(foreground, iterations=2)
        measures["body_detail"] = float(high_pass[body].std()) if body.any() else nan
    boundary = dark & ~ndimage.binary_erosion(dark)
    gradient = np.sqrt(sum(g**2 for g in np.gradient(image)))
    measures["structure_edges"] = float(gradient[boundary].mean()) if boundary.any() else nan
    measures.update(spectral_measures(image))
    return measures


def _crops(volume: torch.Tensor, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random cubes of side ``size`` (at most the volume's) from a ``(1, *spatial)`` volume."""
    spatial = volume.shape[1:]
    sides = [min(size, s) for s in spatial]
    out = []
    for _ in range(count):
        start = [
            int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(spatial, sides, strict=True)
        ]
        window = tuple(slice(b, b + c) for b, c in zip(start, sides, strict=True))
        out.append(volume[(slice(None), *window)])
    return torch.stack(out)


def _small_resnet(channels: Sequence[int]) -> torch.nn.Module:
    """A 3D ResNet with one basic block on each of its four levels (``channels``: four widths), no stem
    pooling, global pooling and one logit."""
    return ResNet(
        block="basic",
        layers=[1] * len(channels),
        block_inplanes=list(channels),
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
        num_classes=1,
    )


def classifier_two_sample_test(
    real: Sequence[np.ndarray],
    other: Sequence[np.ndarray],
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    epochs: int = 20,
    crop: int = 48,
    batch_size: int = 4,
    channels: Sequence[int] = (8, 16, 32, 32),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a small 3D CNN to tell ``other`` from ``real``; accuracy and AUC per fold and their spread.

    ``groups`` (one per volume of ``real`` then ``other``; default: the i-th volumes of both sets share a
    group, as two images of one mask do) keep a group's volumes in one fold. Each volume is scaled by
    its own percentiles; the network trains on random ``crop``^3 cubes, ``batch_size`` volumes a step,
    and scores whole test volumes.
    """
    volumes = [torch.as_tensor(scale_by_percentiles(v), dtype=torch.float32)[None] for v in (*real, *other)]
    targets = torch.tensor([0.0] * len(real) + [1.0] * len(other))
    groups = list(groups) if groups is not None else [*range(len(real)), *range(len(other))]
    unique = sorted(set(groups), key=str)
    rng = np.random.default_rng(seed)
    fold_order = [unique[i] for i in rng.permutation(len(unique))]
    folds = max(2, min(folds, len(unique)))
    accuracies, aucs = [], []
    for fold in tqdm(range(folds), desc="classifier two-sample test", unit="fold", disable=not progress):
        held_out = set(fold_order[fold::folds])
        test = [i for i, g in enumerate(groups) if g in held_out]
        train = [i for i, g in enumerate(groups) if g not in held_out]
        if len({float(targets[i]) for i in test}) < 2 or len({float(targets[i]) for i in train}) < 2:
            continue
        torch.manual_seed(seed + fold)
        generator = torch.Generator().manual_seed(seed + fold)
        network = _small_resnet(channels)
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        loss_function = torch.nn.BCEWithLogitsLoss()
        network.train()
        for _ in range(epochs):
            shuffled = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(shuffled), batch_size):
                chosen = [train[i] for i in shuffled[start : start + batch_size]]
                batch = torch.cat([_crops(volumes[i], crop, 1, generator) for i in chosen])
                optimizer.zero_grad()
                loss = loss_function(network(batch).flatten(), targets[chosen])
                loss.backward()
                optimizer.step()
        network.eval()
        with torch.no_grad():  # whole volumes: global pooling takes any size
            scores = torch.stack([network(volumes[i][None]).flatten()[0] for i in test])
        truth = targets[test]
        accuracies.append(float(((scores > 0).float() == truth).float().mean()))
        aucs.append(float(compute_roc_auc(torch.sigmoid(scores), truth)))
    if not aucs:
        raise ValueError("classifier two-sample test: no fold held volumes of both sets; give more masks")
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "auc": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "folds": len(aucs),
        "volumes": [len(real), len(other)],
    }
