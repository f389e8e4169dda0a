# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Training engines the MONAI core does not provide.

``AutoencoderTrainer`` is MONAI's ``AdversarialTrainer`` with the VAE-GAN iteration of the MONAI
latent-diffusion recipes: ``AdversarialTrainer`` expects a generator that returns one tensor and
has no KL term, no perceptual term and no adversarial warm-up. Everything else (state, events,
handlers, AMP scaler, checkpointable state dict) is inherited.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import AdversarialTrainer
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialKeys
from monai.utils import CommonKeys as Keys

from scripts.data.labels import LabelContract
from scripts.networks.label_guided import is_label_guided

__all__ = ["kl_divergence", "AutoencoderTrainer"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch.

    MONAI has no VAE KL loss class; this is the closed form used by its generative tutorials.
    """
    spatial = list(range(1, z_mu.dim()))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0, dim=spatial)
    return kl.mean()


class AutoencoderTrainer(AdversarialTrainer):
    """VAE-GAN training of ``AutoencoderKL`` against a ``PatchDiscriminator``.

    Generator loss = reconstruction (L1) + ``kl_weight`` * KL + ``perceptual_loss``
    (already weighted; ``None`` to train without it) + ``adv_weight`` * adversarial. The
    discriminator and the adversarial term start only after ``adversarial_warmup_epochs`` epochs,
    so the discriminator does not overpower a generator that cannot reconstruct yet, and never with
    ``adv_weight`` 0.

    ``recon_class_weights`` (a weight per label id, ``scripts.data.labels.class_weight_table``) makes the
    L1 term a weighted mean over voxels, each weighted by its class in the batch's ``label``. The
    dark vessels and HCC fill about 1% of a volume, so with a plain mean the autoencoder learns to
    blur them into the liver; weighting them keeps the contrast a label-guided generator needs.

    A label-guided autoencoder (``SPADEAutoencoderKL``) decodes with the batch's ``label``, one-hot
    encoded by ``contract`` (the label contract).

    ``feature_matching_weight`` adds, with the adversarial term, the L1 distance between the discriminator's
    intermediate features of the reconstruction and of the real image (pix2pixHD's feature matching): it asks for
    the real image's texture statistics at every scale the discriminator sees, not only for fooling its last layer.

    Per-iteration output keys: ``loss`` (generator total), ``recon_loss``, ``kl_loss``,
    ``perceptual_loss``, ``g_adv_loss``, ``fm_loss``, ``d_loss`` (floats for logging), plus image/pred tensors.
    """

    def __init__(
        self,
        *args: Any,
        kl_weight: float = 1e-6,
        perceptual_loss: torch.nn.Module | None = None,
        adv_weight: float = 0.1,
        adversarial_warmup_epochs: int = 0,
        recon_class_weights: torch.Tensor | None = None,
        feature_matching_weight: float = 0.0,
        label_key: str = "label",
        contract: LabelContract | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("g_loss_function", PatchAdversarialLoss(criterion="least_squares"))
        kwargs.setdefault("d_loss_function", PatchAdversarialLoss(criterion="least_squares"))
        kwargs.setdefault("recon_loss_function", torch.nn.L1Loss())
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight
        self.perceptual_loss = None if perceptual_loss is None else perceptual_loss.to(self.state.device)
        self.adv_weight = adv_weight
        self.adversarial_warmup_epochs = adversarial_warmup_epochs
        self.feature_matching_weight = float(feature_matching_weight)
        uniform = recon_class_weights is None or bool(torch.all(torch.as_tensor(recon_class_weights) == 1))
        self.recon_class_weights = None if uniform else torch.as_tensor(recon_class_weights, dtype=torch.float32)
        self.label_key = label_key
        self.contract = contract
        if is_label_guided(self.state.g_network) and contract is None:
            raise ValueError("a label-guided autoencoder needs the label contract for its one-hot label map")
        # AdversarialTrainer puts the network and optimizer objects into the engine's state dict,
        # which would pickle whole modules into checkpoints and break weights_only loading. The
        # checkpointer saves their state dicts itself; the engine keeps only its counters.
        self._state_dict_user_keys = []

    def _autocast(self) -> Any:
        # the engine only enables amp on CUDA (see configs); bf16/fp16 autocast is very slow on CPU
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else torch.autocast("cpu", enabled=False)

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def _reconstruction_loss(
        self, reconstruction: torch.Tensor, images: torch.Tensor, batchdata: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if self.recon_class_weights is None:
            return self.state.recon_loss_function(reconstruction, images)
        if self.label_key not in batchdata:
            raise ValueError(f"recon_class_weights need the label map under {self.label_key!r} in every batch")
        table = self.recon_class_weights.to(images.device)
        weights = table[torch.as_tensor(batchdata[self.label_key]).to(images.device).long()]
        # MONAI's L1 losses have no per-voxel weight, hence the weighted mean written out here
        return (weights * (reconstruction - images).abs()).sum() / (weights.sum() * images.shape[1])

    def _iteration(self, engine: AutoencoderTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[0]
        state = engine.state
        # adv_weight 0 trains without the GAN: skip the discriminator's forward and backward passes
        adversarial = state.epoch > engine.adversarial_warmup_epochs and engine.adv_weight > 0

        state.g_network.train()
        state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            if is_label_guided(state.g_network):
                seg = engine.contract.one_hot(torch.as_tensor(batchdata[engine.label_key]).to(images.device)).float()
                reconstruction, z_mu, z_sigma = state.g_network(images, seg)
            else:
                reconstruction, z_mu, z_sigma = state.g_network(images)
            recon_loss = engine._reconstruction_loss(reconstruction.float(), images.float(), batchdata)
            kl_loss = kl_divergence(z_mu.float(), z_sigma.float())
            g_loss = recon_loss + engine.kl_weight * kl_loss
            perceptual = torch.zeros((), device=images.device)
            if engine.perceptual_loss is not None:
                perceptual = engine.perceptual_loss(reconstruction.float(), images.float())
                g_loss = g_loss + perceptual
            g_adv = torch.zeros((), device=images.device)
            feature_matching = torch.zeros((), device=images.device)
            if adversarial:
                fake_outputs = state.d_network(reconstruction.float().contiguous())
                g_adv = state.g_loss_function(fake_outputs[-1], target_is_real=True, for_discriminator=False)
                g_loss = g_loss + engine.adv_weight * g_adv
                if engine.feature_matching_weight > 0:
                    with torch.no_grad():
                        real_outputs = state.d_network(images.float().contiguous())
                    # MONAI's PatchDiscriminator returns every layer's output, the logits last
                    pairs = list(zip(fake_outputs[:-1], real_outputs[:-1], strict=True))
                    feature_matching = sum(torch.nn.functional.l1_loss(f, r) for f, r in pairs) / len(pairs)
                    g_loss = g_loss + engine.feature_matching_weight * feature_matching
        engine._step(g_loss, state.g_optimizer, state.g_scaler)

        d_loss = torch.zeros((), device=images.device)
        if adversarial:
            state.d_network.train()
            state.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with engine._autocast():
                # one forward over fakes and reals together: DDP allows one forward per backward
                logits = state.d_network(torch.cat([reconstruction.detach(), images]).float().contiguous())[-1]
                fake_logits, real_logits = logits.chunk(2)
                d_loss = (
                    engine.adv_weight
                    * 0.5
                    * (
                        state.d_loss_function(fake_logits, target_is_real=False, for_discriminator=True)
                        + state.d_loss_function(real_logits, target_is_real=True, for_discriminator=True)
                    )
                )
            engine._step(d_loss, state.d_optimizer, state.d_scaler)

        return {
            Keys.IMAGE: images,
            Keys.PRED: reconstruction.detach(),
            AdversarialKeys.REALS: images,
            AdversarialKeys.FAKES: reconstruction.detach(),
            Keys.LOSS: g_loss.item(),
            "recon_loss": recon_loss.item(),
            "kl_loss": kl_loss.item(),
            "perceptual_loss": perceptual.item(),
            "g_adv_loss": g_adv.item(),
            "fm_loss": float(feature_matching.detach()),
            "d_loss": d_loss.item(),
        }
