# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The stage-1 autoencoder's latent space: which weights define it, its identity, decoder-only training.

The diffusion UNet, the ControlNet and the latent cache depend on the latents, which MONAI's
``AutoencoderKL`` computes from its encoder and its two quantization convolutions only; the decoder
just turns latents back into images. So a decoder fine-tuned with the encoder frozen (the way image
latent-diffusion models sharpen their decoders after the fact) keeps every later stage valid, and
their checkpoints record the identity of the encoder side rather than of the whole autoencoder.
MONAI has no notion of this split, hence this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from scripts.core.checkpoints import unwrap, weights_sha256
from scripts.core.errors import BundleInputError

__all__ = ["LATENT_SPACE_MODULES", "check_latent_space", "freeze_latent_space", "latent_space_sha256"]

# submodules of monai.networks.nets.AutoencoderKL that map an image to its latent mean and spread
LATENT_SPACE_MODULES = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")


def _in_latent_space(name: str) -> bool:
    return name.split(".", 1)[0] in LATENT_SPACE_MODULES


def latent_space_sha256(checkpoint: Mapping[str, Any], key: str | None = "autoencoder") -> str:
    """SHA-256 of the weights that define the latents (see :func:`scripts.core.checkpoints.weights_sha256`).

    Equal for two autoencoders that encode every image to the same latents, whatever their decoders.
    """
    state = checkpoint.get(key, checkpoint) if key is not None else checkpoint
    encoder_side = {name: value for name, value in state.items() if _in_latent_space(name)}
    if not encoder_side:
        raise ValueError(f"no {'/'.join(LATENT_SPACE_MODULES)} weights among the autoencoder's {len(state)} entries")
    return weights_sha256(encoder_side)


def freeze_latent_space(autoencoder: torch.nn.Module, freeze: bool, init_path: str | None) -> torch.nn.Module:
    """With ``freeze``, stop gradients to the weights that define the latents; returns the network.

    ``init_path`` is where the kept encoder comes from (``init_autoencoder_path``): freezing a
    randomly initialised encoder would train a decoder for latents nobody else uses, so it is refused.

    Call it before any ``DistributedDataParallel`` wrapping (DDP records which parameters need
    gradients when it is built) and give the optimizer only the parameters that still require them.
    The frozen part keeps its train/eval mode: AutoencoderKL uses GroupNorm and no dropout, so the
    mode does not change what the encoder computes.
    """
    if freeze and init_path is None:
        raise BundleInputError(
            "config 'freeze_encoder': true needs --init_autoencoder_path, the autoencoder whose encoder "
            "(and latents) to keep; without it the frozen encoder would stay random"
        )
    if freeze:
        for name, module in unwrap(autoencoder).named_children():
            if name in LATENT_SPACE_MODULES:
                module.requires_grad_(False)
    return autoencoder


def check_latent_space(
    checkpoint: Mapping[str, Any], autoencoder: Mapping[str, Any] | None, path: str, what: str
) -> None:
    """Refuse ``checkpoint`` (trained on latents) in one line when ``autoencoder`` encodes differently.

    ``autoencoder`` is the loaded stage-1 checkpoint (``None`` skips the check: the starting point of
    fine-tuning on new latents). Checkpoints record ``latent_space_sha256``; older ones recorded
    ``autoencoder_sha256``, the whole autoencoder's identity, which is still honoured.
    """
    if autoencoder is None:
        return
    if "latent_space_sha256" in checkpoint:
        recorded, current = checkpoint["latent_space_sha256"], latent_space_sha256(autoencoder)
    elif "autoencoder_sha256" in checkpoint:
        recorded, current = checkpoint["autoencoder_sha256"], weights_sha256(autoencoder, "autoencoder")
    else:
        return
    if recorded != current:
        raise BundleInputError(
            f"{path}: {what} was trained on the latents of another autoencoder's encoder "
            f"(sha256 {recorded[:12]}..., --autoencoder_path gives {current[:12]}...); "
            "pass the autoencoder it was trained with, or retrain on these latents"
        )
