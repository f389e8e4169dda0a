# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Documentation figures.

``python -m scripts.tools.figures`` regenerates ``docs/figures/phantoms.png`` from fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from scripts.data.pairs import read_pairs_manifest
from scripts.generation.preview import OVERLAY, pick_slices, save_figure, to_ras


def _as_arrays(case: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) from a PhantomCase-like object or a 3-tuple."""
    if hasattr(case, "image"):
        return np.asarray(case.image), np.asarray(case.label), np.asarray(case.affine, dtype=np.float64)
    image, label, affine = case
    return np.asarray(image), np.asarray(label), np.asarray(affine, dtype=np.float64)


def _overlay_rgba(label2d: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros(label2d.shape + (4,), dtype=np.float32)
    for lid, (_, rgb) in OVERLAY.items():
        m = label2d == lid
        rgba[m, :3] = rgb
        rgba[m, 3] = alpha if lid == 1 else min(1.0, alpha + 0.35)
    return rgba


def save_phantom_figure(cases: Sequence[Any], path: str, titles: Sequence[str] | None = None) -> str:
    """Axial and coronal views of each case, raw and with the label overlay.

    Cases are reoriented to RAS first and shown in radiological convention (patient right on
    image left; anterior up on axial, superior up on coronal) with the true voxel aspect ratio.
    The PNG is written to a temporary file beside ``path`` and renamed, so a reader never sees
    a partial file.  Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(cases)
    if n == 0:
        raise ValueError("save_phantom_figure needs at least one case")
    fig, axes = plt.subplots(n, 4, figsize=(11.0, 2.75 * n + 0.5), squeeze=False)
    for row, case in enumerate(cases):
        image, label, affine = _as_arrays(case)
        img, lab, sp = to_ras(image, label, affine)
        z, y = pick_slices(lab)
        vmax = float(np.percentile(img[lab > 0], 99.5)) if np.any(lab > 0) else float(np.percentile(img, 99.5))
        views = [
            ("axial", img[::-1, :, z].T, lab[::-1, :, z].T, sp[1] / sp[0]),
            ("coronal", img[::-1, y, :].T, lab[::-1, y, :].T, sp[2] / sp[0]),
        ]
        for k, (name, im2, lb2, aspect) in enumerate(views):
            for j, overlay in enumerate((False, True)):
                ax = axes[row, 2 * k + j]
                ax.imshow(
                    im2, cmap="gray", vmin=0.0, vmax=vmax * 1.05, origin="lower", aspect=aspect, interpolation="nearest"
                )
                if overlay:
                    ax.imshow(_overlay_rgba(lb2, 0.28), origin="lower", aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.02, 0.97, "R", color="w", transform=ax.transAxes, va="top", fontsize=8)
                ax.text(0.98, 0.97, "L", color="w", transform=ax.transAxes, va="top", ha="right", fontsize=8)
                if row == 0:
                    ax.set_title(f"{name}{' + labels' if overlay else ''}", fontsize=10)
            if k == 0:
                title = titles[row] if titles else f"case {row}"
                axes[row, 0].set_ylabel(title, fontsize=9)
    handles = [Patch(color=rgb, label=name) for name, rgb in OVERLAY.values()]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    return save_figure(fig, path)


def save_comparison_figure(pairs_dir: str, datalist: str, dataset_dir: str, path: str, num_cases: int = 4) -> str:
    """Real image beside the image generated from its mask, for the first ``num_cases`` pairs.

    ``pairs_dir`` is an inference output (``pairs.json``); each pair's ``mask`` is looked up among
    the ``label`` entries of ``datalist`` to find the real image it was drawn from. Per case: axial
    and coronal slices of the real image, the generated one, and the generated one with the label
    overlay, same grey scale for both (RAS, radiological convention). Returns ``path``.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from scripts.data.cases import load_datalist

    real_of = {}
    for section in ("training", "validation", "test"):
        for item in load_datalist(datalist, dataset_dir, section):
            real_of[os.path.realpath(item["label"])] = item["image"]
    manifest = read_pairs_manifest(pairs_dir, required=True)
    records = [r for r in manifest["pairs"] if os.path.realpath(r["mask"]) in real_of][:num_cases]
    if not records:
        raise ValueError(f"{pairs_dir}: no pair was generated from a mask of {datalist}")
    fig, axes = plt.subplots(len(records), 6, figsize=(15.0, 2.6 * len(records) + 0.4), squeeze=False)
    for row, record in enumerate(records):
        label_nii = nib.load(os.path.join(pairs_dir, record["label"]))
        label = np.asarray(label_nii.dataobj)
        real = nib.load(real_of[os.path.realpath(record["mask"])]).get_fdata(dtype=np.float32)
        generated = nib.load(os.path.join(pairs_dir, record["image"])).get_fdata(dtype=np.float32)
        real, lab, sp = to_ras(real, label, label_nii.affine)
        generated, _, _ = to_ras(generated, label, label_nii.affine)
        real = real / max(float(np.percentile(real, 99.5)), 1e-6)  # the real image's own [0, 1] scaling
        z, y = pick_slices(lab)
        for k, (name, cut, aspect) in enumerate(
            (("axial", lambda a: a[::-1, :, z].T, sp[1] / sp[0]), ("coronal", lambda a: a[::-1, y, :].T, sp[2] / sp[0]))
        ):
            for j, (what, image, overlay) in enumerate(
                (("real", real, False), ("generated", generated, False), ("generated + mask", generated, True))
            ):
                ax = axes[row, 3 * k + j]
                ax.imshow(cut(image), cmap="gray", vmin=0.0, vmax=1.0, origin="lower", aspect=aspect)
                if overlay:
                    ax.imshow(_overlay_rgba(cut(lab), 0.25), origin="lower", aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{what}, {name}", fontsize=9)
        axes[row, 0].set_ylabel(os.path.basename(record["image"]).replace("_image.nii.gz", ""), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def grid_views(
    case: dict[str, Any], spacing: Sequence[float], spatial_size: Sequence[int]
) -> dict[str, tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
    """The images of one mask on the grid the pairs are delivered on and on the model grid.

    ``case``: ``{"image", "label", "sets": {title: image path}}``, the real image and mask files and each set's image of
    that mask, on any grid. ``delivered``: every image on the real image's grid (MONAI's trilinear ``ResampleToMatch``,
    as generation resamples its volumes), the real one scaled by its 99.5th percentile (synthetic images are already
    on [0, 1]); ``model``: every image through the evaluation's preprocessing (``spacing``, ``spatial_size``, each
    scaled by its own percentiles). Each grid: (images, real first; label; affine).
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    from scripts.data.cases import preprocessing_transforms, read_nifti
    from scripts.data.labels import LABELS, LabelContract

    real, affine = read_nifti(case["image"], role="image")
    label, _ = read_nifti(case["label"], role="label")
    target = MetaTensor(torch.zeros((1, *label.shape)), affine=torch.as_tensor(affine))
    resample = ResampleToMatch(mode="bilinear", padding_mode="zeros")
    delivered = [real / max(float(np.percentile(real, 99.5)), 1e-6)]
    for path in case["sets"].values():
        image, image_affine = read_nifti(path, role="image")
        moved = resample(MetaTensor(torch.as_tensor(image[None]), affine=torch.as_tensor(image_affine)), img_dst=target)
        delivered.append(moved[0].numpy())
    model_grid = preprocessing_transforms(LabelContract(LABELS), spacing, spatial_size)
    coarse = [model_grid({"image": p, "label": case["label"]}) for p in (case["image"], *case["sets"].values())]
    return {
        "delivered": (delivered, label, np.asarray(affine)),
        "model": (
            [c["image"][0].numpy() for c in coarse],
            coarse[0]["label"][0].numpy(),
            np.asarray(coarse[0]["label"].affine),
        ),
    }


def save_grid_comparison_figure(
    cases: Sequence[dict[str, Any]], path: str, spacing: Sequence[float], spatial_size: Sequence[int], zoom: int = 64
) -> str:
    """Real and synthetic images of the same masks, on the grid the pairs are delivered on and on the model grid.

    ``cases``: per mask ``{"name", "image", "label", "sets": {title: image path}}`` (:func:`grid_views`). Per case two
    rows, the delivered grid and the model grid; each panel is the axial slice through the most HCC, cropped to a
    ``zoom`` mm half-width window around the liver's centre so that edges and grain show; every panel has the same
    grey window, [0, 1.25] (the bright liver is not clipped). Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["real", *cases[0]["sets"]]
    fig, axes = plt.subplots(2 * len(cases), len(titles), figsize=(2.6 * len(titles), 5.4 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        for grid, (name, (images, label, affine)) in enumerate(grid_views(case, spacing, spatial_size).items()):
            views = [to_ras(image, label, affine) for image in images]
            ras_label, voxel = views[0][1], views[0][2]
            z, _ = pick_slices(ras_label)
            centre = np.argwhere(ras_label[:, :, z] > 0).mean(axis=0).astype(int)
            half = [max(int(zoom / v), 4) for v in voxel[:2]]
            window = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, half, strict=True))
            for col, (view, title) in enumerate(zip(views, titles, strict=True)):
                ax = axes[2 * row + grid, col]
                ax.imshow(view[0][window + (z,)][::-1].T, cmap="gray", vmin=0.0, vmax=1.25, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0 and grid == 0:
                    ax.set_title(title, fontsize=9)
            spacing_mm = np.round(voxel, 2).tolist()
            axes[2 * row + grid, 0].set_ylabel(f"{case['name']}, {name} grid\n{spacing_mm} mm", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_training_curves(log_dirs: dict[str, str], tags: Sequence[str], path: str) -> str:
    """One panel per scalar ``tag``, one line per run: ``log_dirs`` maps a run's name to its TensorBoard folder.

    For the model card's validation curves; tags a run did not log are skipped. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.3), squeeze=False)
    for name, log_dir in log_dirs.items():
        accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        for ax, tag in zip(axes[0], tags, strict=True):
            if tag in accumulator.Tags()["scalars"]:
                events = accumulator.Scalars(tag)
                ax.plot([e.step for e in events], [e.value for e in events], marker="o", ms=3, label=name)
    for ax, tag in zip(axes[0], tags, strict=True):
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a tag no run logged leaves an empty panel
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def save_study_figure(reports: Mapping[str, Mapping[str, Any]], path: str, class_name: str | None = None) -> str:
    """Test Dice of one class per network, real only beside each synthetic arm, one point per seed.

    ``reports`` maps a panel title to an augmentation study report (the content of its
    ``study.json``: ``runs``, ``conditions``, ``classes``); one panel each, on one Dice axis.
    ``class_name`` defaults to each report's first class (HCC). A bar marks each arm's mean, and a
    grey line joins one seed's points across the arms of a network: the differences are paired by
    seed. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len({r["network"] for r in report["runs"]}) for report in reports.values())
    fig, axes = plt.subplots(
        1, len(reports), figsize=(1.6 + 1.5 * widest * len(reports), 3.6), squeeze=False, sharey=True
    )
    for ax, (title, report) in zip(axes[0], reports.items(), strict=True):
        name = class_name or report["classes"][0]
        conditions = list(report["conditions"])
        width = 0.8 / len(conditions)
        networks = list(dict.fromkeys(r["network"] for r in report["runs"]))
        for n, network in enumerate(networks):
            dice = {
                (r["condition"], r["seed"]): r["dice"][name]
                for r in report["runs"]
                if r["network"] == network and r.get("status") == "done" and r["dice"].get(name) is not None
            }
            x = {c: n + (i - (len(conditions) - 1) / 2) * width for i, c in enumerate(conditions)}
            for seed in sorted({k for _, k in dice}):
                arms = [c for c in conditions if (c, seed) in dice]
                ax.plot([x[c] for c in arms], [dice[(c, seed)] for c in arms], color="0.75", lw=0.8, zorder=1)
            for i, condition in enumerate(conditions):
                values = [v for (c, _), v in dice.items() if c == condition]
                label = report["conditions"][condition] if n == 0 else None
                ax.scatter([x[condition]] * len(values), values, s=16, color=f"C{i}", zorder=2, label=label)
                if values:
                    ax.hlines(np.mean(values), x[condition] - 0.4 * width, x[condition] + 0.4 * width, color=f"C{i}")
        ax.set_xticks(range(len(networks)), networks, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    shown = class_name or next(iter(reports.values()))["classes"][0]
    axes[0, 0].set_ylabel(f"{shown} Dice on the real test cases", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_dataset_figure(dataset_dir: str, num_cases: int = 4, section: str = "training") -> str:
    """Figure of the first ``num_cases`` cases of a dataset's datalist, written to ``<dataset_dir>/figures/``."""
    import nibabel as nib

    from scripts.data.cases import load_datalist

    items = load_datalist(os.path.join(dataset_dir, "datalist.json"), dataset_dir, section)[:num_cases]
    cases = [
        (
            nib.load(item["image"]).get_fdata(dtype=np.float32),
            np.asarray(nib.load(item["label"]).dataobj),
            nib.load(item["image"]).affine,
        )
        for item in items
    ]
    titles = [os.path.basename(item["image"]).split(".")[0] for item in items]
    return save_phantom_figure(cases, os.path.join(dataset_dir, "figures", "phantoms.png"), titles)


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate ``docs/figures/phantoms.png`` from fixed seeds, or with ``--study_reports`` the
    augmentation study figure of several reports side by side."""
    from scripts.tools.phantom import generate_phantom

    p = argparse.ArgumentParser(description="Documentation figures.")
    p.add_argument("--out", default=os.path.join("docs", "figures", "phantoms.png"))
    p.add_argument("--seeds", default="0,4,8,11")
    p.add_argument("--study_reports", nargs="+", metavar="TITLE=STUDY_JSON", help="one panel per study report")
    a = p.parse_args(argv)
    if a.study_reports:
        reports = {}
        for item in a.study_reports:
            title, _, report_path = item.rpartition("=")
            with open(report_path) as f:
                reports[title or report_path] = json.load(f)
        print(save_study_figure(reports, a.out))
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    cases = [generate_phantom(s) for s in seeds]
    titles = [f"seed {s}: {c.info['axcodes']}, HCC x{c.info['n_hcc']}" for s, c in zip(seeds, cases, strict=True)]
    print(save_phantom_figure(cases, a.out, titles))


if __name__ == "__main__":
    main()
