# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Thin adapters around MONAI core networks for engines and checks that expect tensor -> tensor."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL

from scripts.core.checkpoints import unwrap
from scripts.data.labels import LabelContract
from scripts.networks.label_guided import is_label_guided

__all__ = ["AutoencoderReconstruction"]


class AutoencoderReconstruction(torch.nn.Module):
    """Image -> reconstruction through the latent mean (no sampling), as one tensor.

    ``AutoencoderKL.forward`` returns ``(reconstruction, z_mu, z_sigma)`` with a sampled latent;
    evaluators, metrics and ``verify_net_in_out`` want the deterministic reconstruction alone.
    A label-guided autoencoder (``SPADEAutoencoderKL``) also takes the integer label map, which
    evaluators pass as an extra input (``monai.engines.PrepareBatchExtraInput``).
    """

    def __init__(self, autoencoder: torch.nn.Module, contract: LabelContract | None = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.contract = contract

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        net: AutoencoderKL = unwrap(self.autoencoder)
        if not is_label_guided(net):
            return net.reconstruct(image)
        if label is None or self.contract is None:
            raise ValueError("a label-guided autoencoder reconstructs only with a label map and the label contract")
        return net.reconstruct(image, self.contract.one_hot(label.to(image.device)).float())
