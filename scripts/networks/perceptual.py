# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Perceptual loss for the autoencoder, from a LOCAL RadImageNet or MedicalNet weights file.

Why this module exists: ``monai.losses.PerceptualLoss`` obtains its RadImageNet / MedicalNet
networks only through ``torch.hub`` (even with ``pretrained=False``) and cannot be pointed at a
local file, and its LPIPS / torchvision back-ends need packages that do not import beside this
torch. The bundle must train offline, so the networks come from :mod:`scripts.networks.feature_networks`
and this module re-implements MONAI's loss around them:

* 2D network on 3D volumes - MONAI's 2.5D scheme (``is_fake_3d=True``): for each of the three
  axes the volume is cut into slices, the slices of all batch items are pooled, a random
  ``fake_3d_ratio`` share of them is kept (the same slices for input and target), and the 2D loss
  of each axis is averaged over slices; the three axis losses are **summed**, as in MONAI.
* 3D MedicalNet network - whole-volume features (MONAI's ``MedicalNetPerceptualSimilarity``).
* Per feature map: unit-normalise along channels (LPIPS' ``normalize_tensor``, with the eps
  inside the square root so identical inputs still have finite gradients), squared difference,
  sum over channels, mean over space.

Differences from MONAI, on purpose:

* MONAI compares only the last stage (``layer4``); LPIPS compares several. Here ``stages``
  (default ``layer1``..``layer4``) are compared and their losses **averaged**, so the scale stays
  that of a single-stage loss; ``stages=(4,)`` reproduces MONAI's single-layer value.
* Multi-channel images are treated channel by channel (channels folded into the batch) instead
  of as RGB; the bundle's images have one channel, where both agree.
* At least one slice per axis is kept even when ``fake_3d_ratio`` times the slice count is < 1
  (MONAI would average an empty tensor, giving NaN).
* MedicalNet z-scores each sample separately (MONAI: one mean/std for the whole batch); identical
  for batch size 1.

Inputs are expected in [0, 1] for RadImageNet (as MONAI documents); MedicalNet is insensitive to
affine intensity changes because of its z-scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from scripts.core.errors import BundleInputError
from scripts.networks.feature_networks import ALL_STAGES, FeatureExtractor, load_feature_extractor

__all__ = ["PerceptualLoss3D", "build_perceptual_loss", "DISABLED_NOTICE"]

logger = logging.getLogger(__name__)

DISABLED_NOTICE = "perceptual loss disabled: no perceptual_weights configured"


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit L2 norm along dim 1 (LPIPS / MONAI ``normalize_tensor``)."""
    return x / torch.sqrt(torch.sum(x**2, dim=1, keepdim=True) + eps)


def _fold_channels(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, ...)`` -> ``(B*C, 1, ...)`` so every channel is a grey image of its own."""
    return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])


def _slices(x: torch.Tensor, axis: int) -> torch.Tensor:
    """All 2D slices of a ``(B, C, H, W, D)`` volume along spatial ``axis`` (2, 3 or 4) as a batch."""
    others = [a for a in (2, 3, 4) if a != axis]
    moved = x.permute(0, axis, 1, *others)  # (B, n_slices, C, h, w), like MONAI's batchify_axis
    return moved.reshape(-1, x.shape[1], x.shape[others[0]], x.shape[others[1]])


class PerceptualLoss3D(nn.Module):
    """Perceptual distance between a reconstruction and its target, from a local weights file.

    Args:
        network_type: ``"radimagenet_resnet50"`` (2D, used 2.5D on volumes) or
            ``"medicalnet_resnet10"`` / ``"medicalnet_resnet50"`` (3D).
        weights_path: local state dict for that network (see :mod:`scripts.networks.feature_networks`).
        fake_3d_ratio: share of slices per axis used by the 2.5D scheme, in (0, 1].
        spatial_dims: 3 for volumes ``(B, C, H, W, D)``, 2 for images ``(B, C, H, W)``
            (2D network only).
        weight: factor applied to the returned loss, so a trainer can simply add it.
        stages: ResNet stages compared (1 = ``layer1`` ... 4 = ``layer4``); losses averaged.

    ``forward(input, target)`` returns a scalar; gradients flow into ``input`` (and into
    ``target`` only if it requires grad; otherwise its features are computed without a graph).
    """

    def __init__(
        self,
        network_type: str,
        weights_path: str | Path,
        fake_3d_ratio: float = 0.5,
        spatial_dims: int = 3,
        weight: float = 1.0,
        stages: Sequence[int] = ALL_STAGES,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 0.0 < float(fake_3d_ratio) <= 1.0:
            raise ValueError(f"fake_3d_ratio must be in (0, 1], got {fake_3d_ratio}")
        self.extractor: FeatureExtractor = load_feature_extractor(network_type, weights_path)
        if self.extractor.spatial_dims == 3 and spatial_dims == 2:
            raise ValueError(f"{self.extractor.network_type} is a 3D network; it needs spatial_dims=3")
        self.spatial_dims = spatial_dims
        self.fake_3d_ratio = float(fake_3d_ratio)
        self.weight = float(weight)
        self.stages = tuple(stages)
        self.is_fake_3d = self.extractor.spatial_dims == 2 and spatial_dims == 3

    def _distance(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over stages of the LPIPS-style distance, one value per batch item: shape ``(N,)``."""
        input, target = _fold_channels(input.float()), _fold_channels(target.float())
        feats_in = self.extractor(input, self.stages)
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            feats_tg = self.extractor(target, self.stages)
        per_stage = []
        for f_in, f_tg in zip(feats_in, feats_tg, strict=True):
            diff = (normalize_channels(f_in) - normalize_channels(f_tg)) ** 2
            per_stage.append(diff.sum(dim=1).flatten(1).mean(dim=1))
        return torch.stack(per_stage).mean(dim=0)

    def _axis_loss(self, input: torch.Tensor, target: torch.Tensor, axis: int) -> torch.Tensor:
        """2D loss on a random ``fake_3d_ratio`` share of the slices along ``axis`` (MONAI's 2.5D)."""
        in_slices, tg_slices = _slices(input, axis), _slices(target, axis)
        count = in_slices.shape[0]
        keep = max(1, int(count * self.fake_3d_ratio))
        index = torch.randperm(count)[:keep].to(input.device)
        return self._distance(in_slices.index_select(0, index), tg_slices.index_select(0, index)).mean()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)}")
        if input.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D tensor (B, C, spatial...) for spatial_dims={self.spatial_dims}, "
                f"got shape {tuple(input.shape)}"
            )
        if self.is_fake_3d:
            loss = sum(self._axis_loss(input, target, axis) for axis in (2, 3, 4))
        else:
            loss = self._distance(input, target).mean()
        return self.weight * loss

    def extra_repr(self) -> str:
        return (
            f"fake_3d={self.is_fake_3d}, fake_3d_ratio={self.fake_3d_ratio}, spatial_dims={self.spatial_dims}, "
            f"weight={self.weight}, stages={self.stages}"
        )


def build_perceptual_loss(
    weights_path: str | Path | None, network_type: str, weight: float, fake_3d_ratio: float = 0.5, spatial_dims: int = 3
) -> PerceptualLoss3D | None:
    """The configured perceptual loss, or ``None`` (with a logged notice) when none is configured.

    ``weights_path`` falsy (``None``/``""``) or ``weight == 0`` disables the loss. The returned
    module already multiplies by ``weight``.

    Raises:
        BundleInputError: the configured file is missing, unreadable or of the wrong architecture,
            the network type is unknown, or ``weight`` is negative.
    """
    if not weights_path:
        logger.warning(DISABLED_NOTICE)
        return None
    if weight < 0:
        raise BundleInputError(f"perceptual_weight must be >= 0, got {weight}")
    if weight == 0:
        logger.warning("perceptual loss disabled: perceptual_weight is 0")
        return None
    loss = PerceptualLoss3D(
        network_type, weights_path, fake_3d_ratio=fake_3d_ratio, spatial_dims=spatial_dims, weight=weight
    )
    logger.info(
        "perceptual loss: %s from %s, weight %g%s",
        loss.extractor.network_type,
        weights_path,
        weight,
        f", 2.5D with {fake_3d_ratio:g} of the slices per axis" if loss.is_fake_3d else "",
    )
    return loss
