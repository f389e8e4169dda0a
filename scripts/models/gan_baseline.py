# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Baseline: a pix2pix-style 3D GAN that turns a label map into an image in one forward pass.

The comparison the paper draws ("70.9% better FID than GANs") needs a GAN trained on the same
data. This one follows pix2pix (Isola et al., 2017) with MONAI parts: a ``UNet`` generator on the
one-hot label map with a sigmoid head (images lie in [0, 1] after preprocessing), a
``PatchDiscriminator`` that sees the label map beside the image (conditional), and the generator
loss ``l1_weight * L1 + adv_weight * adversarial`` (least-squares ``PatchAdversarialLoss``).
It has no noise input and no test-time dropout, so it is deterministic: one image per mask.

``configs/train_gan_baseline.yaml`` trains it (resumable, ``scripts.core.checkpoints.StageCheckpointer``);
``configs/inference_gan_baseline.yaml`` writes pairs in the layout of ``configs/inference.yaml``
through the same ``scripts.generation.inference.MaskToImage``, for which the generator stands in for the
latent diffusion sampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import AdversarialTrainer, PrepareBatch
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialKeys
from monai.utils import CommonKeys as Keys

from scripts.core.checkpoints import load_network_weights, unwrap
from scripts.core.errors import BundleInputError
from scripts.data.labels import LabelContract

__all__ = ["MaskToImageGenerator", "LabelToImagePrepareBatch", "Pix2PixTrainer", "load_generator"]


class MaskToImageGenerator(torch.nn.Module):
    """Label map ``(B, 1, *spatial)`` in bundle ids -> image ``(B, 1, *spatial)`` in [0, 1].

    ``forward(label, seeds=None)`` has the signature of ``scripts.generation.sampler.LatentDiffusionSampler``
    so that ``scripts.generation.inference.MaskToImage`` can use it; ``seeds`` are ignored (no noise input).
    """

    def __init__(self, network: torch.nn.Module, contract: LabelContract) -> None:
        super().__init__()
        self.network = network
        self.contract = contract

    def condition(self, label: torch.Tensor) -> torch.Tensor:
        """The network input: one channel per class."""
        return self.contract.one_hot(label).float()

    def forward(self, label: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        return torch.sigmoid(self.network(self.condition(label)))


class LabelToImagePrepareBatch(PrepareBatch):
    """Batches as (input, target) = (label map, image): the generator's direction."""

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        self.image_key = image_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking)
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking)
        return label, image


class Pix2PixTrainer(AdversarialTrainer):
    """MONAI's ``AdversarialTrainer`` with the pix2pix iteration.

    ``AdversarialTrainer`` feeds its generator the images it tries to reproduce and shows its
    discriminator the images alone; pix2pix maps label -> image and conditions the discriminator
    on the label. Generator loss = ``l1_weight`` * L1 + ``adv_weight`` * adversarial; the
    discriminator loss is the mean of its real and fake terms. Everything else (events, handlers,
    AMP scalers, the checkpointable counters) is inherited. ``prepare_batch`` must return
    (label, image), e.g. :class:`LabelToImagePrepareBatch`.

    Per-iteration output keys: ``loss`` (generator total), ``l1_loss``, ``g_adv_loss``, ``d_loss``.
    """

    def __init__(self, *args: Any, l1_weight: float = 100.0, adv_weight: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("g_loss_function", PatchAdversarialLoss(criterion="least_squares"))
        kwargs.setdefault("d_loss_function", PatchAdversarialLoss(criterion="least_squares"))
        kwargs.setdefault("recon_loss_function", torch.nn.L1Loss())
        kwargs.setdefault("prepare_batch", LabelToImagePrepareBatch())
        super().__init__(*args, **kwargs)
        self.l1_weight = float(l1_weight)
        self.adv_weight = float(adv_weight)
        # as in scripts.models.trainers.AutoencoderTrainer: keep modules out of the engine's state dict,
        # so checkpoints stay loadable with weights_only=True
        self._state_dict_user_keys = []

    def _autocast(self) -> Any:
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else torch.autocast("cpu", enabled=False)

    @staticmethod
    def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if scaler is None:
            loss.backward()
            optimizer.step()
            return
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def _iteration(self, engine: Pix2PixTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        labels, images = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[
            :2
        ]
        state = engine.state
        generator = unwrap(state.g_network)
        condition = generator.condition(labels)

        state.g_network.train()
        state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            fakes = state.g_network(labels)
            l1 = state.recon_loss_function(fakes.float(), images.float())
            fake_logits = state.d_network(torch.cat([condition, fakes.float()], dim=1).contiguous())[-1]
            g_adv = state.g_loss_function(fake_logits, target_is_real=True, for_discriminator=False)
            g_loss = engine.l1_weight * l1 + engine.adv_weight * g_adv
        engine._step(g_loss, state.g_optimizer, state.g_scaler)

        state.d_network.train()
        state.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            # fakes and reals in one forward: DDP allows one forward per backward
            pairs = torch.cat(
                [torch.cat([condition, fakes.detach().float()], 1), torch.cat([condition, images.float()], 1)]
            )
            fake_logits, real_logits = state.d_network(pairs.contiguous())[-1].chunk(2)
            d_loss = 0.5 * (
                state.d_loss_function(fake_logits, target_is_real=False, for_discriminator=True)
                + state.d_loss_function(real_logits, target_is_real=True, for_discriminator=True)
            )
        engine._step(d_loss, state.d_optimizer, state.d_scaler)

        return {
            Keys.IMAGE: labels,
            Keys.LABEL: images,
            Keys.PRED: fakes.detach(),
            AdversarialKeys.REALS: images,
            AdversarialKeys.FAKES: fakes.detach(),
            Keys.LOSS: g_loss.item(),
            "l1_loss": l1.item(),
            "g_adv_loss": g_adv.item(),
            "d_loss": d_loss.item(),
        }


def load_generator(generator: MaskToImageGenerator, path: str, labels: Mapping[str, int]) -> dict[str, Any]:
    """Load a ``configs/train_gan_baseline.yaml`` checkpoint into ``generator``, frozen; checks its labels."""
    checkpoint = load_network_weights(
        generator,
        path,
        "generator",
        "GAN baseline weights",
        hint="train them with `python -m monai.bundle run training --config_file "
        "\"['configs/common.yaml', 'configs/train_base.yaml', 'configs/train_gan_baseline.yaml']\"` "
        "and pass --gan_path",
    )
    if "labels" in checkpoint and dict(checkpoint["labels"]) != dict(labels):
        raise BundleInputError(
            f"{path}: GAN baseline trained with labels {checkpoint['labels']}, this run has {dict(labels)}"
        )
    generator.eval().requires_grad_(False)
    return checkpoint
