# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Data layer: datalists, NIfTI checks, label contract, mask editing, latent cache, pair folders."""

from . import cases, dataset_report, labels, latent_cache, latent_space, masks, pairs

__all__ = ["cases", "dataset_report", "labels", "latent_cache", "latent_space", "masks", "pairs"]
