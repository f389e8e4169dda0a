# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the main job's masks come from: a folder, a datalist section, or the bundle's demo masks.

Every entry that looks like a mask but cannot be read as one is named in a warning, and output names (the
file stems) must be unique, so no mask is left out or overwritten without a word.
"""

from __future__ import annotations

import errno
import logging
import os

from scripts.core.errors import BundleInputError
from scripts.data.cases import NIFTI_SUFFIXES, load_datalist

__all__ = ["find_masks"]

logger = logging.getLogger(__name__)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES[::-1]:  # .nii.gz before .nii
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _unreachable(path: str) -> str | None:
    """Why the folder entry ``path`` is a symlink that leads nowhere usable, or ``None`` if it is not."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno == errno.ENOENT:
            return f"broken symlink (its target {os.readlink(path)} does not exist)"
        return f"symlink that cannot be followed ({e.strerror})"
    return None


def _scan_mask_dir(mask_dir: str) -> tuple[list[str], list[str]]:
    """The NIfTI files of ``mask_dir`` (sorted paths) and the names of its other files.

    Hidden entries are ignored and so are sub-folders, except one named like a mask
    (``x.nii.gz/``); every entry that looks like a mask but is no readable file (that folder, a
    broken symlink, a symlink loop, a pipe or device) gets a warning naming it, so a mask the user
    expects is never left out without a word.
    """
    masks, others = [], []
    for name in sorted(os.listdir(mask_dir)):
        if name.startswith("."):
            continue
        path = os.path.join(mask_dir, name)
        looks_like_mask = name.endswith(NIFTI_SUFFIXES)
        problem = _unreachable(path)
        if problem is None and looks_like_mask and not os.path.isfile(path):
            problem = "a folder, not a file" if os.path.isdir(path) else "not a regular file"
        if problem is not None:
            logger.warning(f"{path}: skipped, {problem}")
        elif looks_like_mask:
            masks.append(path)
        elif os.path.isfile(path):
            others.append(name)
    return masks, others


def find_masks(
    mask_dir: str | None = None,
    datalist: str | None = None,
    dataset_dir: str | None = None,
    section: str = "test",
    demo_mask_dir: str | None = None,
) -> list[dict[str, str]]:
    """Input masks as ``[{"label": path, "name": stem}]``, from the first source given.

    ``mask_dir``: every ``.nii``/``.nii.gz`` file in it (other files are listed in the log and
    left alone; broken symlinks, symlink loops and folders or other non-files named like a mask
    are skipped with a warning naming each); else the ``label`` entries of ``datalist``'s
    ``section``; else the bundle's demo masks. Output names come from file names, so they must be
    unique.
    """
    if mask_dir:
        if not os.path.isdir(mask_dir):
            flag = "--demo_mask_dir" if mask_dir == demo_mask_dir else "--mask_dir"
            raise BundleInputError(f"{mask_dir}: mask folder not found ({flag})")
        masks, others = _scan_mask_dir(mask_dir)
        if others:
            logger.warning(f"{mask_dir}: not NIfTI, left alone: {', '.join(others)}")
        where = mask_dir
    elif datalist:
        masks = [item["label"] for item in load_datalist(datalist, dataset_dir or "", section, keys=("label",))]
        where = f"{datalist} [{section}]"
    else:
        if not demo_mask_dir:
            raise BundleInputError("no masks given: pass --mask_dir DIR or --datalist FILE")
        return find_masks(mask_dir=demo_mask_dir, demo_mask_dir=demo_mask_dir)
    if not masks:
        raise BundleInputError(f"{where}: no label maps (.nii or .nii.gz) to generate from")
    items = [{"label": path, "name": _stem(path)} for path in masks]
    seen: dict[str, str] = {}
    for item in items:
        if item["name"] in seen:
            raise BundleInputError(
                f"{item['label']}: same output name {item['name']!r} as {seen[item['name']]}; rename one of them"
            )
        seen[item["name"]] = item["label"]
    return items
