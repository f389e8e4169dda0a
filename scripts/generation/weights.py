# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The frozen networks of sampling, loaded from their checkpoints and checked to belong together.

Generation combines up to four checkpoints: the stage-1 autoencoder, the stage-2 UNet, the ControlNet
trained beside that UNet, and the earlier UNet that guides it (autoguidance). Each records what it was
trained with; :class:`GenerationWeights` loads them strictly and cross-checks them in one place, so a
config (configs/inference.yaml, configs/generate_unconditional.yaml) only names the files:

* the UNet learned the loaded autoencoder's latents, and carries its noise schedule, prediction type,
  latent ``scale_factor`` and ``latent_shift`` (the sampler takes them from here);
* the ControlNet was trained beside exactly this UNet, with this schedule and label set;
* the guide shares the UNet's latents, schedule, prediction type, scale and shift.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from scripts.core.errors import BundleInputError
from scripts.generation.autoguidance import load_guide_unet
from scripts.models.controlnet import load_controlnet
from scripts.models.diffusion import check_noise_schedule, checkpoint_prediction_type, freeze, load_diffusion_unet

__all__ = ["SAMPLER_SCHEDULES", "DEFAULT_STEPS", "check_sampler", "num_steps", "GenerationWeights"]


#: Sampler name -> the noise schedule the model must have been trained with.
SAMPLER_SCHEDULES = {"ddpm": "ddpm", "ddim": "ddpm", "rflow": "rflow"}
#: Reverse steps per sampler when --num_inference_steps is not given.
# ddim 35: on 32 fresh masks the 0.12.0 weights gave FID 3D 0.088 at 35 steps against 0.111 at 50
# and 0.129 at 100, with the same contrast (model card, 0.13.0); and 30 % less sampling time
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 35, "rflow": 30}


def check_sampler(sampler: str | None, noise_schedule: str, weights_path: str) -> str:
    """The sampler to use: ``sampler``, or the model's own default; a mismatch is one clear error."""
    check_noise_schedule(noise_schedule)
    if sampler is None:
        return "rflow" if noise_schedule == "rflow" else "ddim"
    if sampler not in SAMPLER_SCHEDULES:
        raise BundleInputError(f"config 'sampler': unknown sampler {sampler!r}; use one of {sorted(SAMPLER_SCHEDULES)}")
    if SAMPLER_SCHEDULES[sampler] != noise_schedule:
        fits = sorted(name for name, schedule in SAMPLER_SCHEDULES.items() if schedule == noise_schedule)
        raise BundleInputError(
            f"{weights_path}: trained with noise_schedule {noise_schedule!r}, which sampler {sampler!r} cannot "
            f"sample; use --sampler {' or --sampler '.join(fits)}"
        )
    return sampler


def num_steps(num_inference_steps: int | None, sampler: str, num_train_timesteps: int) -> int:
    """Reverse steps: the given number, else the sampler's default.

    The ``ddpm`` sampler must take every training timestep: MONAI's ``DDPMScheduler.step`` always
    steps from t to t - 1 whatever ``set_timesteps`` chose, so with fewer steps the chain stops far
    from t = 0 and decodes to noise (measured: FID 3D 16.4 with 50 steps against 0.11 for ``ddim``).
    """
    steps = DEFAULT_STEPS[sampler] if num_inference_steps is None else int(num_inference_steps)
    if steps < 1:
        raise BundleInputError(f"config 'num_inference_steps' must be at least 1, got {steps}")
    if sampler == "ddpm" and steps != int(num_train_timesteps):
        raise BundleInputError(
            f"config 'num_inference_steps': the ddpm sampler takes all {int(num_train_timesteps)} timesteps, got "
            f"{steps}; for fewer steps use --sampler ddim"
        )
    return steps


class GenerationWeights:
    """Load and cross-check the frozen networks of sampling.

    Args:
        autoencoder: the loaded stage-1 checkpoint (``scripts.models.autoencoder.load_autoencoder_weights``).
        unet: the stage-2 ``DiffusionModelUNet``; ``unet_path`` its weights (``--diffusion_unet_path``).
        controlnet: the stage-3 ``ControlNet`` (``None``: unconditional sampling); ``controlnet_path`` its
            weights; ``labels`` the label set its conditioning must have been trained with.
        guide: the autoguidance UNet (``None``: no guidance); ``guide_path`` its weights.

    Every network is put in eval mode without gradients and loaded when this object is built.
    """

    def __init__(
        self,
        autoencoder: Mapping[str, Any],
        unet: torch.nn.Module,
        unet_path: str,
        controlnet: torch.nn.Module | None = None,
        controlnet_path: str | None = None,
        labels: Mapping[str, int] | None = None,
        guide: torch.nn.Module | None = None,
        guide_path: str | None = None,
    ) -> None:
        self.unet_path = unet_path
        #: the UNet's checkpoint: its own noise schedule is taken (``None``), its latents checked
        self.unet_checkpoint = load_diffusion_unet(freeze(unet), unet_path, None, autoencoder)
        self.controlnet_checkpoint = None
        if controlnet is not None:
            self.controlnet_checkpoint = load_controlnet(
                freeze(controlnet), str(controlnet_path), self.unet_checkpoint, unet_path, dict(labels or {})
            )
        self.guide_checkpoint = None
        if guide is not None:
            self.guide_checkpoint = load_guide_unet(freeze(guide), str(guide_path), self.unet_checkpoint, autoencoder)

    @property
    def noise_schedule(self) -> str:
        return str(self.unet_checkpoint["noise_schedule"])

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts under the DDPM schedule (DDPM/DDIM steps use the UNet's own target)."""
        return checkpoint_prediction_type(self.unet_checkpoint)

    @property
    def scale_factor(self) -> float:
        return float(self.unet_checkpoint["scale_factor"])

    @property
    def latent_shift(self) -> Any:
        """Per-channel latent centring (``None``: none, weights before 0.13.0)."""
        return self.unet_checkpoint.get("latent_shift")

    def sampler_name(self, sampler: str | None) -> str:
        """``sampler`` checked against the UNet's schedule, or the schedule's default sampler."""
        return check_sampler(sampler, self.noise_schedule, self.unet_path)

    @staticmethod
    def num_steps(num_inference_steps: int | None, sampler: str, num_train_timesteps: int) -> int:
        """Reverse steps of ``sampler``: the given number, else its default (:func:`num_steps`)."""
        return num_steps(num_inference_steps, sampler, num_train_timesteps)
