# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Noise schedules for latent diffusion training: the schedule choice, its training batches, and
the stage-2 weights that later stages build on.

Two schedules, chosen by ``noise_schedule`` in ``configs/common.yaml``:

* ``ddpm``: MONAI's ``DiffusionPrepareBatch`` (integer timesteps) with the target of the scheduler's
  ``prediction_type``: ``v_prediction`` (default; :class:`VPredictionPrepareBatch`) or ``epsilon``.
  With this schedule (alpha-bar at t=999 is 1.4e-4) an epsilon error is multiplied by up to 84 in
  the implied clean latent, so epsilon models fail at high noise, where the layout is decided; a
  velocity error passes into the clean latent unamplified;
* ``rflow``: rectified flow as in MAISI v2. MONAI's ``DiffusionPrepareBatch`` draws uniform integer
  timesteps and returns the noise as target; rectified flow needs timesteps from
  ``RFlowScheduler.sample_timesteps`` (logit-normal, shifted for volume size) and the velocity
  ``latents - noise`` as target, hence :class:`RFlowPrepareBatch`.

Both are trained with MONAI's ``DiffusionInferer``/``ControlNetDiffusionInferer``, whose forward
pass calls ``scheduler.add_noise``, so the only schedule-specific code is here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch, default_prepare_batch
from monai.handlers import from_engine
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import RFlowScheduler

from scripts.core.checkpoints import load_network_weights, unwrap
from scripts.core.errors import BundleInputError
from scripts.models.autoencoder import check_latent_space

__all__ = [
    "NOISE_SCHEDULES",
    "PREDICTION_TYPES",
    "check_noise_schedule",
    "by_schedule",
    "training_prepare_batch",
    "VPredictionPrepareBatch",
    "RFlowPrepareBatch",
    "predicted_x0",
    "X0Inferer",
    "checkpoint_prediction_type",
    "FixedNoisePrepareBatch",
    "load_diffusion_unet",
    "freeze",
]

NOISE_SCHEDULES = ("ddpm", "rflow")
#: What a DDPM-schedule UNet predicts (MONAI's ``DDPMPredictionType``); rectified flow always predicts a velocity.
PREDICTION_TYPES = ("v_prediction", "epsilon")


def check_noise_schedule(noise_schedule: str) -> bool:
    """Raise one line unless ``noise_schedule`` is a known schedule; ``True`` for a config's ``initialize``."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise BundleInputError(
            f"config 'noise_schedule': unknown schedule {noise_schedule!r}; use --noise_schedule "
            + " or --noise_schedule ".join(NOISE_SCHEDULES)
        )
    return True


def by_schedule(noise_schedule: str, choices: Mapping[str, Any]) -> Any:
    """The entry of ``choices`` for ``noise_schedule`` (e.g. its training or sampling scheduler)."""
    check_noise_schedule(noise_schedule)
    return choices[noise_schedule]


class RFlowPrepareBatch(DiffusionPrepareBatch):
    """``DiffusionPrepareBatch`` for rectified flow (MAISI v2).

    Timesteps come from ``scheduler.sample_timesteps(latents)``; ``scheduler.add_noise`` (called by
    the inferer) interpolates ``(1 - t/T) * latents + (t/T) * noise``, whose derivative towards the
    data is the target velocity ``latents - noise``.
    """

    def __init__(self, scheduler: RFlowScheduler, condition_name: str | None = None) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps, condition_name=condition_name)
        self.scheduler = scheduler

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sample_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images - noise


class VPredictionPrepareBatch(DiffusionPrepareBatch):
    """``DiffusionPrepareBatch`` whose target is the velocity ``sqrt(ab) * noise - sqrt(1 - ab) * latents``
    (``scheduler.get_velocity``), for a DDPM/DDIM scheduler built with ``prediction_type="v_prediction"``."""

    def __init__(self, scheduler: Any, condition_name: str | None = None) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps, condition_name=condition_name)
        self.scheduler = scheduler

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(images, noise, timesteps)


def training_prepare_batch(noise_schedule: str, scheduler: Any) -> DiffusionPrepareBatch:
    """The training batch preparation of a schedule: noise, timesteps and target per batch.

    For ``ddpm`` the target follows ``scheduler.prediction_type``, so the scheduler that adds the
    noise is the one place the parametrisation is declared.
    """
    check_noise_schedule(noise_schedule)
    if noise_schedule == "rflow":
        return RFlowPrepareBatch(scheduler)
    prediction_type = getattr(scheduler, "prediction_type", "epsilon")
    if prediction_type == "v_prediction":
        return VPredictionPrepareBatch(scheduler)
    if prediction_type == "epsilon":
        return DiffusionPrepareBatch(num_train_timesteps=scheduler.num_train_timesteps)
    raise BundleInputError(f"config 'prediction_type': {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")


def predicted_x0(
    scheduler: Any, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent a UNet output implies at ``timesteps``, for every schedule and prediction type.

    MONAI's schedulers compute this only inside ``step()`` for one scalar timestep; validation needs
    it for a batch of timesteps, to measure the error where sampling decides the layout (high t).
    """
    shape = (-1,) + (1,) * (noisy.ndim - 1)
    if isinstance(scheduler, RFlowScheduler):  # x_t = (1 - s) x0 + s n and v = x0 - n, s = t / T
        s = (timesteps.float() / scheduler.num_train_timesteps).reshape(shape).to(noisy)
        return noisy + s * prediction
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps.long()].reshape(shape).to(noisy)
    if scheduler.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    if scheduler.prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    raise ValueError(f"prediction_type {scheduler.prediction_type!r} has no clean-latent formula here")


class X0Inferer(DiffusionInferer):
    """A ``DiffusionInferer`` that returns the clean latent implied by the UNet's output.

    For validation: with the clean latents as target (:class:`FixedNoisePrepareBatch` with
    ``x0_target=True``) a plain MSE metric becomes the x0 error, comparable across prediction types
    of one schedule (a timestep is another noise level under another schedule), and the error at
    high noise levels (which ruins samples) weighs as it should.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        prediction = super().__call__(inputs, diffusion_model, noise, timesteps, **kwargs)
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return predicted_x0(self.scheduler, noisy, prediction, timesteps)


class FixedNoisePrepareBatch(PrepareBatch):
    """Validation batches with the same noise and timesteps at every validation.

    Each case is repeated at every one of ``timesteps`` (in that order) with noise drawn from a
    generator seeded by ``seed`` + the case's ``seed`` entry, on the CPU so it is the same on every
    device. The denoising error over these batches is then a deterministic function of the weights,
    comparable from one validation to the next, which random timesteps and noise would not give on
    a handful of validation cases.

    Args:
        training: the training batch preparation, which supplies the target (noise or velocity).
        timesteps: timesteps per case, each in ``[0, num_train_timesteps)``.
        seed: base seed of the noise.
        seed_key: batch key of the per-case seed (``scripts.data.latent_cache.LatentCache.items`` sets it).
        x0_target: the target is the clean latent (for :class:`X0Inferer`), not the training target.
    """

    def __init__(
        self,
        training: DiffusionPrepareBatch,
        timesteps: Sequence[int] = (125, 375, 625, 875),
        seed: int = 0,
        seed_key: str = "seed",
        x0_target: bool = False,
    ) -> None:
        steps = training.num_train_timesteps
        if not timesteps or any(not 0 <= int(t) < steps for t in timesteps):
            raise BundleInputError(f"config 'val_timesteps': need timesteps in [0, {steps}), got {list(timesteps)}")
        self.training = training
        self.timesteps = torch.tensor([int(t) for t in timesteps])
        self.seed = int(seed)
        self.seed_key = seed_key
        self.x0_target = bool(x0_target)

    def rows_from(self, min_timestep: int, keys: Sequence[str] = ("pred", "label")) -> Callable[[Any], list]:
        """A metric ``output_transform``: the ``keys`` of the rows at timesteps >= ``min_timestep``.

        Rows follow ``timesteps`` case by case, so this needs a validation batch size of 1.
        """
        keep = [i for i, t in enumerate(self.timesteps.tolist()) if t >= int(min_timestep)]
        if not keep:
            raise BundleInputError(f"config 'high_noise_timestep': {min_timestep} is above every validation timestep")

        def transform(output: Any) -> list:
            return [[values[i] for i in keep] for values in from_engine(list(keys))(output)]

        return transform

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        latents, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        repeats = len(self.timesteps)
        noise = torch.cat(
            [
                torch.randn((repeats, *latents.shape[1:]), generator=torch.Generator().manual_seed(self.seed + int(s)))
                for s in batchdata[self.seed_key]
            ]
        ).to(latents)
        latents = latents.repeat_interleave(repeats, dim=0)
        timesteps = self.timesteps.repeat(len(batchdata[self.seed_key])).to(latents.device)
        target = latents if self.x0_target else self.training.get_target(latents, noise, timesteps)
        return latents, target, (), {"noise": noise, "timesteps": timesteps}


def checkpoint_prediction_type(checkpoint: Mapping[str, Any]) -> str:
    """What a stage-2 checkpoint's UNet predicts under the DDPM schedule; checkpoints that predate
    the entry were trained on the noise (``epsilon``)."""
    prediction_type = checkpoint.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise BundleInputError(f"diffusion UNet checkpoint: unknown prediction_type {prediction_type!r}")
    return prediction_type


def load_diffusion_unet(
    unet: torch.nn.Module,
    path: str,
    noise_schedule: str | None,
    autoencoder: Mapping[str, Any] | None,
    prediction_type: str | None = None,
    setting: str = "diffusion_unet_path",
    what: str = "diffusion UNet",
) -> dict[str, Any]:
    """Load stage-2 UNet weights strictly and check they fit this run; returns the checkpoint.

    ``setting`` and ``what`` name the file's setting and role in error lines (the autoguidance UNet is
    a stage-2 UNet too).

    The checkpoint must carry ``scale_factor`` (the latent scaling the UNet was trained with) and the
    same ``noise_schedule`` (``None``: any known schedule, for sampling with the checkpoint's own)
    and, for the DDPM schedule, the same ``prediction_type`` (``None``: the checkpoint's own);
    the latents it was trained on must be those of the loaded stage-1 checkpoint ``autoencoder``
    (:func:`scripts.models.autoencoder.check_latent_space`): a UNet trained on another encoder's
    latents, or with the other schedule, cannot be guided or sampled correctly. ``autoencoder=None``
    skips that check: the starting point of fine-tuning on new latents (``init_diffusion_unet_path``).
    """
    checkpoint = load_network_weights(
        unet,
        path,
        "diffusion_unet",
        f"{what} weights",
        hint=f"train them with configs/train_diffusion.yaml and pass --{setting} "
        "outputs/diffusion_unet/diffusion_unet_best.pt",
    )
    missing = [k for k in ("scale_factor", "noise_schedule") if k not in checkpoint]
    if missing:
        raise BundleInputError(f"{path}: {what} checkpoint lacks {missing}; save it with configs/train_diffusion.yaml")
    if noise_schedule is None:
        check_noise_schedule(checkpoint["noise_schedule"])
    elif checkpoint["noise_schedule"] != noise_schedule:
        raise BundleInputError(
            f"{path}: {what} was trained with noise_schedule {checkpoint['noise_schedule']!r}, "
            f"this run uses {noise_schedule!r}; pass --noise_schedule {checkpoint['noise_schedule']}"
        )
    if prediction_type is not None and checkpoint["noise_schedule"] == "ddpm":
        trained_type = checkpoint_prediction_type(checkpoint)
        if trained_type != prediction_type:
            raise BundleInputError(
                f"{path}: {what} predicts {trained_type!r}, this run uses prediction_type "
                f"{prediction_type!r}; pass --prediction_type {trained_type}"
            )
    check_latent_space(checkpoint, autoencoder, path, what)
    return checkpoint


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: a network used, not trained (the stage-2 UNet in stage 3)."""
    return unwrap(network).eval().requires_grad_(False)
