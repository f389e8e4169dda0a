# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""PNG previews of generated pairs, and the slice rendering the documentation figures share:
reorientation to RAS, slice choice, label colours, atomic PNG writes."""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.data.utils import affine_to_spacing

from scripts.core.outputs import atomic_path
from scripts.data.labels import LABELS

__all__ = ["OVERLAY", "to_ras", "pick_slices", "save_figure", "save_pair_preview"]

# label id -> (name, RGB colour) of the overlay
OVERLAY = {
    LABELS["liver"]: ("liver", (0.15, 0.8, 0.25)),
    LABELS["portal_vein"]: ("portal vein", (0.2, 0.55, 1.0)),
    LABELS["hepatic_vein"]: ("hepatic vein", (0.95, 0.3, 0.9)),
    LABELS["hcc"]: ("HCC", (1.0, 0.85, 0.1)),
}


def to_ras(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient arrays to the closest RAS+ axis order; returns (image, label, voxel spacing)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    img = nib.orientations.apply_orientation(image, ornt)
    lab = nib.orientations.apply_orientation(label, ornt)
    spacing = affine_to_spacing(affine, r=3, suppress_zeros=False)[ornt[:, 0].astype(int).argsort()]
    return img, lab, spacing


def pick_slices(label: np.ndarray) -> tuple[int, int]:
    """Axial (z) and coronal (y) indices with the most HCC voxels (ties: most liver), else liver."""
    liver = (label > 0).astype(np.float64)
    score = liver / max(float(liver.sum()), 1.0) + (label == LABELS["hcc"])
    if not liver.any():
        return label.shape[2] // 2, label.shape[1] // 2
    return int(np.argmax(score.sum(axis=(0, 1)))), int(np.argmax(score.sum(axis=(0, 2))))


def save_figure(fig: Any, path: str) -> str:
    """Write ``fig`` as PNG through a temporary sibling file and an atomic rename; close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
            _shrink_png(tmp)
    finally:
        plt.close(fig)
    return path


def save_pair_preview(image: np.ndarray, label: np.ndarray, affine: np.ndarray, path: str, title: str = "") -> str:
    """Axial, coronal and sagittal slices of a generated pair with the label's contours.

    Slices cross the largest HCC (else the liver's middle); shown in RAS radiological convention
    with the true voxel aspect ratio. Written atomically; returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    img, lab, sp = to_ras(np.asarray(image, dtype=np.float32), np.asarray(label), np.asarray(affine, dtype=np.float64))
    z, y = pick_slices(lab)
    x = int(np.argmax(((lab > 0) / max(float((lab > 0).sum()), 1.0) + (lab == LABELS["hcc"])).sum(axis=(1, 2))))
    if not (lab > 0).any():
        x = lab.shape[0] // 2
    vmax = float(np.percentile(img, 99.5)) or 1.0
    views = [
        ("axial", img[::-1, :, z].T, lab[::-1, :, z].T, sp[1] / sp[0]),
        ("coronal", img[::-1, y, :].T, lab[::-1, y, :].T, sp[2] / sp[0]),
        ("sagittal", img[x, :, :].T, lab[x, :, :].T, sp[2] / sp[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9))
    for ax, (name, im2, lb2, aspect) in zip(axes, views, strict=True):
        ax.imshow(
            im2, cmap="gray", vmin=float(img.min()), vmax=vmax, origin="lower", aspect=aspect, interpolation="nearest"
        )
        for lid, (_, rgb) in OVERLAY.items():
            if (lb2 == lid).any():
                ax.contour((lb2 == lid).astype(np.float32), levels=[0.5], colors=[rgb], linewidths=0.9, origin="lower")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=rgb, label=name) for name, rgb in OVERLAY.values()]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def _shrink_png(path: str) -> None:
    """Quantise to a 256-colour palette: noisy greyscale slices otherwise make a large PNG."""
    try:
        from PIL import Image
    except ImportError:  # matplotlib depends on Pillow, so this is only a safety net
        return
    with Image.open(path) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    q.save(path, format="PNG", optimize=True)
