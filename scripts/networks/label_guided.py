# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The label-guided autoencoder network: MONAI's ``SPADEAutoencoderKL`` with plain scale/shift heads.

It has the encoder and quantization convolutions of ``AutoencoderKL`` and a decoder whose
normalisation layers take their scale and shift from the one-hot label map (SPADE). With the same
encoder weights its latents are those of the plain autoencoder, so it can replace the decoder of a
trained autoencoder where the label map is known, as in label-guided generation. Loading and
warm-starting it live in :mod:`scripts.models.autoencoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import AutoencoderKL, SPADEAutoencoderKL

from scripts.core.checkpoints import unwrap
from scripts.core.settings import as_bool

__all__ = ["build_autoencoder", "build_label_guided_autoencoder", "is_label_guided"]


def build_autoencoder(
    label_guided: bool, label_nc: int, spade_intermediate_channels: int, **kwargs: Any
) -> AutoencoderKL | SPADEAutoencoderKL:
    """The stage-1 network of ``configs/common.yaml``: ``AutoencoderKL(**kwargs)``, or with ``label_guided`` the
    label-guided one of :func:`build_label_guided_autoencoder` with the same architecture.

    One definition serves both, so an overlay that resizes the autoencoder (``configs/hires.yaml``) resizes
    the label-guided one too; only the selected network is built.
    """
    if as_bool(label_guided, "label_guided_decoder"):
        return build_label_guided_autoencoder(
            label_nc=label_nc, spade_intermediate_channels=spade_intermediate_channels, **kwargs
        )
    return AutoencoderKL(**kwargs)


def build_label_guided_autoencoder(**kwargs: Any) -> SPADEAutoencoderKL:
    """MONAI's ``SPADEAutoencoderKL(**kwargs)`` with plain convolutional scale and shift heads.

    MONAI builds each SPADE layer's gamma and beta heads as ``Convolution`` blocks with that class's
    default instance normalisation, so every modulation map has zero mean and unit variance over
    space: a constant scale and shift (what the plain decoder's GroupNorm affine is) cannot be
    expressed and the label map always modulates at full strength. The SPADE paper's heads are plain
    convolutions; removing the normalisation restores them. No weights change (it has none).
    """
    network = SPADEAutoencoderKL(**kwargs)
    for module in network.decoder.modules():
        if isinstance(module, SPADE):
            for head in (module.mlp_gamma, module.mlp_beta):
                head.adn = torch.nn.Identity()
    return network


def is_label_guided(autoencoder: Any) -> bool:
    """True when ``autoencoder`` (possibly wrapped) decodes with a label map (``decode(z, seg)``)."""
    return isinstance(unwrap(autoencoder), SPADEAutoencoderKL)
