# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The label contract: which integer ids the bundle understands, how user ids map onto them,
how a label map is checked, and how it becomes the ControlNet conditioning.

The bundle's ids are declared once in ``configs/common.yaml`` (``labels``); a dataset whose
ids differ supplies ``label_map`` (source id -> bundle id). An id that is neither a bundle id
nor mapped is an error naming the file and the ids, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.utils import one_hot
from monai.transforms import MapLabelValue, MapTransform

from scripts.core.errors import BundleInputError

__all__ = [
    "LABELS",
    "LabelContract",
    "LabelContractd",
    "class_weight_table",
    "source_of",
    "class_intensity_sums",
    "class_means",
]

#: How many offending values an error message lists before it abbreviates.
_MAX_LISTED = 8

#: The bundle's label ids (class name -> id), the one copy in code: ``labels`` in configs/common.yaml
#: holds the same (a test checks); phantoms are drawn with these ids.
LABELS = {"background": 0, "liver": 1, "portal_vein": 2, "hepatic_vein": 3, "hcc": 4}


def source_of(data: Any, default: str = "<label map>") -> str:
    """The file a MONAI ``MetaTensor`` was loaded from, for error messages."""
    meta = getattr(data, "meta", None) or {}
    return str(meta.get("filename_or_obj", default) or default)


def _listed(values: Sequence[Any]) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def _integer(value: Any) -> bool:
    """An int, or text of one (a label map typed on the command line may arrive with text keys)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())


class LabelContract:
    """Label ids of the bundle plus an optional remapping of a dataset's own ids.

    Args:
        labels: class name -> bundle id. Ids must be ``0..N-1`` with ``0`` the background,
            because the conditioning is a one-hot map with one channel per id.
        label_map: dataset id -> bundle id, applied before validation. When given, it must list
            every id the dataset uses except background ``0`` (organs to drop map to ``0``); an
            unlisted id is an error rather than being taken at face value, because a dataset
            with its own numbering (spleen = 1, say) would otherwise pass as liver silently.
    """

    def __init__(self, labels: Mapping[str, int], label_map: Mapping[int, int] | None = None) -> None:
        ids = sorted(int(v) for v in labels.values())
        if ids != list(range(len(ids))) or len(ids) < 2:
            raise BundleInputError(
                f"config 'labels': ids must be 0..N-1 with 0 = background and N >= 2, got {dict(labels)}"
            )
        self.labels = {str(k): int(v) for k, v in labels.items()}
        self.label_map = {}
        for source, target in (label_map or {}).items():
            if not (_integer(source) and _integer(target)):
                raise BundleInputError(
                    f"config 'label_map': expected dataset id -> bundle id as integers, e.g. {{7: 1}}, "
                    f"got {source!r}: {target!r}"
                )
            self.label_map[int(source)] = int(target)
        bad_targets = sorted({v for v in self.label_map.values() if v not in ids})
        if bad_targets:
            raise BundleInputError(f"config 'label_map': targets {_listed(bad_targets)} are not bundle label ids {ids}")
        self._remap = (
            MapLabelValue(orig_labels=list(self.label_map), target_labels=list(self.label_map.values()))
            if self.label_map
            else None
        )

    @property
    def num_classes(self) -> int:
        """Number of classes, background included: the number of one-hot channels."""
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        """Class names ordered by id."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def check(self, label: np.ndarray | torch.Tensor, source: str, remapped: bool = False) -> None:
        """Raise :class:`BundleInputError` naming ``source`` unless ``label`` satisfies the contract.

        Checks, in order: finite values, integer values, ids known to the bundle or mapped,
        and at least one foreground voxel. ``remapped`` says ``label_map`` was already applied.
        """
        values = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
        if not np.all(np.isfinite(values)):
            raise BundleInputError(f"{source}: label map contains NaN or Inf values")
        unique = np.unique(values)
        fractional = unique[unique != np.round(unique)]
        if fractional.size:
            raise BundleInputError(f"{source}: label map has non-integer values {_listed(fractional.tolist())}")
        unique = unique.astype(np.int64)
        if remapped or not self.label_map:
            unknown = [int(u) for u in unique if u not in self.labels.values()]
            hint = "" if remapped else "; map dataset ids with the 'label_map' override, e.g. --label_map \"{7: 1}\""
            if unknown:
                raise BundleInputError(
                    f"{source}: unknown label ids {_listed(unknown)}; bundle ids are {self.labels}{hint}"
                )
        else:
            unmapped = [int(u) for u in unique if u != 0 and u not in self.label_map]
            if unmapped:
                raise BundleInputError(
                    f"{source}: label ids {_listed(unmapped)} are not in 'label_map' {self.label_map}; "
                    "list every dataset id (map organs to drop to 0)"
                )
        final = unique if remapped or not self.label_map else np.array([self.label_map.get(int(u), u) for u in unique])
        if not np.any(final != 0):
            raise BundleInputError(f"{source}: label map has no foreground (every voxel is background 0)")

    def remap(self, label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Apply ``label_map`` (all pairs at once, so chains such as 1->2, 2->1 swap cleanly)."""
        return label if self._remap is None else self._remap(label)

    def prepare(self, label: np.ndarray | torch.Tensor, source: str) -> np.ndarray | torch.Tensor:
        """Check a dataset label map and return it in bundle ids."""
        self.check(label, source)
        return self.remap(label)

    def one_hot(self, label: torch.Tensor) -> torch.Tensor:
        """One-hot conditioning, one channel per class, from a ``(B, 1, *spatial)`` label map in bundle ids."""
        return one_hot(label.long(), num_classes=self.num_classes, dim=1)


class LabelContractd(MapTransform):
    """Dictionary transform: check label maps against the contract and convert them to bundle ids.

    Sits right after loading, so the error names the file the user gave.
    """

    def __init__(self, keys: KeysCollection, contract: LabelContract, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.contract = contract

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.contract.prepare(d[key], source_of(d[key]))
        return d


def class_weight_table(
    labels: Mapping[str, int], class_weights: Mapping[str, float] | None, setting: str = "class_loss_weights"
) -> torch.Tensor:
    """Loss weight per label id from ``{class name: weight}``; unlisted classes weigh 1.

    ``setting`` names the config key in error messages (stage 1 and stage 3 both weight losses by class).
    """
    weights = torch.ones(len(labels))
    for name, weight in (class_weights or {}).items():
        if name not in labels:
            raise BundleInputError(f"config {setting!r}: unknown class {name!r}; classes are {sorted(labels)}")
        if not float(weight) > 0:
            raise BundleInputError(f"config {setting!r}: weight of {name!r} must be positive, got {weight}")
        weights[int(labels[name])] = float(weight)
    return weights


def class_intensity_sums(
    image: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, num_classes: int, squares: bool = False
) -> tuple[torch.Tensor, ...]:
    """Per-class intensity sums and voxel counts of ``image`` within ``label`` (ids ``0..num_classes-1``).

    The one per-class accumulator of the bundle (latent cache references, mask-fidelity metrics,
    the evaluation report, the quality gate): float64 ``(sums, counts)`` of length ``num_classes``,
    ``(sums, sums of squares, counts)`` with ``squares``, on ``label``'s device.
    """
    if not isinstance(label, torch.Tensor):
        label = torch.from_numpy(np.asarray(label).astype(np.int64))
    ids = label.detach().long().flatten()
    values = torch.as_tensor(image).detach().flatten().to(ids.device, torch.float64)
    n = int(num_classes)
    sums = torch.bincount(ids, weights=values, minlength=n)[:n]
    counts = torch.bincount(ids, minlength=n)[:n].double()
    if squares:
        return sums, torch.bincount(ids, weights=values * values, minlength=n)[:n], counts
    return sums, counts


def class_means(sums: Sequence[float] | torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Mean intensity per class from :func:`class_intensity_sums`; NaN for a class without voxels."""
    sums, counts = torch.as_tensor(sums, dtype=torch.float64), torch.as_tensor(counts, dtype=torch.float64)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
