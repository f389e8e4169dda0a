# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Thin adapters around MONAI core networks for engines and checks that expect tensor -> tensor."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL

from scripts.core.checkpoints import unwrap

__all__ = ["AutoencoderReconstruction"]


class AutoencoderReconstruction(torch.nn.Module):
    """Image -> reconstruction through the latent mean (no sampling), as one tensor.

    ``AutoencoderKL.forward`` returns ``(reconstruction, z_mu, z_sigma)`` with a sampled latent;
    evaluators, metrics and ``verify_net_in_out`` want the deterministic reconstruction alone.
    """

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        net: AutoencoderKL = unwrap(self.autoencoder)
        return net.reconstruct(image)
