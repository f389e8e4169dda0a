# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Noise schedules for latent diffusion training: the schedule choice, its training batches, and
the stage-2 weights that later stages build on.

Two schedules, chosen by ``noise_schedule`` in ``configs/common.yaml``:

* ``ddpm``: MONAI's ``DiffusionPrepareBatch`` as is (integer timesteps, epsilon target);
* ``rflow``: rectified flow as in MAISI v2. MONAI's ``DiffusionPrepareBatch`` draws uniform integer
  timesteps and returns the noise as target; rectified flow needs timesteps from
  ``RFlowScheduler.sample_timesteps`` (logit-normal, shifted for volume size) and the velocity
  ``latents - noise`` as target, hence :class:`RFlowPrepareBatch`.

Both are trained with MONAI's ``DiffusionInferer``/``ControlNetDiffusionInferer``, whose forward
pass calls ``scheduler.add_noise``, so the only schedule-specific code is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch, default_prepare_batch
from monai.networks.schedulers import RFlowScheduler

from scripts.checkpoints import load_network_weights
from scripts.errors import BundleInputError

__all__ = [
    "NOISE_SCHEDULES",
    "check_noise_schedule",
    "by_schedule",
    "training_prepare_batch",
    "RFlowPrepareBatch",
    "FixedNoisePrepareBatch",
    "load_diffusion_unet",
    "unwrap",
    "freeze",
]

NOISE_SCHEDULES = ("ddpm", "rflow")


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


def training_prepare_batch(noise_schedule: str, scheduler: Any) -> DiffusionPrepareBatch:
    """The training batch preparation of a schedule: noise, timesteps and target per batch."""
    check_noise_schedule(noise_schedule)
    if noise_schedule == "rflow":
        return RFlowPrepareBatch(scheduler)
    return DiffusionPrepareBatch(num_train_timesteps=scheduler.num_train_timesteps)


class FixedNoisePrepareBatch(PrepareBatch):
    """Validation batches with the same noise and timesteps at every validation.

    Each case is repeated at ``num_timesteps`` evenly spread timesteps (bin centres of
    ``[0, num_train_timesteps)``) with noise drawn from a generator seeded by ``seed`` + the case's
    ``seed`` entry, on the CPU so it is the same on every device. The denoising loss over these
    batches is then a deterministic function of the weights, comparable from one validation to
    the next, which random timesteps and noise would not give on a handful of validation cases.

    Args:
        training: the training batch preparation, which supplies the target (noise or velocity).
        num_timesteps: timesteps per case.
        seed: base seed of the noise.
        seed_key: batch key of the per-case seed (``scripts.latent_cache.LatentCache.items`` sets it).
    """

    def __init__(self, training: DiffusionPrepareBatch, num_timesteps: int = 4, seed: int = 0, seed_key: str = "seed") -> None:
        if num_timesteps < 1:
            raise BundleInputError(f"config 'num_val_timesteps' must be at least 1, got {num_timesteps}")
        self.training = training
        steps = training.num_train_timesteps
        self.timesteps = torch.tensor([int((k + 0.5) * steps / num_timesteps) for k in range(num_timesteps)])
        self.seed = int(seed)
        self.seed_key = seed_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        latents, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        repeats = len(self.timesteps)
        noise = torch.cat([
            torch.randn((repeats, *latents.shape[1:]), generator=torch.Generator().manual_seed(self.seed + int(s)))
            for s in batchdata[self.seed_key]
        ]).to(latents)
        latents = latents.repeat_interleave(repeats, dim=0)
        timesteps = self.timesteps.repeat(len(batchdata[self.seed_key])).to(latents.device)
        target = self.training.get_target(latents, noise, timesteps)
        return latents, target, (), {"noise": noise, "timesteps": timesteps}


def load_diffusion_unet(
    unet: torch.nn.Module, path: str, noise_schedule: str | None, autoencoder_sha256: str
) -> dict[str, Any]:
    """Load stage-2 UNet weights strictly and check they fit this run; returns the checkpoint.

    The checkpoint must carry ``scale_factor`` (the latent scaling the UNet was trained with) and the
    same ``noise_schedule`` (``None``: any known schedule, for sampling with the checkpoint's own);
    when it records the identity of the autoencoder whose latents it was
    trained on (``autoencoder_sha256``, see ``scripts.checkpoints.weights_sha256``), that must be
    the configured one: a UNet trained on another autoencoder's latents, or with the other
    schedule, cannot be guided or sampled correctly.
    """
    checkpoint = load_network_weights(
        unet, path, "diffusion_unet", "diffusion UNet weights",
        hint="train them with configs/train_diffusion.yaml and pass --diffusion_unet_path "
             "outputs/diffusion_unet/diffusion_unet_best.pt",
    )
    missing = [k for k in ("scale_factor", "noise_schedule") if k not in checkpoint]
    if missing:
        raise BundleInputError(f"{path}: diffusion UNet checkpoint lacks {missing}; save it with configs/train_diffusion.yaml")
    if noise_schedule is None:
        check_noise_schedule(checkpoint["noise_schedule"])
    elif checkpoint["noise_schedule"] != noise_schedule:
        raise BundleInputError(
            f"{path}: diffusion UNet was trained with noise_schedule {checkpoint['noise_schedule']!r}, "
            f"this run uses {noise_schedule!r}; pass --noise_schedule {checkpoint['noise_schedule']}"
        )
    trained_on = checkpoint.get("autoencoder_sha256")
    if trained_on is not None and trained_on != autoencoder_sha256:
        raise BundleInputError(
            f"{path}: diffusion UNet was trained on the latents of other autoencoder weights "
            f"(weights sha256 {trained_on[:12]}..., --autoencoder_path holds {autoencoder_sha256[:12]}...); "
            "pass the autoencoder it was trained with, or retrain the UNet"
        )
    return checkpoint


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a ``DistributedDataParallel`` wrapper (or the network itself)."""
    return network.module if hasattr(network, "module") else network


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: a network used, not trained (the stage-2 UNet in stage 3)."""
    return unwrap(network).eval().requires_grad_(False)

