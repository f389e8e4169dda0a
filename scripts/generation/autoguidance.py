# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Autoguidance: steer the diffusion UNet away from the errors of a weaker version of itself.

At every reverse step the prediction becomes ``guide + weight * (unet - guide)``, where the guide is
the same kind of UNet trained on the same latents, with the same schedule and target, but less well
(Karras et al., "Guiding a diffusion model with a bad version of itself", NeurIPS 2024). Where the
two disagree, the weaker model's typical errors lie on the guide's side, and extrapolating past the
stronger model moves further from them. Unlike classifier-free guidance it needs no unconditional
training and does not trade variety for fidelity.

MONAI's inferers take one network and have no guidance of any kind; :class:`AutoGuidedUNet` is one
network to them, so their reverse loops and every MONAI scheduler are used unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from scripts.core.errors import BundleInputError
from scripts.models.diffusion import checkpoint_prediction_type, load_diffusion_unet

__all__ = ["AutoGuidedUNet", "guidance_enabled", "load_guide_unet"]


def guidance_enabled(weight: float) -> bool:
    """Whether ``weight`` changes the prediction (1: the UNet alone, so no guide is needed)."""
    return float(weight) != 1.0


class AutoGuidedUNet(torch.nn.Module):
    """``guide + weight * (unet - guide)``, called as the UNet is.

    Both networks get the same inputs, ControlNet residuals included: the guide was trained as
    the UNet's own earlier self, so the ControlNet's residuals fit it too (and guiding without
    them measured worse: docs/README.md, Evaluation, "0.14.0: autoguidance and new weights").

    Args:
        unet: the UNet whose samples are wanted.
        guide: the weaker UNet (same architecture, latents, schedule and prediction type).
        weight: extrapolation weight (1: ``unet`` alone; above 1: further from the guide).
    """

    def __init__(self, unet: torch.nn.Module, guide: torch.nn.Module, weight: float) -> None:
        super().__init__()
        self.unet = unet
        self.guide = guide
        self.weight = float(weight)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        prediction = self.unet(x, timesteps, **kwargs)
        return torch.lerp(self.guide(x, timesteps, **kwargs), prediction, self.weight)


def load_guide_unet(
    guide: torch.nn.Module, path: str, unet_checkpoint: Mapping[str, Any], autoencoder: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Load the autoguidance UNet strictly and check it can guide the UNet of ``unet_checkpoint``.

    It must have learned the latents of the loaded ``autoencoder`` with the UNet's noise schedule
    and prediction type (:func:`scripts.models.diffusion.load_diffusion_unet`), and with the same
    latent ``scale_factor`` and ``latent_shift``: otherwise the two predictions are in different
    units and extrapolating between them is meaningless. Each mismatch is one error naming ``path``.
    """
    checkpoint = load_diffusion_unet(
        guide,
        path,
        unet_checkpoint["noise_schedule"],
        autoencoder,
        checkpoint_prediction_type(unet_checkpoint),
        setting="autoguidance_unet_path",
        what="autoguidance UNet",
    )
    if not math.isclose(float(checkpoint["scale_factor"]), float(unet_checkpoint["scale_factor"]), rel_tol=1e-6):
        raise BundleInputError(
            f"{path}: autoguidance UNet was trained with scale_factor {checkpoint['scale_factor']}, the diffusion "
            f"UNet with {unet_checkpoint['scale_factor']}; a guide must be an earlier checkpoint of the same training"
        )
    if checkpoint.get("latent_shift") != unet_checkpoint.get("latent_shift"):
        raise BundleInputError(
            f"{path}: autoguidance UNet was trained with latent_shift {checkpoint.get('latent_shift')}, the "
            f"diffusion UNet with {unet_checkpoint.get('latent_shift')}; a guide must be an earlier checkpoint "
            "of the same training"
        )
    return checkpoint
