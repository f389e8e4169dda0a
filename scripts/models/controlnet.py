# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage 3, label guidance: a MONAI ``ControlNet`` trained beside the frozen stage-2 UNet.

What MONAI provides is used as is: ``ControlNet``, ``ControlNetDiffusionInferer`` (its training
forward feeds ``cn_cond`` to the ControlNet unchanged, at image resolution) and the schedulers.
What it lacks is here:

* starting the ControlNet from the UNet's weights, with a check that only the ControlNet's own
  layers are left at their (zero) initialisation;
* a batch preparation that turns the image-resolution label map into the one-hot conditioning
  and a per-voxel loss weight on the latent grid;
* an inferer whose engine network is the ControlNet (``SupervisedTrainer`` passes its trained
  network second; ``ControlNetDiffusionInferer`` expects the UNet there).

``ControlNetLatentDiffusionInferer`` is deliberately not used: it resizes the mask to latent size
by nearest neighbour before the ControlNet sees it, which erases thin vessels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.engines import DiffusionPrepareBatch, PrepareBatch
from monai.inferers import ControlNetDiffusionInferer

from scripts.core.checkpoints import load_network_weights, unwrap, weights_match
from scripts.core.errors import BundleInputError
from scripts.data.labels import LabelContract

__all__ = [
    "CONTROLNET_ONLY_PREFIXES",
    "init_controlnet",
    "init_controlnet_from_unet",
    "check_conditioning_channels",
    "latent_weight_map",
    "load_controlnet",
    "WeightedTarget",
    "ControlNetPrepareBatch",
    "WeightedMSELoss",
    "ControlNetTrainingInferer",
]

#: State-dict prefixes of the layers a ControlNet has and a DiffusionModelUNet has not.
CONTROLNET_ONLY_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def init_controlnet_from_unet(
    controlnet: torch.nn.Module, unet_state: Mapping[str, torch.Tensor], unet_path: str
) -> bool:
    """Copy the UNet's encoder weights into the ControlNet (the ControlNet recipe).

    The UNet's decoder weights have no place in the ControlNet and are skipped; every ControlNet
    weight must come from the UNet except the ControlNet-only layers (conditioning embedding and
    zero convolutions), otherwise ``controlnet_def`` does not mirror ``diffusion_unet_def``.
    Returns ``True`` so it can sit in a config's ``initialize`` list.
    """
    try:
        result = unwrap(controlnet).load_state_dict(unet_state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        detail = " ".join(str(e).split())
        raise BundleInputError(
            f"{unet_path}: diffusion UNet weights do not fit the configured ControlNet; controlnet_def must mirror "
            f"diffusion_unet_def ({detail[:300]}{'...' if len(detail) > 300 else ''})"
        ) from e
    foreign = [k for k in result.missing_keys if not k.startswith(CONTROLNET_ONLY_PREFIXES)]
    if foreign:
        raise BundleInputError(
            f"{unet_path}: ControlNet weights {foreign[:3]}{'...' if len(foreign) > 3 else ''} have no counterpart "
            "in the diffusion UNet; controlnet_def must mirror diffusion_unet_def"
        )
    return True


def load_controlnet(
    controlnet: torch.nn.Module,
    path: str,
    unet_checkpoint: Mapping[str, Any],
    unet_path: str,
    labels: Mapping[str, int],
) -> dict[str, Any]:
    """Load stage-3 weights strictly and check they guide this UNet with these labels.

    A ControlNet steers the residuals of the exact UNet it was trained beside: it records that
    UNet's weights identity, noise schedule and the label set of its one-hot conditioning, and
    each must match, or the guidance would be silently wrong.
    """
    checkpoint = load_network_weights(
        controlnet,
        path,
        "controlnet",
        "ControlNet weights",
        hint="train them with configs/train_controlnet.yaml and pass --controlnet_path outputs/controlnet/controlnet_best.pt",
    )
    recorded = checkpoint.get("diffusion_unet_sha256")
    if recorded is not None and not weights_match(recorded, unet_checkpoint, "diffusion_unet"):
        raise BundleInputError(
            f"{path}: ControlNet was trained beside other diffusion UNet weights than {unet_path}; "
            "pass the UNet it was trained with (--diffusion_unet_path)"
        )
    if checkpoint.get("noise_schedule") not in (None, unet_checkpoint["noise_schedule"]):
        raise BundleInputError(
            f"{path}: ControlNet was trained with noise_schedule {checkpoint['noise_schedule']!r}, "
            f"the UNet {unet_path} with {unet_checkpoint['noise_schedule']!r}"
        )
    if checkpoint.get("labels") not in (None, dict(labels)):
        raise BundleInputError(
            f"{path}: ControlNet was trained with labels {checkpoint['labels']}, this run declares {dict(labels)}"
        )
    return checkpoint


def init_controlnet(
    controlnet: torch.nn.Module, unet_checkpoint: Mapping[str, Any], unet_path: str, init_path: str | None
) -> bool:
    """The ControlNet's starting weights: the UNet's (:func:`init_controlnet_from_unet`), or those of an earlier
    ControlNet at ``init_path`` (``init_controlnet_path``: fine-tuning). A resume overrides either."""
    if init_path is None:
        return init_controlnet_from_unet(controlnet, unet_checkpoint["diffusion_unet"], unet_path)
    load_network_weights(controlnet, init_path, "controlnet", "initial ControlNet weights")
    return True


def check_conditioning_channels(in_channels: int, contract: LabelContract) -> bool:
    """The ControlNet takes the one-hot label map: one input channel per label class."""
    if int(in_channels) != contract.num_classes:
        raise BundleInputError(
            f"configs/common.yaml 'controlnet_def#conditioning_embedding_in_channels' is {in_channels} but the "
            f"label contract has {contract.num_classes} classes {contract.labels} (one one-hot channel each); "
            "set it to '@num_classes'"
        )
    return True


def latent_weight_map(label: torch.Tensor, table: torch.Tensor, latent_size: tuple[int, ...]) -> torch.Tensor:
    """Per-latent-voxel loss weight: the largest class weight within the voxel's image footprint.

    A nearest resize of the label map would keep one image voxel in 4^3 and so drop most of a
    one-voxel-thick vessel, exactly the structure the weights are meant to protect. Max pooling of
    the image-resolution weights keeps every class that touches a latent voxel.
    """
    weights = table.to(label.device)[label.long()]  # (B, 1, *image_size)
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(latent_size)]
    return pool(weights, tuple(latent_size))


class WeightedTarget(NamedTuple):
    """A regression target with a per-voxel loss weight (broadcast over channels)."""

    target: torch.Tensor
    weight: torch.Tensor | None


class ControlNetPrepareBatch(PrepareBatch):
    """Training batch for the ControlNet: a diffusion batch plus conditioning and loss weights.

    Wraps the schedule's batch preparation (``scripts.models.diffusion.training_prepare_batch``) and adds

    * ``cn_cond``: the one-hot label map at IMAGE resolution (``num_classes`` channels), for the
      ControlNet's conditioning embedding, which downsamples it to the latent grid itself;
    * a :class:`WeightedTarget` whose weight comes from ``class_weights`` through
      :func:`latent_weight_map` (``None`` when every class weighs 1).

    The one-hot map is made here, on the device, rather than in the data loader: it is
    ``num_classes`` times larger than the uint8 label map it comes from.
    """

    def __init__(
        self,
        diffusion: DiffusionPrepareBatch,
        contract: LabelContract,
        class_weights: torch.Tensor | None = None,
        label_key: str = "label",
    ) -> None:
        self.diffusion = diffusion
        self.contract = contract
        uniform = class_weights is None or bool(torch.all(torch.as_tensor(class_weights) == 1))
        self.class_weights = None if uniform else torch.as_tensor(class_weights, dtype=torch.float32)
        self.label_key = label_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, WeightedTarget, tuple, dict]:
        latents, target, args, infer_kwargs = self.diffusion(batchdata, device, non_blocking, **kwargs)
        label = torch.as_tensor(batchdata[self.label_key]).to(latents.device, non_blocking=non_blocking)
        infer_kwargs["cn_cond"] = self.contract.one_hot(label).to(latents.dtype)
        weight = None if self.class_weights is None else latent_weight_map(label, self.class_weights, latents.shape[2:])
        return latents, WeightedTarget(target, weight), args, infer_kwargs


class WeightedMSELoss(torch.nn.Module):
    """Mean squared error, each voxel weighted when the target is a :class:`WeightedTarget`.

    As MAISI's region-weighted loss, the mean is over all voxels (not normalised by the weights), so
    all weights 1 is exactly ``torch.nn.MSELoss``.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor | WeightedTarget) -> torch.Tensor:
        weight = None
        if isinstance(target, WeightedTarget):
            target, weight = target
        error = (prediction.float() - target.float()) ** 2
        return error.mean() if weight is None else (error * weight).mean()


class ControlNetTrainingInferer(ControlNetDiffusionInferer):
    """``ControlNetDiffusionInferer`` for engines whose network is the ControlNet.

    MONAI engines call ``inferer(inputs, engine.network, **kwargs)`` with the network they train;
    ``ControlNetDiffusionInferer`` wants the UNet in that place and the ControlNet after it. This
    keeps the frozen UNet and puts the two in order; the forward pass is MONAI's.
    """

    def __init__(self, scheduler: Any, diffusion_model: torch.nn.Module) -> None:
        super().__init__(scheduler)
        self.diffusion_model = diffusion_model

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        cn_cond: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        return super().__call__(inputs, self.diffusion_model, network, noise, timesteps, cn_cond, **kwargs)
