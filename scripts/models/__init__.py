# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The trained stages and baselines: training engines, batch preparation and weight loading."""

from . import controlnet, diffusion, gan_baseline, segmentation, trainers

__all__ = ["controlnet", "diffusion", "gan_baseline", "segmentation", "trainers"]
