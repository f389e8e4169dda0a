# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The documentation figures that compare real and synthetic images of the same masks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import write_nifti
from scipy.ndimage import binary_erosion

from scripts.tools.figures import grid_views, main, save_grid_comparison_figure, save_study_figure


def _case(tiny_phantoms: Path, tmp_path: Path) -> dict:
    """A test phantom with two 'sets': its image scaled to [0, 1] as given, and the same on a 2x coarser grid."""
    item = json.loads((tiny_phantoms / "datalist.json").read_text())["test"][0]
    image_path, label_path = tiny_phantoms / item["image"], tiny_phantoms / item["label"]
    real = nib.load(image_path)
    data = real.get_fdata(dtype=np.float32)
    scaled = data / np.percentile(data, 99.5)
    coarse_affine = real.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_affine[:3, 3] = real.affine[:3, 3] + real.affine[:3, :3] @ np.full(3, 0.5)  # centred on 2x2x2 blocks
    blocks = scaled[: scaled.shape[0] // 2 * 2, : scaled.shape[1] // 2 * 2, : scaled.shape[2] // 2 * 2]
    blocks = blocks.reshape(blocks.shape[0] // 2, 2, blocks.shape[1] // 2, 2, blocks.shape[2] // 2, 2).mean((1, 3, 5))
    return {
        "name": "case",
        "image": str(image_path),
        "label": str(label_path),
        "sets": {
            "copy": write_nifti(tmp_path / "copy.nii.gz", scaled.astype(np.float32), real.affine),
            "coarse": write_nifti(tmp_path / "coarse.nii.gz", blocks.astype(np.float32), coarse_affine),
        },
    }


def test_grid_views_bring_every_set_onto_the_real_grid_and_the_model_grid(tiny_phantoms, tmp_path):
    case = _case(tiny_phantoms, tmp_path)
    views = grid_views(case, spacing=[4.0, 4.0, 4.0], spatial_size=[16, 16, 16])
    (real, copy, coarse), label, affine = views["delivered"]
    assert real.shape == copy.shape == coarse.shape == label.shape
    np.testing.assert_allclose(copy, real, atol=1e-5)  # a copy on the real grid is shown as the real image
    inner = binary_erosion(label == 1, iterations=2)  # away from edges the 2x2x2 means keep the liver's level
    assert abs(coarse[inner].mean() - real[inner].mean()) < 0.05  # the coarse copy lands where the real image is
    assert np.abs(np.diff(coarse, axis=0)).mean() < np.abs(np.diff(real, axis=0)).mean()  # and is smoother
    np.testing.assert_allclose(affine, nib.load(case["image"]).affine)
    (real_m, copy_m, coarse_m), label_m, _ = views["model"]
    assert real_m.shape == copy_m.shape == coarse_m.shape == label_m.shape == (16, 16, 16)
    np.testing.assert_allclose(copy_m, real_m, atol=1e-4)


def test_grid_comparison_figure_is_a_png_with_two_rows_per_case(tiny_phantoms, tmp_path):
    case = _case(tiny_phantoms, tmp_path)
    one = save_grid_comparison_figure([case], str(tmp_path / "one.png"), [4.0, 4.0, 4.0], [16, 16, 16], zoom=30)
    two = save_grid_comparison_figure([case, case], str(tmp_path / "two.png"), [4.0, 4.0, 4.0], [16, 16, 16], zoom=30)
    assert Path(one).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height = lambda p: int.from_bytes(Path(p).read_bytes()[20:24], "big")  # noqa: E731 (PNG IHDR height)
    assert height(two) > 1.8 * height(one)


def _report(networks: list[str], conditions: dict[str, str], seeds: int = 3) -> dict:
    """A study.json-like report: HCC Dice rising with the arm's index, one run left unfinished."""
    runs = [
        {"network": n, "condition": c, "seed": k, "status": "done", "dice": {"hcc": 0.2 + 0.1 * i + 0.01 * k}}
        for n in networks
        for k in range(seeds)
        for i, c in enumerate(conditions)
    ]
    runs[-1] = {**runs[-1], "status": "failed", "dice": None}
    return {"classes": ["hcc", "liver"], "conditions": conditions, "runs": runs}


def test_study_figure_has_one_panel_per_report_and_comes_from_the_command_line(tmp_path):
    kinds = {"real": "real only", "new1": "real + new x1", "new3": "real + new x3"}
    one = save_study_figure({"new masks": _report(["unet", "vnet"], kinds)}, str(tmp_path / "one.png"))
    reports = {"a": _report(["unet", "vnet"], kinds), "b": _report(["unet"], {"real": "real only", "re3": "x3"})}
    paths = []
    for title, report in reports.items():
        paths.append(f"{title}={tmp_path / (title + '.json')}")
        (tmp_path / f"{title}.json").write_text(json.dumps(report))
    main(["--out", str(tmp_path / "two.png"), "--study_reports", *paths])
    width = lambda p: int.from_bytes(Path(p).read_bytes()[16:20], "big")  # noqa: E731 (PNG IHDR width)
    assert Path(one).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert width(tmp_path / "two.png") > 1.5 * width(one)  # a second panel as wide
