# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Data layer: MSD-style datalists, up-front checks of the NIfTI files they name, and the MONAI
preprocessing chains that bring every case onto the model grid.

Checks run before any training or inference starts, so a bad file stops the command with one
line naming it instead of failing an hour later inside a data-loader worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from tqdm import tqdm

from scripts.core.errors import BundleInputError
from scripts.data.labels import LabelContract, LabelContractd

__all__ = [
    "NIFTI_SUFFIXES",
    "load_datalist",
    "check_affine",
    "check_real_dtype",
    "load_nifti_header",
    "read_nifti",
    "check_case",
    "check_cases",
    "preprocessing_transforms",
    "check_patch_size",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Largest world-coordinate difference (mm) tolerated between an image affine and its label's.
AFFINE_TOLERANCE_MM = 1e-3
#: An affine whose 3x3 determinant is below this fraction of the product of its voxel sizes has
#: (nearly) parallel or zero axes: singular for resampling.
_SINGULAR_AFFINE_TOLERANCE = 1e-6
#: numpy dtype kinds of real-valued voxels: boolean, signed and unsigned integer, floating point.
_REAL_KINDS = "biuf"
_DTYPE_KINDS = {
    "c": "complex numbers",
    "V": "structured voxels, e.g. RGB",
    "O": "Python objects",
    "S": "text",
    "U": "text",
    "M": "dates",
    "m": "time spans",
}


def load_datalist(
    datalist: str, dataset_dir: str, section: str = "training", keys: Sequence[str] = ("image", "label")
) -> list[dict[str, str]]:
    """Read one section of an MSD-style datalist, paths made absolute against ``dataset_dir``.

    An empty or absent section gives ``[]``: callers decide whether that is an error.
    """
    if not os.path.isfile(datalist):
        raise BundleInputError(f"{datalist}: datalist not found (set --datalist or --dataset_dir)")
    try:
        with open(datalist) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleInputError(f"{datalist}: not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise BundleInputError(f"{datalist}: expected a JSON object with 'training'/'validation'/'test' lists")
    entries = content.get(section) or []
    if not isinstance(entries, list):
        raise BundleInputError(f"{datalist}: section {section!r} must be a list of {{'image': ..., 'label': ...}}")
    for i, entry in enumerate(entries):
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise BundleInputError(f"{datalist}: entry {i} of {section!r} lacks {missing}")
        for key in keys:
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise BundleInputError(
                    f"{datalist}: entry {i} of {section!r} has {key} {entry[key]!r}; expected a file path "
                    f'relative to the dataset folder, e.g. "imagesTr/case_001.nii.gz"'
                )
    if not entries:
        return []
    # MONAI's reader resolves every path against base_dir, the MSD convention.
    return load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=section, base_dir=dataset_dir)


def check_affine(affine: np.ndarray, source: str, role: str = "image") -> np.ndarray:
    """Raise :class:`BundleInputError` naming ``source`` unless ``affine`` maps voxels to the world.

    A voxel-to-world matrix with NaN/Inf, a zero voxel size or axes that do not span 3D space (a
    damaged or hand-edited sform/qform) cannot be resampled: MONAI's ``Spacing`` would fail, or
    silently give NaN, only once generation has started. Returns the affine as float64.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise BundleInputError(
            f"{source}: {role} affine (voxel-to-world matrix of the header's sform/qform) " "contains NaN or Inf"
        )
    voxel_mm = affine_to_spacing(matrix, r=3, dtype=np.float64, suppress_zeros=False)  # voxel size per axis
    volume = abs(float(np.linalg.det(matrix[:3, :3])))
    # relative to the product of the voxel sizes, so that sub-millimetre voxels are not mistaken for
    # a singular matrix while nearly parallel axes are caught
    if not np.all(voxel_mm > 0) or volume <= _SINGULAR_AFFINE_TOLERANCE * float(np.prod(voxel_mm)):
        raise BundleInputError(
            f"{source}: {role} affine is singular (voxel sizes {', '.join(f'{v:g}' for v in voxel_mm)} mm, "
            f"determinant {volume:.3g}): its voxel axes do not span 3D space; fix the header's sform/qform"
        )
    return matrix


def check_real_dtype(dtype: np.dtype, source: str, role: str = "image") -> None:
    """Raise :class:`BundleInputError` naming ``source`` and ``dtype`` unless it holds real numbers.

    Integer, floating point and boolean voxels are accepted; complex voxels (whose imaginary part
    would be dropped without a word), RGB or other structured voxels and anything else are not.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in _REAL_KINDS:
        kind = _DTYPE_KINDS.get(dtype.kind, "not numeric")
        shown = {("R", "G", "B"): "RGB", ("R", "G", "B", "A"): "RGBA"}.get(dtype.names, str(dtype))
        raise BundleInputError(
            f"{source}: {role} has data type {shown} ({kind}); expected real numbers "
            "(integer or floating point voxels)"
        )


def load_nifti_header(path: str, role: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI without reading its voxels and check what the header says: a file that exists,
    a 3D grid (a trailing singleton 4th dimension is accepted), real-valued voxels and a usable
    affine (see :func:`check_affine`). Returns the lazily loaded image.
    """
    if not os.path.isfile(path):
        raise BundleInputError(f"{path}: {role} file not found")
    if not path.endswith(NIFTI_SUFFIXES):
        raise BundleInputError(f"{path}: {role} is not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")
    try:
        img = nib.load(path)
        dtype, shape = img.get_data_dtype(), tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises many types for damaged files; all mean the same here
        raise BundleInputError(f"{path}: cannot read {role} as NIfTI ({type(e).__name__}: {e})") from e
    check_real_dtype(dtype, path, role)
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BundleInputError(f"{path}: {role} must be a 3D volume, got shape {shape}")
    check_affine(img.affine, path, role)
    return img


def read_nifti(path: str, role: str = "image", header: nib.Nifti1Image | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI fully (so truncated files fail here) and return ``(array, affine)``.

    The header is checked first (:func:`load_nifti_header`: shape, real-valued data type, affine),
    so a file that cannot be used is refused before its voxels are read; pass ``header``, that
    function's result, when it was already checked. A trailing singleton 4th dimension is accepted
    (common in converted scans) and dropped.
    """
    img = load_nifti_header(path, role) if header is None else header
    try:
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for damaged files; all mean the same here
        raise BundleInputError(f"{path}: cannot read {role} as NIfTI ({type(e).__name__}: {e})") from e
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise BundleInputError(f"{path}: {role} must be a 3D volume, got shape {tuple(array.shape)}")
    return array, np.asarray(img.affine, dtype=np.float64)


def check_case(
    item: dict[str, str], contract: LabelContract, image_key: str = "image", label_key: str = "label"
) -> None:
    """Check one datalist entry: readable 3D NIfTIs, finite image, matching grids, valid labels.

    ``image_key`` may be absent from ``item`` (label-only inputs, as in inference).
    """
    label, label_affine = read_nifti(item[label_key], role="label")
    contract.check(label, item[label_key])
    if image_key not in item:
        return
    image, image_affine = read_nifti(item[image_key], role="image")
    if not np.all(np.isfinite(image)):
        raise BundleInputError(f"{item[image_key]}: image contains NaN or Inf values")
    if image.shape != label.shape:
        raise BundleInputError(
            f"{item[label_key]}: label shape {label.shape} differs from its image {item[image_key]} shape {image.shape}"
        )
    # Compare where the two grids put voxel corners in the world, in mm.
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, image.shape[0]) for j in (0, image.shape[1]) for k in (0, image.shape[2])]
    )
    offset = np.abs(corners @ image_affine.T - corners @ label_affine.T).max()
    if offset > AFFINE_TOLERANCE_MM:
        raise BundleInputError(
            f"{item[label_key]}: label affine differs from its image {item[image_key]} by up to {offset:.3g} mm"
        )


def check_cases(
    items: Sequence[dict[str, str]], contract: LabelContract, what: str = "datalist", progress: bool = True
) -> int:
    """Check every entry (see :func:`check_case`); raise on the first bad one. Returns the count."""
    if not items:
        raise BundleInputError(f"{what}: no cases to use")
    for item in tqdm(items, desc=f"checking {what}", unit="case", disable=not progress):
        check_case(item, contract)
    return len(items)


def preprocessing_transforms(
    contract: LabelContract,
    spacing: Sequence[float],
    spatial_size: Sequence[int],
    with_image: bool = True,
    lower_percentile: float = 0.0,
    upper_percentile: float = 99.5,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """Load and bring a case onto the model grid, all with MONAI transforms.

    RAS orientation, resampling to ``spacing`` (linear for images, nearest for labels), labels
    checked and mapped to bundle ids, image intensities scaled by percentiles to ``[0, 1]``,
    then a centred crop or zero pad to ``spatial_size``. ``with_image=False`` builds the
    label-only chain used for conditioning masks. One factory serves both so the two can never
    drift apart.
    """
    keys = [image_key, label_key] if with_image else [label_key]
    modes = ["bilinear", "nearest"] if with_image else ["nearest"]
    chain: list[Any] = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        LabelContractd(keys=label_key, contract=contract),
        Orientationd(keys=keys, axcodes="RAS", labels=None),  # None: axis labels from the MetaTensor's space
        Spacingd(keys=keys, pixdim=spacing, mode=modes),
    ]
    if with_image:
        chain.append(
            ScaleIntensityRangePercentilesd(
                keys=image_key, lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
            )
        )
    chain += [
        ResizeWithPadOrCropd(keys=keys, spatial_size=spatial_size),
        EnsureTyped(keys=image_key, dtype="float32", allow_missing_keys=True),
        EnsureTyped(keys=label_key, dtype="uint8"),
    ]
    return Compose(chain)


def check_patch_size(patch_size: Sequence[int], spatial_size: Sequence[int]) -> bool:
    """Every preprocessed volume has ``spatial_size``; a larger training patch cannot be cut from it."""
    if len(patch_size) != len(spatial_size):
        raise BundleInputError(
            f"config 'patch_size' {list(patch_size)}: expected {len(spatial_size)} sizes, one per axis of "
            f"'spatial_size' {list(spatial_size)}"
        )
    if any(p > s for p, s in zip(patch_size, spatial_size, strict=True)):
        raise BundleInputError(
            f"config 'patch_size' {list(patch_size)} does not fit in the preprocessed volume size "
            f"'spatial_size' {list(spatial_size)}: lower --patch_size or raise --spatial_size"
        )
    return True
