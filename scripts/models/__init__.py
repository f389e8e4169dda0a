# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The trained stages and baselines: training engines, batch preparation and weight loading."""

from . import autoencoder, controlnet, diffusion, gan_baseline, segmentation, trainers

__all__ = ["autoencoder", "controlnet", "diffusion", "gan_baseline", "segmentation", "trainers"]
