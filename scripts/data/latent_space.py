# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The latent normalisation shared by training and sampling.

Every diffusion network sees the autoencoder's latents as ``(latent - latent_shift) * scale_factor``: unit
variance, centred per channel when a shift is recorded. The latent cache applies it when it loads a case; the
sampler undoes it before decoding. Both take it from here, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["LatentScaling"]


class LatentScaling:
    """``(latent - latent_shift) * scale_factor`` and its inverse.

    Args:
        scale_factor: multiplies the (centred) latent; 1 / std of the training latents.
        latent_shift: one value per latent channel, subtracted first (``None``: uncentred).
    """

    def __init__(self, scale_factor: float = 1.0, latent_shift: Sequence[float] | None = None) -> None:
        self.scale_factor = float(scale_factor)
        #: shape ``(C, 1, 1, 1)``: broadcasts over a latent ``(C, X, Y, Z)`` and a batch ``(B, C, X, Y, Z)``
        self.latent_shift = None
        if latent_shift is not None:
            self.latent_shift = torch.as_tensor([float(v) for v in latent_shift], dtype=torch.float32).view(-1, 1, 1, 1)

    def normalise(self, latent: torch.Tensor) -> torch.Tensor:
        """Autoencoder latent -> what the diffusion networks see."""
        if self.latent_shift is not None:
            latent = latent - self.latent_shift.to(latent.dtype)
        return latent * self.scale_factor

    def denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        """What the diffusion networks produce -> autoencoder latent, ready to decode."""
        latent = latent / self.scale_factor
        if self.latent_shift is not None:
            latent = latent + self.latent_shift.to(latent)
        return latent
