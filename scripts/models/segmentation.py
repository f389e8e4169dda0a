# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Downstream segmentation study: which network to train, which synthetic pairs join the real
training cases, and the per-class Dice report of a trained network.

``configs/train_segmentation.yaml`` trains one of five MONAI CNNs on the real training split,
optionally plus synthetic image/label pairs written by ``configs/inference.yaml``; it selects on
the real validation split and reports on the real test split. Synthetic pairs never enter
validation or testing, and pairs generated from a held-out mask are refused (a test label seen
in training, even re-rendered, would inflate the test Dice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from scripts.core.checkpoints import load_network_weights
from scripts.core.errors import BundleInputError
from scripts.core.outputs import write_text_atomic
from scripts.data.labels import LabelContract
from scripts.data.pairs import PAIRS_MANIFEST, find_pairs, pair_prefix, read_pairs_manifest

__all__ = [
    "select_network",
    "size_divisor",
    "check_patch_fits",
    "synthetic_pairs",
    "check_synthetic_sources",
    "load_segmentation_weights",
    "report_order",
    "write_dice_report",
]

logger = logging.getLogger(__name__)

_SAMPLE_SUFFIX = re.compile(r"_s\d+$")


# ---------------------------------------------------------------------------------------- networks
def select_network(networks: Mapping[str, Callable[[], torch.nn.Module]], name: str) -> Callable[[], torch.nn.Module]:
    """The constructor of network ``name`` among ``networks`` (name -> constructor)."""
    if name not in networks:
        raise BundleInputError(
            f"config 'network': unknown network {name!r}; use --network " + ", ".join(sorted(networks))
        )
    return networks[name]


def size_divisor(network: torch.nn.Module) -> tuple[int, ...]:
    """Per-axis factor a patch side must be a multiple of for ``network`` (MONAI's five CNNs).

    Each stride-2 level halves the patch, and the decoder must meet the encoder's skip at the
    same size. Other network types get 1 (no check).
    """
    name = type(network).__name__
    if name == "VNet":  # four fixed stride-2 down transitions
        return (16, 16, 16)
    if name == "SegResNet":
        return (2 ** (len(network.blocks_down) - 1),) * 3
    strides = getattr(network, "strides", None)  # UNet, AttentionUnet, DynUNet
    if name in ("UNet", "AttentionUnet", "DynUNet") and strides is not None:
        divisor = [1, 1, 1]
        for stride in strides:
            per_axis = stride if isinstance(stride, Sequence) else (stride,) * 3
            divisor = [d * int(s) for d, s in zip(divisor, per_axis, strict=True)]
        return tuple(divisor)
    return (1, 1, 1)


def check_patch_fits(network: torch.nn.Module, patch_size: Sequence[int], name: str) -> bool:
    """Raise one line unless every side of ``patch_size`` is a multiple of ``network``'s divisor."""
    divisor = size_divisor(network)
    if any(int(p) % d for p, d in zip(patch_size, divisor, strict=False)):
        raise BundleInputError(
            f"config 'patch_size' {list(patch_size)} does not suit --network {name}: every side must be a multiple "
            f"of {list(divisor)} (its downsampling); multiples of 16 suit all five networks"
        )
    return True


# ---------------------------------------------------------------------------------------- synthetic pairs
def synthetic_pairs(synthetic_dir: str | None, ratio: float, num_real: int, seed: int = 0) -> list[dict[str, str]]:
    """The synthetic pairs to train on: ``round(ratio * num_real)`` of those in ``synthetic_dir``.

    ``ratio`` is synthetic cases per real training case (0: real cases only; rounding is half
    up). The choice depends only on the folder's file names and ``seed``: masks are taken in a
    seeded random order, one sample of each before a second sample of any (``X_s{k}`` files),
    so a subset covers as many different label maps as it can.
    """
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio < 0:
        raise BundleInputError(f"config 'synthetic_ratio' must be a number >= 0, got {ratio}")
    if ratio == 0:
        if synthetic_dir:
            logger.info(f"synthetic_ratio is 0: training on real cases only, {synthetic_dir} unused")
        return []
    if not synthetic_dir:
        raise BundleInputError(
            f"config 'synthetic_ratio' is {ratio:g} but no synthetic pairs are given: "
            "pass --synthetic_dir DIR (a folder written by configs/inference.yaml)"
        )
    wanted = int(math.floor(ratio * num_real + 0.5))
    if wanted == 0:
        raise BundleInputError(
            f"config 'synthetic_ratio' {ratio:g} x {num_real} real training cases rounds to 0 "
            "synthetic cases; raise --synthetic_ratio or pass 0 for real cases only"
        )
    pairs = find_pairs(synthetic_dir)
    if wanted > len(pairs):
        raise BundleInputError(
            f"{synthetic_dir}: synthetic_ratio {ratio:g} x {num_real} real training cases needs "
            f"{wanted} synthetic pairs, the folder has {len(pairs)}"
        )
    groups: dict[str, list[dict[str, str]]] = {}
    for pair in pairs:
        prefix = pair_prefix(pair["image"])
        groups.setdefault(_SAMPLE_SUFFIX.sub("", prefix), []).append(pair)
    rng = random.Random(int(seed))
    order = sorted(groups)
    rng.shuffle(order)
    for key in order:
        rng.shuffle(groups[key])
    rounds = max(len(g) for g in groups.values())
    chosen = [groups[key][k] for k in range(rounds) for key in order if k < len(groups[key])][:wanted]
    logger.info(
        f"training on {len(chosen)} synthetic pairs of {len(pairs)} in {synthetic_dir} "
        f"(synthetic_ratio {ratio:g} x {num_real} real cases)"
    )
    return sorted(chosen, key=lambda p: p["image"])


def check_synthetic_sources(
    synthetic: Sequence[Mapping[str, str]], held_out: Sequence[Mapping[str, str]], synthetic_dir: str | None
) -> int:
    """Refuse synthetic pairs generated from a validation or test mask (read from ``pairs.json``).

    Returns how many pairs have a known source mask; pairs from a folder without the manifest
    cannot be checked and are taken on trust.
    """
    if not synthetic or not synthetic_dir:
        return 0
    content = read_pairs_manifest(synthetic_dir)
    manifest = os.path.join(synthetic_dir, PAIRS_MANIFEST)
    if content is None:
        logger.warning(f"{manifest} not found: cannot check that the synthetic pairs come from training masks")
        return 0
    try:
        sources = {os.path.basename(r["image"]): os.path.realpath(r["mask"]) for r in content["pairs"] if r.get("mask")}
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleInputError(f"{manifest}: cannot read the synthetic pairs manifest ({type(e).__name__}: {e})") from e
    held_out_labels = {os.path.realpath(item["label"]) for item in held_out}
    known = 0
    for pair in synthetic:
        source = sources.get(os.path.basename(pair["image"]))
        known += source is not None
        if source in held_out_labels:
            raise BundleInputError(
                f"{pair['image']}: generated from the held-out mask {source} (validation or test split); "
                "training on it would leak that label into the evaluation: generate pairs from training masks only"
            )
    return known


# ---------------------------------------------------------------------------------------- evaluation
def load_segmentation_weights(network: torch.nn.Module, path: str, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Load the ``model`` weights of a training checkpoint into ``network``, checking its settings.

    ``expected`` lists settings (network name, labels) the checkpoint must have been trained with;
    the weights alone may fit another label set with as many classes, under the wrong names.
    """
    checkpoint = load_network_weights(
        network,
        path,
        "model",
        "segmentation weights",
        hint="train them first with `python -m monai.bundle run training --config_file "
        "\"['configs/common.yaml', 'configs/train_base.yaml', 'configs/train_segmentation.yaml']\"` "
        "(the best checkpoint is written at the first validation)",
    )
    for key, value in expected.items():
        if key in checkpoint and checkpoint[key] != value:
            raise BundleInputError(f"{path}: trained with {key} {checkpoint[key]!r}, this run has {value!r}")
    return checkpoint


def report_order(contract: LabelContract, first: Sequence[str] = ()) -> list[str]:
    """Foreground class names, those of ``first`` leading (e.g. HCC), the rest by id."""
    names = contract.names[1:]
    unknown = [n for n in first if n not in names]
    if unknown:
        raise BundleInputError(f"config 'report_first': {unknown} are not foreground classes of 'labels' {names}")
    return list(first) + [n for n in names if n not in first]


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def write_dice_report(
    path: str,
    evaluator: Any,
    metric_name: str,
    cases: Sequence[Mapping[str, str]],
    contract: LabelContract,
    first: Sequence[str] = (),
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the per-class Dice of a finished evaluation as JSON (atomically) and return it.

    ``evaluator.state.metric_details[metric_name]`` holds one row per case (in ``cases`` order)
    and one column per foreground class (a ``MeanDice`` with ``include_background=False``).
    A class absent from a case's ground truth has no Dice there (``null``: MONAI ignores such
    cases, so false positives in them are not counted); ``dice`` averages each class over the
    cases that have it, and ``mean_dice`` averages the classes.
    """
    details = torch.as_tensor(evaluator.state.metric_details[metric_name]).detach().cpu().double()
    names = contract.names[1:]
    if details.ndim != 2 or details.shape != (len(cases), len(names)):
        raise RuntimeError(f"expected Dice details of shape {(len(cases), len(names))}, got {tuple(details.shape)}")
    order = report_order(contract, first)
    column = {name: details[:, i] for i, name in enumerate(names)}
    dice = {n: _number(float(column[n].nanmean())) if not column[n].isnan().all() else None for n in order}
    present = [v for v in dice.values() if v is not None]
    report = {
        **(info or {}),
        "num_cases": len(cases),
        "mean_dice": _number(sum(present) / len(present)) if present else None,
        "dice": dice,
        "cases_with_class": {n: int((~column[n].isnan()).sum()) for n in order},
        "per_case": [
            {
                "image": case.get("image"),
                "label": case["label"],
                "dice": {n: _number(float(column[n][row])) for n in order},
            }
            for row, case in enumerate(cases)
        ],
    }
    write_text_atomic(path, json.dumps(report, indent=2))
    summary = ", ".join(f"{n} {v:.4f}" if v is not None else f"{n} n/a" for n, v in dice.items())
    logger.info(f"Dice on {len(cases)} cases: {summary}; written to {path}")
    return report
