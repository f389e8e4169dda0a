# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Mask editing before generation: new label layouts, not only new renderings of a given one.

:class:`MaskEditor` changes a label map in four optional steps, always in this order:

1. **elastic deformation** of the whole map (a smooth random displacement field, warped by
   MONAI's ``Warp`` with nearest-neighbour sampling, so only existing label ids come out);
2. **removal** of existing HCC nodules (all, or a chosen number picked at random);
3. **resizing** of the remaining HCC nodules by a diameter factor (grown into the nearest liver
   parenchyma or peeled, by distances in mm);
4. **insertion** of new HCC nodules of given diameters in mm, centred in liver parenchyma with
   a clearance from vessels, other HCC and the liver boundary.

Sizes are in millimetres and use the voxel spacing, so a "15 mm nodule" is 15 mm on an
anisotropic grid too. Everything random comes from one ``numpy.random.Generator`` seeded per
case: the same seed and mask give the same edit. :class:`MaskEditord` applies the editor to a
channel-first MONAI ``MetaTensor`` in a data dictionary, keeping its affine and metadata, with
the seed taken from the dictionary. Label ids come from the ``labels`` section of
``configs/common.yaml``; the edited map keeps the precedence HCC over vessels over liver and
stays valid for :meth:`scripts.data.labels.LabelContract.check`.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.networks.blocks import Warp
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from scripts.core.errors import BundleInputError
from scripts.data.labels import source_of

__all__ = ["MaskEditor", "MaskEditord", "mask_editor"]

logger = logging.getLogger(__name__)

#: 26-connectivity: voxels touching at an edge or corner belong to the same nodule.
_NODULE_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

#: Random cosine lobes that make an inserted nodule slightly irregular (when asked for).
_IRREGULAR_LOBES = 3

Seed = int | np.random.Generator | None


def _equivalent_diameter_mm(num_voxels: int, spacing: np.ndarray) -> float:
    """Diameter of the sphere with the same volume as ``num_voxels`` voxels."""
    volume = num_voxels * float(np.prod(spacing))
    return float((6.0 * volume / math.pi) ** (1.0 / 3.0))


def _distance_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel to the nearest voxel where ``mask`` is False.

    Infinite everywhere when ``mask`` has no False voxel (scipy would return nonsense then).
    """
    if mask.all():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_edt(mask, sampling=spacing)


def _threshold_for_count(values: np.ndarray, wanted: int) -> float:
    """The ``t`` for which ``(values <= t).sum()`` is nearest ``wanted``; voxels at equal
    distance are taken or left together, so growth and erosion stay symmetric."""
    levels, counts = np.unique(values, return_counts=True)
    totals = np.concatenate([[0], np.cumsum(counts)])
    best = int(np.argmin(np.abs(totals - wanted)))
    return -np.inf if best == 0 else float(levels[best - 1])


def _padded_box(box: tuple[slice, ...], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(box, pad, shape, strict=True))


class MaskEditor:
    """Edit a label map: elastic deformation, HCC removal, HCC resizing, HCC insertion.

    Each step runs only when enabled; with nothing enabled the editor returns its input as is.

    Args:
        labels: class name -> bundle id (``configs/common.yaml`` ``labels``); needs ``background``,
            ``liver`` and ``hcc`` plus the names in ``vessels``.
        vessels: class names of the vessels that new nodules keep clear of.
        elastic_displacement_mm: largest displacement of the elastic deformation in mm; ``0``
            disables it. Keep it below about a third of ``elastic_smoothness_mm`` to avoid folds.
        elastic_smoothness_mm: length scale of the deformation in mm: the displacement field is
            random on control points this far apart and smooth in between.
        remove_hcc: how many existing HCC nodules to remove, chosen at random; ``"all"`` removes
            every one; ``0`` disables the step.
        hcc_scale: diameter factor for existing HCC nodules; ``1`` disables the step. Each
            nodule's volume becomes about ``hcc_scale ** 3`` times as large, by taking the
            nearest liver parenchyma (``> 1``) or peeling its outermost voxels (``< 1``). A
            nodule hemmed in by vessels or the liver edge grows less.
        insert_hcc_diameters_mm: diameters in mm of the HCC nodules to insert, e.g. ``[15, 25]``.
        vessel_margin_mm: clearance in mm between an inserted nodule's surface and any vessel or
            other HCC voxel.
        boundary_margin_mm: clearance in mm between an inserted nodule's surface and the liver
            boundary (0: the nodule just fits inside the liver).
        irregularity: relative radial bumpiness of inserted nodules, ``0`` (spheres in mm) to
            ``0.5``; the nodule's largest radius, used for the clearances, is
            ``diameter / 2 * (1 + irregularity)``.
    """

    def __init__(
        self,
        labels: Mapping[str, int],
        vessels: Sequence[str] = ("portal_vein", "hepatic_vein"),
        elastic_displacement_mm: float = 0.0,
        elastic_smoothness_mm: float = 40.0,
        remove_hcc: int | str = 0,
        hcc_scale: float = 1.0,
        insert_hcc_diameters_mm: Sequence[float] = (),
        vessel_margin_mm: float = 3.0,
        boundary_margin_mm: float = 2.0,
        irregularity: float = 0.0,
    ) -> None:
        missing = [n for n in ("background", "liver", "hcc", *vessels) if n not in labels]
        if missing:
            raise BundleInputError(f"mask editing: label names {missing} are not in config 'labels' {dict(labels)}")
        self.background, self.liver, self.hcc = (int(labels[n]) for n in ("background", "liver", "hcc"))
        self.vessel_ids = [int(labels[n]) for n in vessels]
        self.elastic_displacement_mm = float(elastic_displacement_mm)
        self.elastic_smoothness_mm = float(elastic_smoothness_mm)
        self.remove_hcc = remove_hcc
        self.hcc_scale = float(hcc_scale)
        self.insert_hcc_diameters_mm = [float(d) for d in insert_hcc_diameters_mm]
        self.vessel_margin_mm = float(vessel_margin_mm)
        self.boundary_margin_mm = float(boundary_margin_mm)
        self.irregularity = float(irregularity)
        self._validate()
        self._warp: Warp | None = None
        if self.elastic_displacement_mm > 0:
            # without MONAI's compiled extension Warp says it uses torch's grid_sample: expected here
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*native grid_sample", category=UserWarning)
                self._warp = Warp(mode="nearest", padding_mode="zeros")

    def _validate(self) -> None:
        """Reject settings that cannot mean anything, naming the setting."""
        problems = []
        if self.elastic_displacement_mm < 0 or self.elastic_smoothness_mm <= 0:
            problems.append("elastic_displacement_mm must be >= 0 and elastic_smoothness_mm > 0")
        count = isinstance(self.remove_hcc, int) and not isinstance(self.remove_hcc, bool) and self.remove_hcc >= 0
        if not (self.remove_hcc == "all" or count):  # a YAML `true` is ambiguous: refuse it
            problems.append(f"remove_hcc must be a count >= 0 or 'all', got {self.remove_hcc!r}")
        if self.hcc_scale <= 0:
            problems.append(f"hcc_scale must be > 0, got {self.hcc_scale:g}")
        if any(d <= 0 for d in self.insert_hcc_diameters_mm):
            problems.append(f"insert_hcc_diameters_mm must be > 0, got {self.insert_hcc_diameters_mm}")
        if self.vessel_margin_mm < 0 or self.boundary_margin_mm < 0:
            problems.append("vessel_margin_mm and boundary_margin_mm must be >= 0")
        if not 0 <= self.irregularity <= 0.5:
            problems.append(f"irregularity must be in [0, 0.5], got {self.irregularity:g}")
        if problems:
            raise BundleInputError("mask editing: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        """Whether any editing step is switched on."""
        return (
            self.elastic_displacement_mm > 0
            or self.remove_hcc != 0
            or self.hcc_scale != 1.0
            or bool(self.insert_hcc_diameters_mm)
        )

    def __call__(
        self, label: np.ndarray, spacing: Sequence[float], seed: Seed = None, source: str = "<label map>"
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Edit ``label`` and return ``(edited, summary)``.

        Args:
            label: integer-valued label map, ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``.
            spacing: voxel size in mm along X, Y, Z (``monai.data.utils.affine_to_spacing`` of its affine).
            seed: an int or a ``numpy.random.Generator``; the same seed gives the same edit.
            source: the mask's file name, used in error messages.

        Returns:
            The edited map with ``label``'s shape and dtype (``label`` itself when no step is
            enabled), and a JSON-friendly summary of what was done, for logging.
        """
        if not self.enabled:
            return label, {}
        array = np.asarray(label)
        volume = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
        if volume.ndim != 3:
            raise BundleInputError(f"{source}: mask editing needs a 3D label map, got shape {array.shape}")
        spacing_mm = np.asarray(spacing, dtype=np.float64)
        rng = np.random.default_rng(seed)
        edited = np.rint(volume).astype(np.int64)
        summary: dict[str, Any] = {}
        if self.elastic_displacement_mm > 0:
            edited = self._deform(edited, spacing_mm, rng)
            summary["elastic_displacement_mm"] = self.elastic_displacement_mm
        if self.remove_hcc != 0:
            summary["hcc_removed"] = self._remove_nodules(edited, rng)
        if self.hcc_scale != 1.0:
            summary["hcc_resized"] = self._resize_nodules(edited, spacing_mm)
        if self.insert_hcc_diameters_mm:
            summary["hcc_inserted"] = self._insert_nodules(edited, spacing_mm, rng, source)
        return edited.reshape(array.shape).astype(array.dtype), summary

    # ---------------------------------------------------------------- elastic deformation
    def _displacement_field(self, shape: Sequence[int], spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A smooth random displacement field ``(3, X, Y, Z)`` in voxels, largest vector = the set mm.

        Random vectors on a coarse control grid, smoothed and trilinearly upsampled: cheap at any
        grid size (a Gaussian on the full grid would cost seconds at 256^3) and isotropic in mm.
        """
        node_mm = self.elastic_smoothness_mm / 2.0
        extent_mm = np.asarray(shape) * spacing
        coarse_shape = [max(2, math.ceil(e / node_mm) + 1) for e in extent_mm]
        coarse = ndimage.gaussian_filter(rng.standard_normal((3, *coarse_shape)), sigma=(0, 1, 1, 1))
        field = F.interpolate(
            torch.as_tensor(coarse, dtype=torch.float32)[None], size=tuple(shape), mode="trilinear", align_corners=True
        )[0].numpy()
        largest = float(np.sqrt((field**2).sum(axis=0)).max())
        field *= self.elastic_displacement_mm / max(largest, 1e-12)  # now in mm
        return field / spacing[:, None, None, None]  # mm -> voxels along each axis

    def _deform(self, label: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Warp the whole map; nearest sampling keeps only existing ids, outside the grid is background."""
        ddf = torch.as_tensor(self._displacement_field(label.shape, spacing, rng), dtype=torch.float32)[None]
        # Warp pads with 0: shift ids so that padding lands on background whatever its id is
        shifted = torch.as_tensor(label - self.background, dtype=torch.float32)[None, None]
        warped = self._warp(shifted, ddf)[0, 0].numpy()
        return np.rint(warped).astype(np.int64) + self.background

    # ---------------------------------------------------------------- existing HCC
    def _nodules(self, label: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
        """Connected HCC components and their bounding boxes (component ``i`` has box ``i - 1``)."""
        components, _ = ndimage.label(label == self.hcc, structure=_NODULE_CONNECTIVITY)
        return components, ndimage.find_objects(components)

    def _remove_nodules(self, label: np.ndarray, rng: np.random.Generator) -> int:
        """Turn the chosen nodules into liver in place; returns how many were removed.

        Removed tumour becomes parenchyma, not background: HCC lies inside the liver, so the
        tissue in its place is liver; background would punch a hole the generator renders as fat.
        """
        components, boxes = self._nodules(label)
        count = len(boxes) if self.remove_hcc == "all" else min(int(self.remove_hcc), len(boxes))
        chosen = rng.choice(len(boxes), size=count, replace=False) + 1 if count else []
        for component in chosen:
            label[components == component] = self.liver
        return int(count)

    def _resize_nodules(self, label: np.ndarray, spacing: np.ndarray) -> list[dict[str, float]]:
        """Grow or shrink every nodule in place; returns equivalent diameters before and after.

        The target is a volume (``hcc_scale ** 3`` times the old one) rather than a fixed
        dilation distance, because on a thick-slice grid a distance below the slice thickness
        would grow a nodule in-plane only.
        """
        components, boxes = self._nodules(label)
        resized = []
        for index, box in enumerate(boxes, start=1):
            before = int((components[box] == index).sum())
            radius_mm = _equivalent_diameter_mm(before, spacing) / 2.0
            target = max(1, round(before * self.hcc_scale**3))
            if self.hcc_scale > 1.0:
                # a nodule hemmed in by vessels or the liver edge may reach at most about twice
                # as far as a free sphere would, so it never snakes along the parenchyma
                reach_mm = 2.0 * (self.hcc_scale - 1.0) * radius_mm + float(spacing.max())
                box = _padded_box(box, [math.ceil(reach_mm / s) + 1 for s in spacing], label.shape)
                after = self._grow(label[box], components[box] == index, target, reach_mm, spacing)
            else:
                after = self._shrink(label[box], components[box] == index, target, spacing)
            resized.append(
                {
                    "diameter_mm_before": round(2 * radius_mm, 2),
                    "diameter_mm_after": round(_equivalent_diameter_mm(after, spacing), 2),
                }
            )
        return resized

    def _grow(self, crop: np.ndarray, nodule: np.ndarray, target: int, reach_mm: float, spacing: np.ndarray) -> int:
        """Paint HCC on the liver parenchyma nearest the nodule (in mm) until it has about
        ``target`` voxels; returns its new voxel count.

        Only parenchyma is taken, never vessels or other structures: the vessel tree and the
        liver outline stay intact, so the grown nodule stays inside liver plus its old footprint.
        """
        distance = _distance_mm(~nodule, spacing)
        candidates = (crop == self.liver) & (distance <= reach_mm)
        limit = _threshold_for_count(distance[candidates], target - int(nodule.sum()))
        grown = candidates & (distance <= limit)
        crop[grown] = self.hcc
        return int(nodule.sum() + grown.sum())

    def _shrink(self, crop: np.ndarray, nodule: np.ndarray, target: int, spacing: np.ndarray) -> int:
        """Peel the nodule's outermost voxels (in mm) until about ``target`` remain, at least its
        deepest ones; returns its new voxel count.

        The peeled rim becomes liver, for the same reason as removed nodules do.
        """
        # the crop is the nodule's tight box: pad it so the box edge counts as outside the nodule
        depth = _distance_mm(np.pad(nodule, 1), spacing)[1:-1, 1:-1, 1:-1]
        keep = nodule & (-depth <= _threshold_for_count(-depth[nodule], target))
        if not keep.any():  # shrinking is not removing: keep the core
            keep = nodule & (depth == depth.max())
        crop[nodule & ~keep] = self.liver
        return int(keep.sum())

    # ---------------------------------------------------------------- new HCC
    def _insert_nodules(
        self, label: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, source: str
    ) -> list[dict[str, Any]]:
        """Insert one nodule per requested diameter, largest first (the hardest to place)."""
        # pad by one background voxel so that the grid edge counts as the liver boundary
        foreground = np.pad(label != self.background, 1)
        to_boundary = _distance_mm(foreground, spacing)[1:-1, 1:-1, 1:-1]
        to_obstacle = _distance_mm(~np.isin(label, [*self.vessel_ids, self.hcc]), spacing)
        axes_mm = [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(label.shape, spacing, strict=True)]
        inserted = []
        for diameter in sorted(self.insert_hcc_diameters_mm, reverse=True):
            radius = diameter / 2.0 * (1.0 + self.irregularity)
            centre = self._pick_centre(label, to_boundary, to_obstacle, radius, rng, source, diameter)
            painted = self._paint_nodule(label, centre, diameter / 2.0, spacing, rng)
            # the new nodule is an obstacle for the next ones: a lower bound on the distance to it
            x, y, z = ((a - a[c]) ** 2 for a, c in zip(axes_mm, centre, strict=True))
            to_centre = np.sqrt(x[:, None, None] + y[None, :, None] + z[None, None, :])
            np.minimum(to_obstacle, to_centre - radius, out=to_obstacle)
            inserted.append({"diameter_mm": diameter, "centre_voxel": [int(c) for c in centre], "voxels": painted})
        return inserted

    def _pick_centre(
        self,
        label: np.ndarray,
        to_boundary: np.ndarray,
        to_obstacle: np.ndarray,
        radius: float,
        rng: np.random.Generator,
        source: str,
        diameter: float,
    ) -> tuple[int, ...]:
        """A random parenchyma voxel whose ball of ``radius`` keeps the margins, or a one-line error."""
        room = np.minimum(to_boundary - self.boundary_margin_mm, to_obstacle - self.vessel_margin_mm)
        room[label != self.liver] = -np.inf
        candidates = np.flatnonzero(room >= radius)
        if candidates.size == 0:
            largest = max(0.0, 2.0 * float(room.max()) / (1.0 + self.irregularity))
            raise BundleInputError(
                f"{source}: no place in the liver fits a {diameter:g} mm HCC nodule with {self.vessel_margin_mm:g} mm "
                f"clearance from vessels and other HCC and {self.boundary_margin_mm:g} mm from the liver boundary "
                f"(largest that fits: {largest:.1f} mm); ask for smaller nodules or margins"
            )
        return tuple(int(i) for i in np.unravel_index(rng.choice(candidates), label.shape))

    def _paint_nodule(
        self, label: np.ndarray, centre: Sequence[int], radius: float, spacing: np.ndarray, rng: np.random.Generator
    ) -> int:
        """Paint a sphere in mm (bumpy when ``irregularity`` > 0) on parenchyma only; returns its voxel count."""
        reach = [math.ceil(radius * (1.0 + self.irregularity) / s) for s in spacing]
        box = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(centre, reach, strict=True))
        offsets_mm = [
            (np.arange(b.start, min(b.stop, n)) - c) * s
            for b, c, s, n in zip(box, centre, spacing, label.shape, strict=True)
        ]
        x, y, z = np.meshgrid(*offsets_mm, indexing="ij")
        distance = np.sqrt(x**2 + y**2 + z**2)
        surface = radius * (1.0 + self.irregularity * self._lobes(x, y, z, distance, rng))
        crop = label[box]
        inside = (distance <= surface) & (crop == self.liver)  # never over vessels, HCC or outside the liver
        crop[inside] = self.hcc
        return int(inside.sum())

    def _lobes(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, distance: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray | float:
        """A smooth random function of direction in [-1, 1] (a few cosine lobes); 0 for spheres."""
        if self.irregularity == 0:
            return 0.0
        directions = np.stack([x, y, z]) / np.maximum(distance, 1e-6)
        waves = rng.normal(0.0, 2.0, size=(_IRREGULAR_LOBES, 3))
        phases = rng.uniform(0.0, 2.0 * math.pi, size=_IRREGULAR_LOBES)
        lobes = sum(np.cos(np.tensordot(w, directions, axes=1) + p) for w, p in zip(waves, phases, strict=True))
        return lobes / _IRREGULAR_LOBES


def mask_editor(
    labels: Mapping[str, int], settings: Mapping[str, Any] | None, setting: str = "mask_editing"
) -> MaskEditor | None:
    """The ``--mask_editing`` setting (or another, named by ``setting``) as a :class:`MaskEditor`,
    ``None`` when empty; an unknown key is one error line with the close matches, not a ``TypeError``."""
    if not settings:
        return None
    known = [name for name in inspect.signature(MaskEditor.__init__).parameters if name not in ("self", "labels")]
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known)}"
            raise BundleInputError(f"config {setting!r}: unknown edit {name!r}; {hint}")
    return MaskEditor(labels=labels, **settings)


class MaskEditord(MapTransform):
    """Dictionary transform: apply a :class:`MaskEditor` to channel-first label ``MetaTensor`` s.

    The seed is read from ``data[seed_key]`` so every case (and every sample of a case, when the
    caller puts the sample index into the seed) gets its own reproducible edit; the transform is
    therefore deterministic given its input and safe to cache. The voxel spacing comes from the
    affine (a plain array counts as 1 mm isotropic); affine and metadata are kept.

    Args:
        keys: label keys to edit.
        editor: the configured editor.
        seed_key: key of the per-case integer seed; ``None`` uses ``default_seed`` for every case.
        default_seed: the seed when ``seed_key`` is ``None``.
        summary_key: when given, the edit summary of the last key is stored under it (it is
            always logged at INFO level); off by default because ragged summaries do not collate.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        editor: MaskEditor,
        seed_key: str | None = "seed",
        default_seed: int = 0,
        summary_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.editor = editor
        self.seed_key = seed_key
        self.default_seed = default_seed
        self.summary_key = summary_key

    def _seed(self, data: Mapping[Hashable, Any]) -> int:
        if self.seed_key is None:
            return self.default_seed
        if self.seed_key not in data:
            raise KeyError(f"MaskEditord: the data dictionary has no seed under {self.seed_key!r}")
        return int(data[self.seed_key])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.editor.enabled:
            return d
        seed = self._seed(d)
        for key in self.key_iterator(d):
            label = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            source = source_of(label)
            array = label.detach().cpu().numpy()
            edited, summary = self.editor(
                array,
                affine_to_spacing(label.affine.detach().cpu().numpy(), r=3, suppress_zeros=False),
                seed=seed,
                source=source,
            )
            d[key] = convert_to_dst_type(edited, label)[0]  # same type, dtype, device, affine and meta
            logger.info("mask edits for %s (seed %d): %s", source, seed, summary)
            if self.summary_key is not None:
                d[self.summary_key] = summary
        return d
