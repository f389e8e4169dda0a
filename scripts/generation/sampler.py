# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Sampling: noise -> latent with a trained UNet (optionally guided by a ControlNet) -> image.

The reverse loop is MONAI's: ``DiffusionInferer.sample`` and ``ControlNetDiffusionInferer.sample``
step any MONAI scheduler (DDPM, DDIM, and rectified flow with its next timestep), and the latter
adds the ControlNet's residuals to the UNet at every step. What they leave to the caller, and
this module does once for every schedule:

* ``set_timesteps`` with rectified flow's extra argument (the latent volume, which shifts its
  timesteps for the volume size);
* starting noise from a per-case seed, drawn on the CPU so a seed gives the same noise on every
  device (DDPM's stochastic steps draw from the global generator: seed it for repeatable DDPM);
* the one-hot conditioning at image resolution, computed once per call, not once per step;
* decoding the latents with the frozen autoencoder, after undoing ``scale_factor``;
* optionally, autoguidance by a weaker UNet (:mod:`scripts.generation.autoguidance`), wrapped so
  the inferers still see one network.

The training configs use it to validate; inference can use it as is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.engines import PrepareBatch
from monai.inferers import ControlNetDiffusionInferer, DiffusionInferer
from monai.networks.schedulers import RFlowScheduler
from monai.networks.utils import eval_mode

from scripts.core.checkpoints import unwrap
from scripts.core.settings import as_bool
from scripts.data.labels import LabelContract
from scripts.data.latent_space import LatentScaling
from scripts.generation.autoguidance import AutoGuidedUNet, guidance_enabled

__all__ = [
    "set_sampling_timesteps",
    "conditioning_embedded_once",
    "onednn_conv3d",
    "LatentDiffusionSampler",
    "MaskSamplingPrepareBatch",
]


def set_sampling_timesteps(scheduler: Any, num_inference_steps: int, latent_size: Sequence[int]) -> None:
    """``scheduler.set_timesteps`` for any schedule; rectified flow also needs the latent volume size.

    The timesteps stay on the CPU: MONAI's sampling loops append a CPU zero to them.
    """
    if isinstance(scheduler, RFlowScheduler):
        numel = int(torch.prod(torch.tensor(list(latent_size))))
        scheduler.set_timesteps(num_inference_steps, input_img_size_numel=numel)
    else:
        scheduler.set_timesteps(num_inference_steps)


class _Precomputed(torch.nn.Module):
    """Stands in for a ControlNet's conditioning embedding: returns the embedding computed before."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        return self.embedding


@contextmanager
def conditioning_embedded_once(controlnet: torch.nn.Module, condition: torch.Tensor) -> Iterator[None]:
    """Run ``controlnet``'s conditioning embedding on ``condition`` once for a whole sampling loop.

    MONAI's ``ControlNet.forward`` embeds the full-resolution mask at every step although the mask
    does not change during sampling; the embedding convolutions run at image resolution, so on
    the sampling path they are computed once here and the module is put back afterwards. Only
    for gradient-free sampling: the cached tensor would go stale as soon as the weights change.
    """
    original = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = _Precomputed(original(condition))
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = original


def _onednn_conv_forward(
    module: torch.nn.Conv3d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.aten.mkldnn_convolution(
            input, weight, bias, module.padding, module.stride, module.dilation, module.groups
        )
    return type(module)._conv_forward(module, input, weight, bias)


@contextmanager
def onednn_conv3d(*networks: torch.nn.Module) -> Iterator[None]:
    """Run the gradient-free float32 CPU ``Conv3d`` layers of ``networks`` on oneDNN while active.

    For a batch of one, PyTorch's CPU convolution uses oneDNN only when ``N * C * D * H > 20480``
    (a rule made for 2D images that ignores the last axis) and otherwise an im2col kernel that was
    measured ~7x slower on a 32-channel 16^3 latent: every layer of the demo UNet and ControlNet
    falls below the threshold, and sampling a volume took twice as long (benchmarks/). Only these
    networks' layers are switched (an instance attribute over ``Conv3d._conv_forward``), and only
    for the duration of the block; the results agree with the default kernel to ~1e-6. A layer
    reached twice (the same network passed twice, or shared by two) is switched once.
    """
    patched = []
    if torch.backends.mkldnn.is_available():
        for network in networks:
            for module in network.modules():
                if (
                    type(module) is torch.nn.Conv3d
                    and module.padding_mode == "zeros"
                    and not isinstance(module.padding, str)
                    and "_conv_forward" not in vars(module)
                ):
                    module._conv_forward = functools.partial(_onednn_conv_forward, module)
                    patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module._conv_forward


class _ScaledControlNet(torch.nn.Module):
    """A ControlNet whose residuals are scaled by ``conditioning_scale`` (MONAI's inferers pass none)."""

    def __init__(self, controlnet: torch.nn.Module, conditioning_scale: float) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    def forward(self, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.controlnet(conditioning_scale=self.conditioning_scale, **kwargs)


class LatentDiffusionSampler(torch.nn.Module):
    """Seeds (and, with a ControlNet, label maps) -> decoded images on the model grid.

    Noise for a case comes from a CPU generator seeded with the case's seed, so a seed gives the
    same noise on every device. With a ControlNet, the one-hot conditioning is computed once per
    call from the image-resolution label map and reused at every step.

    The sampler never changes its networks' train/eval mode from outside: ``train()``/``eval()``
    on it touch only its own flag (the trainer owns the ControlNet's mode); each call runs the
    networks in eval mode and restores their modes afterwards.

    Args:
        unet: trained diffusion UNet (DDP-wrapped or bare).
        scheduler: sampling scheduler (DDIM for a DDPM-trained UNet, RFlow for rectified flow).
        decoder: frozen autoencoder wrapper with ``decode(latent)`` (``TiledAutoencoder``).
        scale_factor: latent scaling the UNet was trained with; latents are divided by it to decode.
        latent_shift: per-channel latent centring the UNet was trained with (``None``: none); added
            back after the division, before decoding.
        num_inference_steps: reverse steps per sample.
        latent_channels: channels of the latent.
        compression: image size / latent size per axis.
        latent_size: latent grid of unconditional samples.
        controlnet: optional guidance network (DDP-wrapped or bare).
        contract: label contract making the one-hot conditioning (required with ``controlnet``).
        intensity_range: decoded images are clipped to it (preprocessed images lie in [0, 1]).
        conditioning_scale: multiplies the ControlNet's residuals (1: as trained; below 1 the mask
            guides less, above 1 more).
        progress: show a progress bar over the reverse steps of each call.
        guide_unet: optional weaker UNet for autoguidance (:mod:`scripts.generation.autoguidance`),
            used when ``autoguidance_weight`` is not 1.
        autoguidance_weight: each step's prediction is ``guide + weight * (unet - guide)``.
        onednn_convolutions: on the CPU, run the networks' ``Conv3d`` layers on oneDNN while sampling
            (:func:`onednn_conv3d`: about twice as fast at demo size, the same result to ~1e-6); false: PyTorch's
            own choice of kernel.
        inferer: the MONAI inferer whose ``sample`` runs the reverse loop (``ControlNetDiffusionInferer`` with a
            ControlNet, else ``DiffusionInferer``; ``None``: one made with ``scheduler``).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        decoder: Any,
        scale_factor: float,
        num_inference_steps: int,
        latent_channels: int,
        compression: int,
        latent_size: Sequence[int] | None = None,
        controlnet: torch.nn.Module | None = None,
        contract: LabelContract | None = None,
        intensity_range: tuple[float, float] | None = (0.0, 1.0),
        conditioning_scale: float = 1.0,
        progress: bool = False,
        latent_shift: Sequence[float] | None = None,
        guide_unet: torch.nn.Module | None = None,
        autoguidance_weight: float = 1.0,
        inferer: DiffusionInferer | ControlNetDiffusionInferer | None = None,
        onednn_convolutions: bool = True,
    ) -> None:
        super().__init__()
        if controlnet is not None and contract is None:
            raise ValueError("a ControlNet sampler needs the label contract for its one-hot conditioning.")
        if guidance_enabled(autoguidance_weight) and guide_unet is None:
            raise ValueError(f"autoguidance_weight {autoguidance_weight} needs a guide UNet.")
        self.unet = unwrap(unet)
        self.controlnet = None if controlnet is None else unwrap(controlnet)
        self.scheduler = scheduler
        self.decoder = decoder
        self.scaling = LatentScaling(scale_factor, latent_shift)
        self.num_inference_steps = int(num_inference_steps)
        self.latent_channels = int(latent_channels)
        self.compression = int(compression)
        self.latent_size = None if latent_size is None else tuple(int(s) for s in latent_size)
        self.contract = contract
        self.intensity_range = intensity_range
        self.conditioning_scale = float(conditioning_scale)
        self.progress = bool(progress)
        self.autoguidance_weight = float(autoguidance_weight)
        self.guide_unet = unwrap(guide_unet) if guidance_enabled(autoguidance_weight) else None
        if inferer is None:
            inferer = DiffusionInferer(scheduler) if controlnet is None else ControlNetDiffusionInferer(scheduler)
        self.inferer = inferer
        self.onednn_convolutions = as_bool(onednn_convolutions, "onednn_convolutions")

    @property
    def scale_factor(self) -> float:
        return self.scaling.scale_factor

    @property
    def latent_shift(self) -> torch.Tensor | None:
        """``(C, 1, 1, 1)`` or ``None``."""
        return self.scaling.latent_shift

    def train(self, mode: bool = True) -> LatentDiffusionSampler:
        self.training = mode  # not recursive, see the class docstring
        return self

    def noise(
        self, seeds: Sequence[int] | torch.Tensor, latent_size: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        """Starting noise, one seeded CPU draw per case."""
        shape = (self.latent_channels, *latent_size)
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(draws).to(device)

    def sample_latents(self, seeds: Sequence[int] | torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents for ``seeds`` (one per case), guided by ``label`` (B, 1, *image_size) when a ControlNet is set."""
        device = next(self.unet.parameters()).device
        condition = None
        if self.controlnet is not None:
            if label is None:
                raise ValueError("a ControlNet sampler needs a label map per case.")
            if any(s % self.compression for s in label.shape[2:]):
                raise ValueError(
                    f"label size {tuple(label.shape[2:])} is not divisible by the compression {self.compression}."
                )
            latent_size = tuple(s // self.compression for s in label.shape[2:])
            condition = self.contract.one_hot(label.to(device)).float()  # once per call, reused at every step
        elif self.latent_size is not None:
            latent_size = self.latent_size
        else:
            raise ValueError("an unconditional sampler needs latent_size.")
        noise = self.noise(seeds, latent_size, device)
        set_sampling_timesteps(self.scheduler, self.num_inference_steps, latent_size)
        networks = [n for n in (self.unet, self.guide_unet, self.controlnet) if n is not None]
        unet = self.unet
        if self.guide_unet is not None:
            unet = AutoGuidedUNet(self.unet, self.guide_unet, self.autoguidance_weight)
        fast = networks if self.onednn_convolutions else ()
        with eval_mode(*networks), torch.no_grad(), onednn_conv3d(*fast):
            if self.controlnet is None:
                return self.inferer.sample(noise, unet, self.scheduler, verbose=self.progress)
            controlnet = self.controlnet
            if self.conditioning_scale != 1.0:
                controlnet = _ScaledControlNet(controlnet, self.conditioning_scale)
            with conditioning_embedded_once(self.controlnet, condition):
                return self.inferer.sample(noise, unet, controlnet, condition, self.scheduler, verbose=self.progress)

    def decode(self, latents: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents -> images, clipped to ``intensity_range``, on the latents' device.

        A label-guided decoder (``decoder.label_guided``) also reads ``label`` (B, 1, *image_size),
        one-hot encoded by the label contract as the ControlNet's conditioning is.
        """
        condition = None
        if getattr(self.decoder, "label_guided", False):
            if label is None or self.contract is None:
                raise ValueError("a label-guided decoder needs the label map and the label contract to decode.")
            condition = self.contract.one_hot(label.to(latents.device)).float()
        images = self.decoder.decode(self.scaling.denormalise(latents), condition).to(latents.device)
        return images if self.intensity_range is None else images.clamp(*self.intensity_range)

    def forward(
        self,
        label: torch.Tensor | None = None,
        seeds: Sequence[int] | torch.Tensor | None = None,
        decode_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images for ``seeds`` guided by ``label`` (model grid); ``decode_label``: the label map on the decoder's
        output grid when it differs (a refining decoder's finer grid), else ``label`` is decoded with."""
        if seeds is None:
            seeds = range(1 if label is None else label.shape[0])
        return self.decode(self.sample_latents(seeds, label), label if decode_label is None else decode_label)


class MaskSamplingPrepareBatch(PrepareBatch):
    """Evaluator batch for guided sampling: the label map is both the network input and the target
    of the mask-fidelity metrics; the per-case seeds go to the sampler."""

    def __init__(self, label_key: str = "label", seed_key: str = "seed") -> None:
        self.label_key = label_key
        self.seed_key = seed_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        label = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking)
        return label, label, (), {"seeds": [int(s) for s in batchdata[self.seed_key]]}
