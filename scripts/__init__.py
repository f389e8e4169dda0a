# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Python package of the 3D-LLDM bundle, imported from configs as ``scripts.<module>``."""

from . import (
    checkpoints,
    controlnet,
    data,
    dataset_report,
    diffusion,
    errors,
    feature_networks,
    figures,
    inference,
    labels,
    latent_cache,
    mask_fidelity,
    networks,
    outputs,
    perceptual,
    phantom,
    sample_preview,
    sampler,
    tiled_autoencoder,
    trainers,
)

__all__ = [
    "checkpoints",
    "controlnet",
    "data",
    "dataset_report",
    "diffusion",
    "errors",
    "feature_networks",
    "figures",
    "inference",
    "labels",
    "latent_cache",
    "mask_fidelity",
    "networks",
    "outputs",
    "perceptual",
    "phantom",
    "sample_preview",
    "sampler",
    "tiled_autoencoder",
    "trainers",
]
