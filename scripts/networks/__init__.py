# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Networks and losses around MONAI core networks: adapters, feature extractors, perceptual loss, tiling."""

from . import adapters, feature_networks, perceptual, tiled_autoencoder

__all__ = ["adapters", "feature_networks", "perceptual", "tiled_autoencoder"]
