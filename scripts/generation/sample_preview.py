# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Validation handler of the unconditional stage: draw a few samples, decode, log them.

MONAI's ``TensorBoardImageHandler`` plots what the engine computed on its batches; unconditional
samples are not computed from any batch, so this handler draws them itself after each validation
epoch, with fixed seeds so successive previews differ only by the weights. It plots the first
sample to TensorBoard with MONAI's ``plot_2d_or_3d_image`` and puts the intensity mean and standard
deviation of all samples into the evaluator's metrics, where ``StatsHandler`` and
``TensorBoardStatsHandler`` (listed after this handler) report them. Preprocessed real images lie
in [0, 1] with a bright liver on dark background: samples stuck near one value (std ~0) or at
the clip limits are visible at a glance.

Clamped images can look normal while the sampler fails: latents several times wider than the real
ones decode to high-contrast blobs inside [0, 1]. With the real latents' per-channel std
(``reference_latent_std``), the handler also reports ``<prefix>_latent_std_error``, the largest
relative deviation of a channel's sampled std from the real one (0: same spread).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import TensorBoardHandler
from monai.visualize import plot_2d_or_3d_image

from scripts.generation.sampler import LatentDiffusionSampler

__all__ = ["SamplePreviewHandler"]


class SamplePreviewHandler(TensorBoardHandler):
    """After every validation epoch: ``num_samples`` samples with seeds ``seed .. seed + num_samples - 1``.

    Args:
        sampler: unconditional sampler (``scripts.generation.sampler.LatentDiffusionSampler``).
        num_samples: samples per validation.
        seed: seed of the first sample.
        summary_writer: an existing ``SummaryWriter``; otherwise one is made for ``log_dir``.
        log_dir: TensorBoard folder.
        prefix: name prefix of the reported metrics and of the image tag.
        reference_latent_std: per-channel std of the real (scaled) latents.
    """

    def __init__(
        self,
        sampler: LatentDiffusionSampler,
        num_samples: int = 1,
        seed: int = 0,
        summary_writer: Any | None = None,
        log_dir: str = "./runs",
        prefix: str = "val_sample",
        reference_latent_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.sampler = sampler
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.prefix = prefix
        self.reference_latent_std = None if reference_latent_std is None else torch.tensor(reference_latent_std)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.num_samples < 1:
            return
        with torch.no_grad():
            latents = self.sampler.sample_latents(range(self.seed, self.seed + self.num_samples))
            images = self.sampler.decode(latents)
        if self.reference_latent_std is not None:
            sampled_std = latents.float().transpose(0, 1).flatten(1).std(dim=1).cpu()
            error = (sampled_std / self.reference_latent_std - 1).abs().max()
            engine.state.metrics[f"{self.prefix}_latent_std_error"] = float(error)
        engine.state.metrics[f"{self.prefix}_mean"] = float(images.mean())
        engine.state.metrics[f"{self.prefix}_std"] = float(images.std())
        plot_2d_or_3d_image(images.cpu(), step=engine.state.epoch, writer=self._writer, tag=self.prefix)
        self._writer.flush()
