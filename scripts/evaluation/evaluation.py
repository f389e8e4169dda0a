# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluation of synthetic volumes against real ones: one pass per set, one table for all sets.

``configs/evaluate.yaml`` compares the real volumes of a datalist with one or more synthetic sets
(folders written by ``configs/inference.yaml``, ``configs/generate_unconditional.yaml`` or
``configs/inference_gan_baseline.yaml``). Every volume, real or synthetic, is brought onto the
model grid by the bundle's own preprocessing chain, then measured:

* FID, 2.5D and 3D protocols (:mod:`scripts.evaluation.fid`), synthetic set vs real set; the real row holds
  the FID between two halves of the real set, the value below which differences are noise;
* diversity: mean MS-SSIM of pairs within the set (:mod:`scripts.evaluation.diversity`);
* mask fidelity, for sets with label maps: a segmentation network trained on real data
  (``configs/train_segmentation.yaml``) segments the images, Dice per class against the label
  maps they were generated from; per-class intensity mean/std and the bright-dark contrast of
  :mod:`scripts.evaluation.mask_fidelity`; per-class intensity histograms.

Results go to ``metrics.json`` (everything, plus what it was measured with), ``metrics.md``
(one row per set, one column per metric) and ``intensity_histograms.png``, in an output folder
that appears only when complete (:mod:`scripts.core.outputs`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, MapTransform
from tqdm import tqdm

from scripts.core.checkpoints import load_checkpoint
from scripts.core.errors import BundleInputError
from scripts.core.outputs import markdown_table, staged_output
from scripts.core.settings import as_bool, as_optional
from scripts.data.cases import check_case, load_datalist, read_nifti
from scripts.data.labels import LabelContract, class_intensity_sums, class_means
from scripts.data.pairs import find_pairs
from scripts.evaluation.delivered import DELIVERED_MEASURES, DeliveredGridComparison
from scripts.evaluation.diversity import PairwiseMsSsim
from scripts.evaluation.fid import Fid3D, Fid25D
from scripts.evaluation.mask_fidelity import contrast
from scripts.evaluation.realism import classifier_two_sample_test, paired_measures
from scripts.generation.inference import on_refined_grid
from scripts.generation.quality_gate import HBPQualityGate
from scripts.models.autoencoder import load_autoencoder_weights
from scripts.models.segmentation import load_segmentation_weights, select_network
from scripts.networks.tiled_autoencoder import TiledAutoencoder

__all__ = [
    "NO_SEGMENTER_NOTICE",
    "VolumeSet",
    "image_only",
    "real_volume_set",
    "synthetic_volume_sets",
    "reconstruction_volume_set",
    "load_segmenter",
    "ClassIntensityStats",
    "SegmentationDice",
    "Evaluation",
    "table_of",
]

logger = logging.getLogger(__name__)

NO_SEGMENTER_NOTICE = (
    "mask-fidelity Dice skipped: no segmentation checkpoint configured (train one with "
    "configs/train_segmentation.yaml and pass --segmentation_checkpoint PATH)"
)
#: Every volume of a set (default ``part`` of :meth:`Evaluation._fid`).
_ALL = slice(None)
#: Name of the real set's row in the table.
REAL = "real"
#: Realism measures shown in the table, as the set's mean over the real set's.
REALISM_COLUMNS = ("liver_grain", "body_detail", "structure_edges", "high_frequency_share")
#: Name of the row of real volumes passed through the autoencoder (``reconstruction_row``).
RECONSTRUCTION = "reconstruction"


# ---------------------------------------------------------------------------------------- sets of volumes
@dataclass
class VolumeSet:
    """Volumes to evaluate: ``items`` are ``{"image": path[, "label": path]}``; ``transform``
    loads one and brings it onto the model grid."""

    name: str
    items: list[dict[str, str]]
    transform: Callable[[dict[str, str]], dict[str, Any]]
    source: str
    contract: LabelContract | None = None
    has_labels: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise BundleInputError(f"{self.source}: no volumes to evaluate in set {self.name!r}")
        self.has_labels = all("label" in item for item in self.items)

    def check(self) -> int:
        """Read every file once before any work (one line naming the first bad one)."""
        for item in tqdm(self.items, desc=f"checking {self.name}", unit="volume"):
            if "label" in item and self.contract is not None:
                check_case(item, self.contract)
            else:
                image, _ = read_nifti(item["image"], role="image")
                if not np.all(np.isfinite(image)):
                    raise BundleInputError(f"{item['image']}: image contains NaN or Inf values")
        return len(self.items)


def image_only(preprocessing: Compose) -> Compose:
    """The image half of a pair chain (``scripts.data.cases.preprocessing_transforms``): the same
    transforms, told to skip the absent label, so images without a label map go through the very
    same steps as paired ones."""
    transforms = []
    for transform in preprocessing.flatten().transforms:
        transform = deepcopy(transform)
        if isinstance(transform, MapTransform):
            transform.allow_missing_keys = True
        transforms.append(transform)
    return Compose(transforms)


def real_volume_set(
    datalist: str, dataset_dir: str, sections: str | Sequence[str], preprocessing: Compose, contract: LabelContract
) -> VolumeSet:
    """The real volumes (image + label) of ``sections`` of an MSD datalist."""
    sections = [sections] if isinstance(sections, str) else list(sections)
    items = [item for section in sections for item in load_datalist(datalist, dataset_dir, section)]
    return VolumeSet(REAL, items, preprocessing, f"{datalist} {sections}", contract)


def synthetic_volume_sets(
    folders: Mapping[str, str], preprocessing: Compose, contract: LabelContract
) -> list[VolumeSet]:
    """One set per ``name -> folder``; labels written by the bundle are already in bundle ids
    (``contract`` has no ``label_map``), images are brought to the grid by ``preprocessing``."""
    if not folders:
        raise BundleInputError("config 'synthetic': no synthetic sets given; pass --synthetic \"{'name': 'folder'}\"")
    if not isinstance(folders, Mapping):
        raise BundleInputError(f"config 'synthetic' must map set names to folders, got {folders!r}")
    sets = []
    for name, folder in folders.items():
        if str(name) == REAL:
            raise BundleInputError(f"config 'synthetic': the set name {REAL!r} is reserved for the real volumes")
        items = find_pairs(str(folder), labels_required=False)
        paired = all("label" in item for item in items)
        sets.append(
            VolumeSet(str(name), items, preprocessing if paired else image_only(preprocessing), str(folder), contract)
        )
    return sets


def reconstruction_volume_set(
    real: VolumeSet, autoencoder: TiledAutoencoder, autoencoder_path: str, synthetic: Sequence[VolumeSet]
) -> VolumeSet:
    """The real volumes encoded (latent mean) and decoded by the autoencoder at ``autoencoder_path``.

    Every generator decodes through this decoder, so no generated set can follow the masks better
    than this row does (Dice, contrast): it shows how much of a shortfall the decoder causes and how
    much the diffusion stages. Decoded images are clipped to [0, 1] as generated ones are.

    A refining decoder (``decoder_upsampling`` k) decodes, as generation does, on the grid ``2**k`` times finer
    than the model grid, with the case's label map resampled there from its file; its encoder reads the model-grid
    image (given as its nearest upsampling, whose means it takes). The row's model-grid image is then the mean of
    each coarse voxel's fine voxels (what trilinear resampling onto the model grid gives), and the fine image, kept
    as ``decoded``, is what the delivered-grid measures resample onto the case's own grid.
    """
    if any(volume_set.name == RECONSTRUCTION for volume_set in synthetic):
        raise BundleInputError(
            f"config 'synthetic': the set name {RECONSTRUCTION!r} is reserved for the reconstruction row"
        )
    load_autoencoder_weights(autoencoder.autoencoder, autoencoder_path)
    factor = 2 ** int(getattr(autoencoder.autoencoder, "decoder_upsampling", 0))

    def decode_label(pair: dict[str, Any], path: str) -> MetaTensor:
        """The label map the decoder reads: the model-grid one, or the file's resampled onto the refined grid."""
        if factor == 1:
            return pair["label"]
        label, affine = read_nifti(path, role="label")
        label = np.asarray(real.contract.prepare(label, path), dtype=np.float32)
        return on_refined_grid(
            MetaTensor(torch.as_tensor(label[None]), affine=torch.as_tensor(affine)), pair["label"], factor
        )

    def reconstruct(item: dict[str, str]) -> dict[str, Any]:
        pair = real.transform(dict(item))
        image = pair["image"]
        fine = torch.nn.functional.interpolate(_plain(image)[None], scale_factor=factor, mode="nearest")
        latent = autoencoder.encode(fine)
        # a label-guided decoder reads the case's own label map, as generation reads the input mask
        label = decode_label(pair, item["label"])
        condition = real.contract.one_hot(_plain(label)[None]).float() if autoencoder.label_guided else None
        decoded = autoencoder.decode(latent, condition).clamp(0.0, 1.0).cpu()
        out = {**pair, "decoded": MetaTensor(decoded[0], affine=label.affine) if factor > 1 else None}
        decoded = torch.nn.functional.avg_pool3d(decoded, factor)[0] if factor > 1 else decoded[0]
        out["image"] = MetaTensor(decoded, meta=image.meta) if isinstance(image, MetaTensor) else decoded
        return out

    return VolumeSet(
        RECONSTRUCTION, list(real.items), reconstruct, f"{real.source} through {autoencoder_path}", real.contract
    )


# ---------------------------------------------------------------------------------------- mask fidelity
def load_segmenter(
    checkpoint_path: str | None,
    networks: Mapping[str, Callable[[], torch.nn.Module]],
    labels: Mapping[str, int],
    device: torch.device | str = "cpu",
) -> torch.nn.Module | None:
    """The segmentation network of a ``configs/train_segmentation.yaml`` checkpoint, in eval mode.

    The architecture is the one the checkpoint records (``network``), built from ``networks``
    (that config's constructors, so size overrides given there apply here too). ``None`` with a
    logged notice when no checkpoint is configured.
    """
    if not checkpoint_path:
        logger.warning(NO_SEGMENTER_NOTICE)
        return None
    checkpoint = load_checkpoint(checkpoint_path, "segmentation weights")
    name = checkpoint.get("network")
    if not isinstance(name, str):
        raise BundleInputError(
            f"{checkpoint_path}: segmentation checkpoint does not record its 'network'; "
            "save it with configs/train_segmentation.yaml"
        )
    network = select_network(networks, name)()
    load_segmentation_weights(network, checkpoint_path, {"network": name, "labels": dict(labels)})
    logger.info(f"mask fidelity: segmenting with {name} from {checkpoint_path} (epoch {checkpoint.get('epoch')})")
    return network.to(device).eval().requires_grad_(False)


class SegmentationDice:
    """Dice per foreground class of a segmentation network's output against the given label maps.

    A class absent from a case's label map has no Dice in that case (MONAI's ``ignore_empty``);
    each class is averaged over the cases that have it, the mean over the classes measured.
    """

    def __init__(self, segmenter: torch.nn.Module, inferer: Callable, contract: LabelContract) -> None:
        self.segmenter = segmenter
        self.inferer = inferer
        self.contract = contract
        self.metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, image: torch.Tensor, label: torch.Tensor) -> None:
        device = next(self.segmenter.parameters()).device
        logits = self.inferer(image[None].float().to(device), self.segmenter)
        prediction = one_hot(logits.argmax(dim=1, keepdim=True), self.contract.num_classes)
        target = one_hot(label[None].long().to(device), self.contract.num_classes)
        self.rows.append(self.metric(prediction, target).detach().cpu().double()[0])

    def compute(self) -> dict[str, Any]:
        table = torch.stack(self.rows)
        dice = {}
        for i, name in enumerate(self.contract.names[1:]):
            column = table[:, i]
            dice[name] = None if column.isnan().all() else float(column.nanmean())
        measured = [v for v in dice.values() if v is not None]
        return {
            "dice": dice,
            "mean_dice": sum(measured) / len(measured) if measured else None,
            "cases_with_class": {n: int((~table[:, i].isnan()).sum()) for i, n in enumerate(self.contract.names[1:])},
        }


class ClassIntensityStats:
    """Intensity mean / std per label class (voxels pooled over the set), the bright-dark contrast
    (:func:`scripts.evaluation.mask_fidelity.contrast`), histograms per class and over all voxels,
    and with ``order_check`` (a :class:`~scripts.generation.quality_gate.HBPQualityGate`) how many
    volumes each show the HBP order of their own mask, which a pooled contrast can hide."""

    def __init__(
        self,
        contract: LabelContract,
        bright: Sequence[str],
        dark: Sequence[str],
        bins: int = 50,
        order_check: HBPQualityGate | None = None,
    ) -> None:
        self.names = contract.names
        unknown = [n for n in (*bright, *dark) if n not in contract.labels]
        if unknown:
            raise BundleInputError(
                f"config 'contrast_bright_labels'/'contrast_dark_labels': {unknown} are not label classes"
            )
        self.bright = [contract.labels[n] for n in bright]
        self.dark = [contract.labels[n] for n in dark]
        self.bins = int(bins)
        n = len(self.names)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.squares = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.histograms = {name: torch.zeros(self.bins, dtype=torch.float64) for name in ("all", *self.names)}
        self.labelled = False
        self.order_check = order_check
        self.ordered = self.judged = 0

    def _histogram(self, values: torch.Tensor) -> torch.Tensor:
        return torch.histc(values.clamp(0.0, 1.0), bins=self.bins, min=0.0, max=1.0).double()

    def update(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        values = image.detach().flatten().double().cpu()
        self.histograms["all"] += self._histogram(values.float())
        if label is None:
            return
        self.labelled = True
        ids = label.detach().flatten().long().cpu()
        sums, squares, counts = class_intensity_sums(values, ids, len(self.names), squares=True)
        self.sums += sums
        self.squares += squares
        self.counts += counts
        for i, name in enumerate(self.names):
            self.histograms[name] += self._histogram(values[ids == i].float())
        if self.order_check is not None:
            verdict = self.order_check(values.numpy(), ids.numpy())
            if verdict["margin"] is not None:  # None: too little liver or no dark class to judge
                self.judged += 1
                self.ordered += int(verdict["passed"])

    def compute(self) -> dict[str, Any] | None:
        if not self.labelled:
            return None
        means = class_means(self.sums, self.counts)
        variance = (self.squares / self.counts.clamp_min(1) - means.nan_to_num() ** 2).clamp_min(0)
        return {
            "mean": {n: _number(means[i]) for i, n in enumerate(self.names)},
            "std": {n: _number(variance[i].sqrt()) if self.counts[i] > 0 else None for i, n in enumerate(self.names)},
            "voxels": {n: int(self.counts[i]) for i, n in enumerate(self.names)},
            "contrast": _number(contrast(self.sums, self.counts, self.bright, self.dark)),
            "hbp_order": (
                None
                if self.order_check is None
                else {
                    "ordered": self.ordered,
                    "judged": self.judged,
                    "fraction": self.ordered / self.judged if self.judged else None,
                }
            ),
        }


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI's ``MetaTensor`` carries metadata through every operation)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------------------- the evaluation
@dataclass
class _SetMeasurement:
    num_volumes: int
    fid_2_5d: list[dict[str, torch.Tensor]]
    fid_3d: list[torch.Tensor]
    ms_ssim: PairwiseMsSsim
    intensity: ClassIntensityStats
    dice: SegmentationDice | None
    texture: list[dict[str, float]] = field(default_factory=list)  # realism.paired_measures per volume
    volumes: list[np.ndarray] = field(default_factory=list)  # kept for the classifier two-sample test
    delivered: list[dict[str, float] | None] = field(default_factory=list)  # ratios on the delivered grid, per volume
    masks: list[str] = field(default_factory=list)  # the mask each volume was made from (test folds)


def mask_key(item: Mapping[str, str]) -> str:
    """The mask a volume belongs to, from its file names: ``labelsTr/case_7.nii.gz`` (real) and
    ``case_7_label.nii.gz`` / ``case_7_s1_image.nii.gz`` (generated from it) share ``case_7``, so the
    classifier test never trains on one image of a mask and tests on the other."""
    name = os.path.basename(item.get("label") or item["image"])
    name = re.sub(r"\.nii(\.gz)?$", "", name)
    return re.sub(r"(_s\d+)?(_image|_label)$", "", name)


def _texture_summary(texture: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Mean of each realism measure over the volumes where it is defined."""
    out: dict[str, float | None] = {}
    for name in texture[0] if texture else []:
        values = [t[name] for t in texture if np.isfinite(t[name])]
        out[name] = float(np.mean(values)) if values else None
    return out


class Evaluation:
    """Real set vs synthetic sets, every metric, one report.

    Args:
        real: the real volumes (:func:`real_volume_set`).
        synthetic: the synthetic sets (:func:`synthetic_volume_sets`).
        contract: the label contract (class names of the report).
        spatial_size: the model grid every preprocessed volume must have.
        spacing: its voxel spacing (mm).
        fid_2_5d / fid_3d: the FID protocols (``None``: not measured).
        segmenter / segmentation_inferer: mask-fidelity Dice (``None``: not measured).
        ms_ssim_kernel_size / ms_ssim_levels / ms_ssim_max_pairs: see :class:`scripts.evaluation.diversity.PairwiseMsSsim`.
        contrast_bright / contrast_dark: class names of the intensity contrast.
        histogram_bins: bins over [0, 1] of the intensity histograms.
        texture_measures: per-set means of :func:`scripts.evaluation.realism.paired_measures` (sets with
            label maps), reported as ratios to the real set's.
        classifier_test: settings of :func:`scripts.evaluation.realism.classifier_two_sample_test` (each
            set against the real set, and the real set's halves against each other); ``None``: off.
        delivered_grid_measures: the paired measures on the grid the pairs are delivered on, each image
            against the real image of its mask (:mod:`scripts.evaluation.delivered`).
        seed: order in which volumes are paired (MS-SSIM) and the real set is halved (real-vs-real FID).
        info: settings recorded under ``protocol`` in ``metrics.json``.
    """

    def __init__(
        self,
        real: VolumeSet,
        synthetic: Sequence[VolumeSet],
        contract: LabelContract,
        spatial_size: Sequence[int],
        spacing: Sequence[float],
        fid_2_5d: Fid25D | None = None,
        fid_3d: Fid3D | None = None,
        segmenter: torch.nn.Module | None = None,
        segmentation_inferer: Callable | None = None,
        ms_ssim_kernel_size: int = 3,
        ms_ssim_levels: int | None = None,
        ms_ssim_max_pairs: int | None = 100,
        contrast_bright: Sequence[str] = ("liver",),
        contrast_dark: Sequence[str] = ("portal_vein", "hepatic_vein", "hcc"),
        histogram_bins: int = 50,
        texture_measures: bool = True,
        classifier_test: Mapping[str, Any] | None = None,
        delivered_grid_measures: bool = True,
        seed: int = 0,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.real = real
        self.synthetic = list(synthetic)
        self.contract = contract
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.spacing = tuple(float(s) for s in spacing)
        self.fid_2_5d = fid_2_5d
        self.fid_3d = fid_3d
        self.segmenter = segmenter
        self.segmentation_inferer = segmentation_inferer
        if segmenter is not None and segmentation_inferer is None:
            raise ValueError("a segmenter needs its segmentation_inferer")
        self.ms_ssim = {"kernel_size": ms_ssim_kernel_size, "levels": ms_ssim_levels, "max_pairs": ms_ssim_max_pairs}
        PairwiseMsSsim(self.spatial_size, **self.ms_ssim)  # a grid too small for these settings fails now
        self.contrast_bright, self.contrast_dark = list(contrast_bright), list(contrast_dark)
        # liver brighter than each of its vessels and HCC in the volume itself: the quality gate's test
        # with no margin (one bright class only: the gate compares against a single class)
        self.order_check = (
            HBPQualityGate(contract.labels, self.contrast_bright[0], self.contrast_dark, min_contrast=0.0)
            if len(self.contrast_bright) == 1
            else None
        )
        self.histogram_bins = histogram_bins
        self.texture_measures = as_bool(texture_measures, "texture_measures")
        classifier_test = as_optional(classifier_test)  # --classifier_test null arrives as text
        self.classifier_test = None if classifier_test is None else dict(classifier_test)
        if self.classifier_test is not None:  # cubes no larger than the grid
            self.classifier_test["crop"] = min(int(self.classifier_test.get("crop", 32)), *self.spatial_size)
        self.delivered = None
        if as_bool(delivered_grid_measures, "delivered_grid_measures") and real.has_labels:
            self.delivered = DeliveredGridComparison(real.items, mask_key, contract)
        self.seed = int(seed)
        self.info = dict(info or {})

    # ------------------------------------------------------------------ one pass over a set
    def _volumes(
        self, volume_set: VolumeSet
    ) -> Iterator[tuple[dict[str, str], torch.Tensor, torch.Tensor | None, Any]]:
        """Each item, its preprocessed image and label as plain tensors, and the image with its metadata on the
        grid it was made on (the model grid but for a refining decoder's reconstructions)."""
        order = list(volume_set.items)
        random.Random(self.seed).shuffle(order)
        for item in tqdm(order, desc=f"evaluating {volume_set.name}", unit="volume"):
            data = volume_set.transform(dict(item))
            self._check_grid(data["image"], item["image"], volume_set)
            label = _plain(data["label"]) if "label" in data else None
            # the image on the grid it was made on (a refining decoder's reconstruction: its finer grid)
            as_made = data["image"] if data.get("decoded") is None else data["decoded"]
            yield item, _plain(data["image"]), label, as_made

    def _check_grid(self, image: Any, path: str, volume_set: VolumeSet) -> None:
        shape = tuple(image.shape[1:])
        spacing = tuple(float(s) for s in image.pixdim) if hasattr(image, "pixdim") else self.spacing
        if shape != self.spatial_size or not np.allclose(spacing, self.spacing, atol=1e-3):
            raise BundleInputError(
                f"{path}: after preprocessing, set {volume_set.name!r} has {list(shape)} voxels of "
                f"{[round(s, 4) for s in spacing]} mm, the model grid (and the real set) {list(self.spatial_size)} voxels "
                f"of {list(self.spacing)} mm; both sets must be preprocessed onto the same grid"
            )

    def measure(self, volume_set: VolumeSet) -> _SetMeasurement:
        """Features and statistics of one set, one volume in memory at a time (the classifier test keeps
        the set's preprocessed volumes: 1 MiB each on the demo grid, 32 MiB on the hires grid)."""
        dice = None
        if self.segmenter is not None and volume_set.has_labels:
            dice = SegmentationDice(self.segmenter, self.segmentation_inferer, self.contract)
        elif self.segmenter is not None:
            logger.warning(f"set {volume_set.name!r} ({volume_set.source}) has no label maps: no mask-fidelity Dice")
        result = _SetMeasurement(
            0,
            [],
            [],
            PairwiseMsSsim(self.spatial_size, **self.ms_ssim),
            ClassIntensityStats(
                self.contract, self.contrast_bright, self.contrast_dark, self.histogram_bins, self.order_check
            ),
            dice,
        )
        for item, image, label, as_made in self._volumes(volume_set):
            if not torch.isfinite(image).all():
                raise BundleInputError(f"set {volume_set.name!r}: a preprocessed image holds NaN or Inf values")
            result.num_volumes += 1
            if self.fid_2_5d is not None:
                result.fid_2_5d.append(self.fid_2_5d.volume_features(image))
            if self.fid_3d is not None:
                result.fid_3d.append(self.fid_3d.volume_features(image))
            result.ms_ssim.update(image)
            result.intensity.update(image, label if volume_set.has_labels else None)
            if dice is not None:
                dice.update(image, label)
            if self.texture_measures and volume_set.has_labels:
                result.texture.append(paired_measures(image[0].numpy(), label[0].numpy(), self.contract.labels))
            if self.delivered is not None and volume_set.has_labels:
                if volume_set.name in (REAL, RECONSTRUCTION):  # not on the real grid: taken back to it
                    result.delivered.append(self.delivered.from_model_grid(item, as_made))
                else:
                    result.delivered.append(self.delivered.from_files(item))
            if self.classifier_test is not None:
                result.volumes.append(image[0].numpy().astype(np.float32))
                result.masks.append(mask_key(item))
        return result

    def _classifier(
        self, measured: _SetMeasurement, real: _SetMeasurement, part: slice = _ALL, other: slice = _ALL
    ) -> dict[str, Any] | None:
        """The classifier two-sample test of the ``part`` volumes of ``measured`` against the ``other``
        volumes of ``real`` (``None``: off, or too few masks for its folds)."""
        if self.classifier_test is None:
            return None
        try:
            return classifier_two_sample_test(
                real.volumes[other],
                measured.volumes[part],
                groups=[*real.masks[other], *measured.masks[part]],
                seed=self.seed,
                **self.classifier_test,
            )
        except ValueError as e:
            logger.warning(str(e))
            return None

    def _real_halves_classifier(self, real: _SetMeasurement) -> dict[str, Any] | None:
        """The classifier test between the two halves of the real set: what "indistinguishable" reads as
        with this many volumes (alternate volumes of the shuffled order, as the real-vs-real FID)."""
        if real.num_volumes < 8:
            return None
        return self._classifier(real, real, slice(0, None, 2), slice(1, None, 2))

    def _realism(self, measured: _SetMeasurement, real: _SetMeasurement, classifier: Any) -> dict[str, Any]:
        texture = _texture_summary(measured.texture)
        reference = _texture_summary(real.texture)
        ratios = {
            name: (value / reference[name] if value is not None and reference.get(name) else None)
            for name, value in texture.items()
        }
        delivered = None if self.delivered is None else DeliveredGridComparison.summary(measured.delivered)
        return {
            "texture": texture,
            "texture_vs_real": ratios,
            "classifier_vs_real": classifier,
            "delivered_vs_real": delivered,
        }

    # ------------------------------------------------------------------ metrics of a set
    def _fid(
        self, synthetic: _SetMeasurement, real: _SetMeasurement, part: slice = _ALL, other: slice = _ALL
    ) -> dict[str, Any]:
        """FIDs of the ``part`` volumes of ``synthetic`` against the ``other`` volumes of ``real``."""
        out: dict[str, Any] = {"fid_2_5d": None, "fid_3d": None}
        if self.fid_2_5d is not None or self.fid_3d is not None:
            logger.info("computing FID (matrix square roots; minutes for 2048 features on a CPU)")
        if self.fid_2_5d is not None:
            out["fid_2_5d"] = Fid25D.distance(synthetic.fid_2_5d[part], real.fid_2_5d[other])
        if self.fid_3d is not None:
            out["fid_3d"] = Fid3D.distance(synthetic.fid_3d[part], real.fid_3d[other])
        return out

    def _real_vs_real(self, real: _SetMeasurement) -> dict[str, Any]:
        """FID between the two halves of the real set (alternate volumes of the shuffled order)."""
        if real.num_volumes < 4:
            logger.warning(f"{real.num_volumes} real volumes: too few to halve for a real-vs-real FID (4 needed)")
            return {"fid_2_5d": None, "fid_3d": None}
        return self._fid(real, real, slice(0, None, 2), slice(1, None, 2))

    @staticmethod
    def _summary(name: str, source: str, measured: _SetMeasurement, fid: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "source": source,
            "num_volumes": measured.num_volumes,
            **fid,
            "ms_ssim": measured.ms_ssim.compute(),
            "ms_ssim_pairs": measured.ms_ssim.num_pairs,
            "mask_fidelity": None if measured.dice is None else measured.dice.compute(),
            "intensity": measured.intensity.compute(),
        }

    # ------------------------------------------------------------------ the whole run
    def run(self, output_dir: str, overwrite: bool = False) -> str:
        """Check every file, measure every set, write the report into ``output_dir``; returns it."""
        inputs = [
            path
            for volume_set in (self.real, *self.synthetic)
            for item in volume_set.items
            for path in item.values()
            if isinstance(path, str)
        ]
        with staged_output(output_dir, overwrite, inputs=inputs, kind="evaluation") as staging:
            for volume_set in (self.real, *self.synthetic):
                volume_set.check()
            real = self.measure(self.real)
            sets = {REAL: self._summary(REAL, self.real.source, real, self._real_vs_real(real))}
            sets[REAL]["realism"] = self._realism(real, real, self._real_halves_classifier(real))
            histograms = {REAL: real.intensity.histograms}
            for volume_set in self.synthetic:
                measured = self.measure(volume_set)
                sets[volume_set.name] = self._summary(
                    volume_set.name, volume_set.source, measured, self._fid(measured, real)
                )
                sets[volume_set.name]["realism"] = self._realism(measured, real, self._classifier(measured, real))
                histograms[volume_set.name] = measured.intensity.histograms
            self.write(staging, sets, histograms)
        return os.path.abspath(output_dir)

    # ------------------------------------------------------------------ the report
    def columns(self) -> list[str]:
        """Table columns: one per metric."""
        columns = ["set", "volumes"]
        if self.fid_2_5d is not None:
            columns += ["fid_2.5d_xy", "fid_2.5d_yz", "fid_2.5d_zx", "fid_2.5d"]
        if self.fid_3d is not None:
            columns.append("fid_3d")
        columns.append("ms_ssim")
        columns += [f"dice_{name}" for name in self.contract.names[1:]] + ["dice_mean", "contrast", "hbp_order"]
        if self.classifier_test is not None:
            columns += ["c2st_auc", "c2st_accuracy"]
        if self.texture_measures:
            columns += [f"{name}_vs_real" for name in REALISM_COLUMNS]
        if self.delivered is not None:
            columns += [f"delivered_{name}" for name in DELIVERED_MEASURES]
        return columns

    def row(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """One table row (flat) of a set's summary."""
        fid25 = summary.get("fid_2_5d") or {}
        fidelity = summary.get("mask_fidelity") or {}
        intensity = summary.get("intensity") or {}
        values = {
            "set": summary["name"],
            "volumes": summary["num_volumes"],
            "fid_2.5d_xy": fid25.get("xy"),
            "fid_2.5d_yz": fid25.get("yz"),
            "fid_2.5d_zx": fid25.get("zx"),
            "fid_2.5d": fid25.get("mean"),
            "fid_3d": summary.get("fid_3d"),
            "ms_ssim": summary.get("ms_ssim"),
            "dice_mean": fidelity.get("mean_dice"),
            "contrast": intensity.get("contrast"),
            "hbp_order": (intensity.get("hbp_order") or {}).get("fraction"),
        }
        for name in self.contract.names[1:]:
            values[f"dice_{name}"] = (fidelity.get("dice") or {}).get(name)
        realism = summary.get("realism") or {}
        classifier = realism.get("classifier_vs_real") or {}
        values["c2st_auc"] = classifier.get("auc")
        values["c2st_accuracy"] = classifier.get("accuracy")
        for name in REALISM_COLUMNS:
            values[f"{name}_vs_real"] = (realism.get("texture_vs_real") or {}).get(name)
        for name in DELIVERED_MEASURES:
            values[f"delivered_{name}"] = (realism.get("delivered_vs_real") or {}).get(name)
        return {column: values.get(column) for column in self.columns()}

    def write(
        self, folder: str, sets: Mapping[str, Mapping[str, Any]], histograms: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        rows = [self.row(summary) for summary in sets.values()]
        report = {
            "protocol": {
                **self.info,
                "spatial_size": list(self.spatial_size),
                "spacing": list(self.spacing),
                "ms_ssim": PairwiseMsSsim(self.spatial_size, **self.ms_ssim).settings(),
                "fid_2_5d_center_slices_ratio": None if self.fid_2_5d is None else self.fid_2_5d.center_slices_ratio,
                "real_row": "FID between two halves of the real set (alternate volumes); other metrics over the whole set",
                "seed": self.seed,
            },
            "columns": self.columns(),
            "table": rows,
            "sets": sets,
        }
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(folder, "metrics.md"), "w") as f:
            f.write(self.markdown(rows, sets))
        save_histograms(histograms, self.contract.names, os.path.join(folder, "intensity_histograms.png"))
        logger.info("evaluation table:\n" + table_of(rows, self.columns()))

    def markdown(self, rows: Sequence[Mapping[str, Any]], sets: Mapping[str, Mapping[str, Any]]) -> str:
        names = self.contract.names
        intensity_rows = []
        for name, summary in sets.items():
            stats = summary.get("intensity")
            row: dict[str, Any] = {"set": name}
            for cls in names:
                row[cls] = (
                    None
                    if stats is None or stats["mean"][cls] is None
                    else f"{stats['mean'][cls]:.3f} ± {stats['std'][cls]:.3f}"
                )
            intensity_rows.append(row)
        return "\n".join(
            [
                "# Evaluation: real vs synthetic volumes",
                "",
                "FID: lower is closer to the real set (row `real`: FID between two halves of the real set). "
                "MS-SSIM: mean over pairs within the set, lower is more diverse. Dice: a segmentation network "
                "trained on real data, run on the images, against their label maps. Contrast: mean(bright classes) "
                "- mean(dark classes). HBP order: fraction of volumes whose liver is brighter than each of their "
                "vessels and HCC (classes of at least 20 voxels). c2st: a small 3D CNN trained to tell the set "
                "from the real set, k-fold with folds grouped by mask (AUC 0.5: indistinguishable; row `real`: "
                "its two halves). `*_vs_real`: the set's mean texture and sharpness measure over the real set's "
                "(1: as real; blur and missing grain give less). `delivered_*`: on the grid the pairs are delivered on, "
                "each image against the real image of its mask, mean ratio over cases (row `real`: the real image "
                "taken to the model grid and back, what the grid alone allows; `reconstruction` likewise, from a "
                "refining decoder's finer grid). n/a: not measured (null in metrics.json).",
                "",
                table_of(rows, self.columns()),
                "",
                "## Intensity per class (mean ± std, preprocessed [0, 1] scale)",
                "",
                table_of(intensity_rows, ["set", *names]),
                "",
            ]
        )


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def table_of(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table, one row per mapping, one column per key of ``columns``."""
    return markdown_table(columns, [[_cell(row.get(c)) for c in columns] for row in rows])


def save_histograms(histograms: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str], path: str) -> str:
    """One panel per class (and one over all voxels): normalised intensity histograms of every set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["all", *names[1:]]
    colours = {name: f"C{i}" for i, name in enumerate(n for n in histograms if n != REAL)}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for set_name, hist in histograms.items():
            counts = hist[panel].numpy()
            if counts.sum() == 0:
                continue
            density = counts / counts.sum()
            centres = (np.arange(len(density)) + 0.5) / len(density)
            if set_name == REAL:
                ax.fill_between(centres, density, color="0.75", label=REAL, step="mid")
            else:
                ax.step(centres, density, where="mid", label=set_name, color=colours[set_name])
        ax.set_title("all voxels" if panel == "all" else panel.replace("_", " "), fontsize=10)
        ax.set_xlabel("intensity (preprocessed)")
        if panel == "all":
            ax.set_yscale("log")
    axes[0][0].set_ylabel("share of voxels")
    axes[0][0].legend(fontsize=8)  # every set has the all-voxels panel
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return path
