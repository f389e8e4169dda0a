# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Python package of the 3D-LLDM bundle, imported from configs as ``scripts.<module>``."""

from . import (
    checkpoints,
    data,
    dataset_report,
    errors,
    feature_networks,
    figures,
    labels,
    networks,
    outputs,
    perceptual,
    phantom,
    tiled_autoencoder,
    trainers,
)

__all__ = [
    "checkpoints",
    "data",
    "dataset_report",
    "errors",
    "feature_networks",
    "figures",
    "labels",
    "networks",
    "outputs",
    "perceptual",
    "phantom",
    "tiled_autoencoder",
    "trainers",
]
