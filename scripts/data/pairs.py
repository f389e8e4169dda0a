# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Folders of generated pairs: the one place that knows their file names and manifest.

Inference (and the GAN baseline through it) writes ``X_image.nii.gz`` beside ``X_label.nii.gz``
for every mask ``X`` (``X`` ends in ``_s{k}`` with several samples per mask) and ``pairs.json``,
which maps each pair to the mask and seed it was generated from; unconditional sampling writes
images alone. Evaluation, segmentation training and the augmentation study read such folders
with :func:`find_pairs` and the manifest with :func:`read_pairs_manifest`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.core.errors import BundleInputError
from scripts.data.cases import NIFTI_SUFFIXES

__all__ = [
    "PAIRS_MANIFEST",
    "ROLES",
    "pair_file_name",
    "pair_prefix",
    "find_pairs",
    "read_pairs_manifest",
    "write_pairs_manifest",
]

#: Written by inference beside the pairs: ``{"seed": ..., "pairs": [{"image", "label", "mask", "seed", ...}]}``.
PAIRS_MANIFEST = "pairs.json"
#: The two files of a pair, ``X_<role>.nii.gz``.
ROLES = ("image", "label")
_PAIR_FILE = re.compile(r"^(?P<prefix>.+)_(?P<role>image|label)(?P<suffix>\.nii(\.gz)?)$")


def pair_file_name(prefix: str, role: str) -> str:
    """``X_image.nii.gz`` or ``X_label.nii.gz``: the file of ``role`` in the pair ``prefix``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return f"{prefix}_{role}.nii.gz"


def pair_prefix(path: str) -> str | None:
    """``X`` of a pair file ``.../X_image.nii[.gz]`` or ``X_label...``; ``None`` for any other name."""
    match = _PAIR_FILE.match(os.path.basename(path))
    return None if match is None else match["prefix"]


def find_pairs(folder: str, labels_required: bool = True) -> list[dict[str, str]]:
    """Every pair of ``folder`` (not recursive) as ``{"image": path, "label": path}``, sorted by image name.

    ``labels_required`` (segmentation training, the study): every NIfTI file must be an ``X_image`` or
    ``X_label`` with its partner beside it, so a wrong or half-copied folder is an error naming the file.
    Otherwise (evaluation, which also reads unconditional samples): every ``X_image`` with ``"label"``
    where ``X_label`` is beside it; a folder mixes no paired and unpaired images. Hidden files and
    non-NIfTI files (``pairs.json``, previews) are skipped.
    """
    if not os.path.isdir(folder):
        raise BundleInputError(f"{folder}: synthetic folder not found")
    root = os.path.abspath(folder)
    found: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(root, name)
        if name.startswith(".") or not name.endswith(NIFTI_SUFFIXES) or not os.path.isfile(path):
            continue
        match = _PAIR_FILE.match(name)
        if match is None:
            if labels_required:
                raise BundleInputError(f"{path}: synthetic NIfTI files must be named X_image.nii.gz / X_label.nii.gz")
            continue
        roles = found.setdefault(match["prefix"], {})
        if match["role"] in roles:
            raise BundleInputError(
                f"{path}: a second synthetic {match['role']} for {match['prefix']!r} (also {roles[match['role']]})"
            )
        roles[match["role"]] = path
    if labels_required:
        for prefix, roles in found.items():
            for have, lack in (("image", "label"), ("label", "image")):
                if lack not in roles:
                    raise BundleInputError(
                        f"{roles[have]}: synthetic {have} has no {lack} file ({pair_file_name(prefix, lack)}) beside it"
                    )
    items = [dict(roles) for roles in found.values() if "image" in roles]
    items.sort(key=lambda item: os.path.basename(item["image"]))
    if not items:
        what = "pairs (X_image.nii.gz + X_label.nii.gz)" if labels_required else "images (X_image.nii.gz)"
        raise BundleInputError(f"{folder}: no synthetic {what} in this folder")
    with_label = [item for item in items if "label" in item]
    if with_label and len(with_label) != len(items):
        lacking = next(item["image"] for item in items if "label" not in item)
        raise BundleInputError(f"{lacking}: has no X_label file beside it, while other images in the folder have one")
    return [{"image": item["image"], **({"label": item["label"]} if "label" in item else {})} for item in items]


def read_pairs_manifest(folder: str, required: bool = False) -> dict[str, Any] | None:
    """The ``pairs.json`` of ``folder``; ``None`` when absent (an error when ``required``), one error line
    naming the file when it cannot be read or holds no ``pairs`` list."""
    manifest = os.path.join(folder, PAIRS_MANIFEST)
    if not os.path.isfile(manifest):
        if required:
            raise BundleInputError(f"{manifest}: not found; a folder of pairs written by inference holds one")
        return None
    try:
        with open(manifest) as f:
            content = json.load(f)
        if not isinstance(content.get("pairs"), list):
            raise KeyError("pairs")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleInputError(f"{manifest}: cannot read the synthetic pairs manifest ({type(e).__name__}: {e})") from e
    return content


def write_pairs_manifest(folder: str, records: Sequence[Mapping[str, Any]], **fields: Any) -> str:
    """Write ``pairs.json`` (``fields`` first, e.g. ``seed``, then ``pairs``) into ``folder``; returns its path."""
    path = os.path.join(folder, PAIRS_MANIFEST)
    with open(path, "w") as f:
        json.dump({**fields, "pairs": list(records)}, f, indent=1)
    return path
