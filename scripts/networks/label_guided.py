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

import inspect
from typing import Any

import torch
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import AutoencoderKL, SPADEAutoencoderKL
from monai.networks.nets.spade_autoencoderkl import SPADEDecoder

from scripts.core.checkpoints import unwrap
from scripts.core.errors import BundleInputError
from scripts.core.settings import as_bool

__all__ = ["RefiningAutoencoder", "build_autoencoder", "build_label_guided_autoencoder", "is_label_guided"]


def build_autoencoder(
    label_guided: bool, label_nc: int, spade_intermediate_channels: int, decoder_upsampling: int = 0, **kwargs: Any
) -> AutoencoderKL | SPADEAutoencoderKL:
    """The stage-1 network of ``configs/common.yaml``: ``AutoencoderKL(**kwargs)``, or with ``label_guided`` the
    label-guided one of :func:`build_label_guided_autoencoder` with the same architecture.

    One definition serves both, so an overlay that resizes the autoencoder (``configs/hires.yaml``) resizes
    the label-guided one too; only the selected network is built. ``decoder_upsampling`` (label-guided only)
    gives the decoder that many more 2x upsampling levels than the encoder has downsampling levels.
    """
    if as_bool(label_guided, "label_guided_decoder"):
        return build_label_guided_autoencoder(
            label_nc=label_nc,
            spade_intermediate_channels=spade_intermediate_channels,
            decoder_upsampling=decoder_upsampling,
            **kwargs,
        )
    if int(decoder_upsampling):
        raise BundleInputError(
            f"config 'decoder_upsampling' {decoder_upsampling}: only a label-guided decoder refines the grid "
            "(it reads the mask at the finer grid); pass --label_guided_decoder true"
        )
    return AutoencoderKL(**kwargs)


def build_label_guided_autoencoder(decoder_upsampling: int = 0, **kwargs: Any) -> SPADEAutoencoderKL:
    """MONAI's ``SPADEAutoencoderKL(**kwargs)`` with plain convolutional scale and shift heads.

    MONAI builds each SPADE layer's gamma and beta heads as ``Convolution`` blocks with that class's
    default instance normalisation, so every modulation map has zero mean and unit variance over
    space: a constant scale and shift (what the plain decoder's GroupNorm affine is) cannot be
    expressed and the label map always modulates at full strength. The SPADE paper's heads are plain
    convolutions; removing the normalisation restores them. No weights change (it has none).

    ``decoder_upsampling`` k > 0: a :class:`RefiningAutoencoder`.
    """
    if int(decoder_upsampling) > 0:
        network = RefiningAutoencoder(int(decoder_upsampling), **kwargs)
    else:
        network = SPADEAutoencoderKL(**kwargs)
    for module in network.decoder.modules():
        if isinstance(module, SPADE):
            for head in (module.mlp_gamma, module.mlp_beta):
                head.adn = torch.nn.Identity()
    return network


class RefiningAutoencoder(SPADEAutoencoderKL):
    """A label-guided autoencoder whose decoder outputs a grid ``2**levels`` times finer per axis than its encoder reads.

    The decoder is MONAI's ``SPADEDecoder`` with ``levels`` more levels at the top (the first level's channels),
    reading the label map on the fine grid. The encoder is the one of ``SPADEAutoencoderKL(**kwargs)``, so its
    latents are those of the model grid; given a fine-grid image, it first averages it back onto the coarse grid
    (each coarse voxel the mean of the fine voxels it holds), so that the whole network trains and validates on
    the fine grid with the bundle's stage-1 workflow: ``--spacing`` and ``--spatial_size`` of the fine grid.
    Generation decodes sampled latents with the mask on the fine grid aligned with the model grid.
    """

    def __init__(self, levels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decoder_upsampling = int(levels)
        self.decoder = _refining_decoder(self.decoder_upsampling, **kwargs)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std of a fine-grid image, read on the model grid."""
        pool = torch.nn.functional.avg_pool3d if x.dim() == 5 else torch.nn.functional.avg_pool2d
        return super().encode(pool(x, 2**self.decoder_upsampling))


def _refining_decoder(levels: int, **kwargs: Any) -> SPADEDecoder:
    """The ``SPADEDecoder`` of ``SPADEAutoencoderKL(**kwargs)`` with ``levels`` more top levels (MONAI builds
    encoder and decoder from one channel list, hence this second decoder)."""
    defaults = inspect.signature(SPADEAutoencoderKL.__init__).parameters
    args = {name: p.default for name, p in defaults.items() if p.default is not inspect.Parameter.empty}
    args.update(kwargs)
    channels = list(args["channels"])
    res_blocks = args["num_res_blocks"]
    res_blocks = [int(res_blocks)] * len(channels) if isinstance(res_blocks, int) else list(res_blocks)
    return SPADEDecoder(
        spatial_dims=args["spatial_dims"],
        channels=[channels[0]] * levels + channels,
        in_channels=args["latent_channels"],
        out_channels=args["out_channels"],
        num_res_blocks=[res_blocks[0]] * levels + res_blocks,
        norm_num_groups=args["norm_num_groups"],
        norm_eps=args["norm_eps"],
        attention_levels=[False] * levels + list(args["attention_levels"]),
        label_nc=args["label_nc"],
        with_nonlocal_attn=args["with_decoder_nonlocal_attn"],
        spade_intermediate_channels=args["spade_intermediate_channels"],
        include_fc=args["include_fc"],
        use_combined_linear=args["use_combined_linear"],
        use_flash_attention=args["use_flash_attention"],
    )


def is_label_guided(autoencoder: Any) -> bool:
    """True when ``autoencoder`` (possibly wrapped) decodes with a label map (``decode(z, seg)``)."""
    return isinstance(unwrap(autoencoder), SPADEAutoencoderKL)
