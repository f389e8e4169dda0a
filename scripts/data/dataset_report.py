# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Check a dataset before training on it, and describe what the model will see.

Every datalist entry is checked (see :func:`scripts.data.cases.check_case`), pushed through the
preprocessing chain, and summarised: original grid, orientation, and per-class voxel counts on
the model grid. A class that vanishes after resampling (a thin vessel at a coarse spacing, say)
shows up here instead of as a silent gap in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import Compose
from tqdm import tqdm

from scripts.core.errors import BundleInputError
from scripts.core.outputs import write_text_atomic
from scripts.data.cases import check_cases, load_datalist
from scripts.data.labels import LabelContract

__all__ = ["describe_case", "write_dataset_report"]


def describe_case(item: dict[str, str], preprocessing: Compose, contract: LabelContract) -> dict[str, Any]:
    """Original grid and orientation plus per-class voxel counts after preprocessing."""
    header = nib.load(item["label"])
    case = preprocessing(item)
    label = np.asarray(case["label"])
    image = np.asarray(case["image"])
    counts = {name: int((label == idx).sum()) for name, idx in contract.labels.items()}
    return {
        "image": item["image"],
        "label": item["label"],
        "original_shape": [int(s) for s in header.shape[:3]],
        "original_spacing_mm": [round(float(s), 4) for s in header.header.get_zooms()[:3]],
        "original_axcodes": "".join(nib.aff2axcodes(header.affine)),
        "model_grid_shape": [int(s) for s in label.shape[-3:]],
        "image_range": [float(image.min()), float(image.max())],
        "voxels_per_class": counts,
    }


def write_dataset_report(
    datalist: str,
    dataset_dir: str,
    preprocessing: Compose,
    contract: LabelContract,
    output_path: str,
    sections: Sequence[str] = ("training", "validation", "test"),
) -> dict[str, Any]:
    """Check and describe every case of ``sections``; write the report as JSON (atomically)."""
    report: dict[str, Any] = {"datalist": os.path.abspath(datalist), "sections": {}}
    for section in sections:
        items = load_datalist(datalist, dataset_dir, section)
        if not items:
            report["sections"][section] = {"num_cases": 0, "cases": []}
            continue
        check_cases(items, contract, what=f"{datalist} [{section}]")
        cases = [describe_case(item, preprocessing, contract) for item in tqdm(items, desc=f"describing {section}")]
        missing = {name: sum(c["voxels_per_class"][name] == 0 for c in cases) for name in contract.names}
        report["sections"][section] = {"num_cases": len(cases), "cases_without_class": missing, "cases": cases}
    if not any(s["num_cases"] for s in report["sections"].values()):
        raise BundleInputError(f"{datalist}: no cases in sections {list(sections)}")
    write_text_atomic(output_path, json.dumps(report, indent=2))
    for section, summary in report["sections"].items():
        print(
            f"{section}: {summary['num_cases']} cases"
            + (
                f", cases lacking a class after preprocessing: {summary['cases_without_class']}"
                if summary["num_cases"]
                else ""
            )
        )
    print(f"report written to {output_path}")
    return report
