# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Tiled (sliding-window) encoding and decoding with the stage-1 autoencoder.

A volume whose decoded image does not fit in accelerator memory is processed window by window
with :func:`monai.inferers.sliding_window_inference`:

* **decode** slides over the *latent* (``latent_roi_size``) and each window comes back
  ``compression`` times larger per axis; MONAI places and blends these up-scaled windows itself
  (it reads the zoom from the predictor's output size over its input size).
* **encode** slides over the *image* with ``image_roi_size = compression * latent_roi_size`` and
  each window returns its latent mean, ``1 / compression`` of the window per axis.

A label-guided autoencoder (``SPADEAutoencoderKL``) decodes with the one-hot label map, which is
cut into the same windows as the latent.

Windows are blended with Gaussian weights, and the stitched result is accumulated on ``device``
(the CPU by default), so the accelerator only ever holds one window's activations.

Tiling is an approximation: the decoder's convolutions see zero padding at a window edge where the
whole volume has data, and every ``GroupNorm`` normalises with its own window's statistics.
:func:`seam_error` measures the difference against an untiled pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.networks.utils import pixelshuffle, pixelunshuffle

from scripts.core.checkpoints import unwrap
from scripts.networks.label_guided import is_label_guided

__all__ = ["TiledAutoencoder", "seam_error", "gaussian_weight_map"]

#: Smallest blending weight: keeps the summed weights of far-off windows strictly positive.
_MIN_WEIGHT = 1e-30


def gaussian_weight_map(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian blending weights over a window of ``size``, peak 1, ``sigma = sigma_scale * size``.

    Unlike :func:`monai.data.utils.compute_importance_map` the tails are not clamped to 1e-3.
    In 3D that clamp flattens the product of three tails: near a window corner every window that
    covers a voxel gets the same 1e-3 weight, so a window whose (zero-padded) edge sits right next
    to the voxel counts as much as one that holds it near its centre. That alone raised the seam
    error of a random decoder about fourfold. A floor of ``1e-30`` only keeps the weights positive.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}.")
    weights = torch.ones((), dtype=torch.float64)
    for n in size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        weights = weights.unsqueeze(-1) * torch.exp(-(x**2) / (2.0 * (sigma_scale * n) ** 2))
    return (weights / weights.max()).clamp_min(_MIN_WEIGHT).to(torch.float32)


class TiledAutoencoder:
    """Sliding-window ``encode`` / ``decode`` around a MONAI ``AutoencoderKL`` (or alike).

    Args:
        autoencoder: a network with ``encode(x) -> (z_mu, z_sigma)`` and ``decode(z) -> x``, already
            on ``sw_device`` and in eval mode (this class does not change its mode).
        latent_roi_size: window size on the latent grid, one entry per spatial axis; the image
            window is ``compression`` times larger. Axes shorter than the window use their full size.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``. More overlap
            means more windows (slower) and smaller seams.
        compression: spatial down-sampling factor of the autoencoder's encoder per axis; a refining decoder
            (``decoder_upsampling`` k) works between its latent and a ``2**k`` times finer image grid, so
            the image-to-latent factor of both directions is ``compression * 2**k``.
        sw_batch_size: windows run per network call.
        sw_device: device the windows run on; defaults to the autoencoder's parameter device.
        device: device the stitched output is accumulated on.
        sigma_scale: Gaussian sigma as a fraction of the window size (MONAI's default 0.125).
        amp: autocast the network on CUDA windows (ignored elsewhere).
        amp_dtype: autocast dtype when ``amp`` applies.
        progress: show a progress bar over the windows.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        latent_roi_size: Sequence[int] = (16, 16, 16),
        overlap: float = 0.5,
        compression: int = 4,
        sw_batch_size: int = 1,
        sw_device: torch.device | str | None = None,
        device: torch.device | str = "cpu",
        sigma_scale: float = 0.125,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
        progress: bool = False,
    ) -> None:
        self.latent_roi_size = tuple(int(r) for r in latent_roi_size)
        if not self.latent_roi_size or min(self.latent_roi_size) < 1:
            raise ValueError(f"latent_roi_size must be positive integers, got {tuple(latent_roi_size)}.")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
        if int(compression) != compression or compression < 1:
            raise ValueError(f"compression must be a positive integer, got {compression}.")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        gaussian_weight_map((1,), sigma_scale)  # validates sigma_scale
        self.autoencoder = autoencoder
        self.overlap = float(overlap)
        self.compression = int(compression) * 2 ** int(getattr(unwrap(autoencoder), "decoder_upsampling", 0))
        self.sw_batch_size = int(sw_batch_size)
        self.sw_device = torch.device(sw_device) if sw_device is not None else _module_device(autoencoder)
        self.device = torch.device(device)
        self.sigma_scale = float(sigma_scale)
        self.amp = bool(amp)
        self.amp_dtype = amp_dtype
        self.progress = progress

    @property
    def image_roi_size(self) -> tuple[int, ...]:
        """Window size on the image grid: ``compression * latent_roi_size``."""
        return tuple(self.compression * r for r in self.latent_roi_size)

    # ------------------------------------------------------------------ public API
    @property
    def label_guided(self) -> bool:
        """True when the decoder reads a label map (``decode(latent, condition)``)."""
        return is_label_guided(self.autoencoder)

    def decode(self, latent: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``latent`` (B, C, *spatial) to an image ``compression`` times larger per axis, on ``device``.

        ``condition``: the one-hot label map (B, classes, *image spatial) a label-guided autoencoder
        decodes with (required there, refused otherwise). Each window gets its own part of it: the
        map is folded into the latent grid (``pixelunshuffle``), slid with the latent and unfolded
        in every window, so MONAI's sliding window cuts both at the same place.
        """
        latent_size = self._check_latent(latent)
        roi = _fit_roi(self.latent_roi_size, latent_size)
        packed = latent
        if self.label_guided != (condition is not None):
            raise ValueError(
                "a label-guided autoencoder decodes only with a label map"
                if self.label_guided
                else "this autoencoder is not label-guided: it decodes without a label map"
            )
        if condition is not None:
            expected = (latent.shape[0], *(self.compression * s for s in latent_size))
            if (condition.shape[0], *condition.shape[2:]) != expected:
                raise ValueError(
                    f"label map of shape {tuple(condition.shape)} does not fit latents of shape {tuple(latent.shape)}"
                )
            folded = pixelunshuffle(condition.to(latent.device, latent.dtype), len(latent_size), self.compression)
            packed = torch.cat([latent, folded], dim=1)
        predictor = functools.partial(self._decode_packed_window, latent_channels=latent.shape[1])
        # no_grad rather than inference_mode: callers may edit the result in place afterwards
        with torch.no_grad():
            if roi == latent_size:  # one window: no stitching or blending to pay for
                return predictor(packed.to(self.sw_device)).to(self.device)
            return sliding_window_inference(
                packed,
                roi_size=roi,
                sw_batch_size=self.sw_batch_size,
                predictor=predictor,
                overlap=self.overlap,
                mode="gaussian",  # down-weights window edges, where zero padding distorts the output: hides seams
                roi_weight_map=gaussian_weight_map(roi, self.sigma_scale),
                sw_device=self.sw_device,
                device=self.device,  # the full-resolution output is what runs out of accelerator memory
                progress=self.progress,
            )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode ``image`` (B, C, *spatial) to its latent MEAN, ``1 / compression`` per axis, on ``device``.

        The mean is returned, never a sample: the same image always gives the same latent.
        """
        latent_size = self._check_image(image)
        latent_roi = _fit_roi(self.latent_roi_size, latent_size)
        image_roi = tuple(self.compression * r for r in latent_roi)
        with torch.no_grad():
            if latent_roi == latent_size:
                return self._encode_window(image.to(self.sw_device)).to(self.device)
            weights = gaussian_weight_map(latent_roi, self.sigma_scale)
            return sliding_window_inference(
                image,
                roi_size=image_roi,
                sw_batch_size=self.sw_batch_size,
                predictor=self._encode_window,
                overlap=self._aligned_image_overlap(latent_size, latent_roi),
                mode="gaussian",
                # MONAI shrinks the weight map to the output window by nearest sampling: blowing the
                # latent-grid map up by `compression` makes that return exactly the latent-grid map
                roi_weight_map=_repeat(weights, self.compression),
                sw_device=self.sw_device,
                device=self.device,
                progress=self.progress,
            )

    # ------------------------------------------------------------------ windows
    def _decode_packed_window(self, packed: torch.Tensor, latent_channels: int) -> torch.Tensor:
        latent, folded = packed[:, :latent_channels], packed[:, latent_channels:]
        with self._autocast():
            if folded.shape[1]:
                condition = pixelshuffle(folded, latent.ndim - 2, self.compression)
                image = self.autoencoder.decode(latent, condition)
            else:
                image = self.autoencoder.decode(latent)
        return image.float()  # blending in half precision would lose the small Gaussian weights

    def _encode_window(self, image: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            z_mu, _ = self.autoencoder.encode(image)
        return z_mu.float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        # Only on CUDA: bf16/fp16 autocast makes 3D convolutions far slower on the CPU.
        if self.amp and self.sw_device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _aligned_image_overlap(self, latent_size: tuple[int, ...], latent_roi: tuple[int, ...]) -> tuple[float, ...]:
        """Per-axis image overlap whose window steps are whole latent voxels.

        MONAI steps ``int(roi * (1 - overlap))`` voxels. On the image grid that step must be a
        multiple of ``compression``: otherwise a window's latent voxels sit between the voxels of
        the whole latent and MONAI would add them in at a truncated, wrong position.
        """
        overlaps = []
        for size, roi in zip(latent_size, latent_roi, strict=False):
            if roi == size:
                overlaps.append(0.0)  # a single window along this axis
                continue
            step = self.compression * max(1, int(roi * (1.0 - self.overlap)))  # MONAI's step, in latent voxels
            image_roi = self.compression * roi
            # half a voxel above the wanted step, so float rounding in MONAI cannot truncate below it
            overlaps.append(max(0.0, 1.0 - (step + 0.5) / image_roi))
        return tuple(overlaps)

    # ------------------------------------------------------------------ checks
    def _check_spatial(self, x: torch.Tensor, what: str) -> tuple[int, ...]:
        n = len(self.latent_roi_size)
        if not isinstance(x, torch.Tensor) or x.ndim != n + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a (batch, channel, {n} spatial) tensor, got {shape}.")
        size = tuple(int(s) for s in x.shape[2:])
        if min(size) < 1 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{what} has an empty dimension: shape {tuple(x.shape)}.")
        return size

    def _check_latent(self, latent: torch.Tensor) -> tuple[int, ...]:
        return self._check_spatial(latent, "latent")

    def _check_image(self, image: torch.Tensor) -> tuple[int, ...]:
        size = self._check_spatial(image, "image")
        if any(s % self.compression for s in size):
            raise ValueError(
                f"image spatial size {size} must be divisible by the autoencoder compression {self.compression}."
            )
        return tuple(s // self.compression for s in size)


def seam_error(whole: torch.Tensor, tiled: torch.Tensor) -> dict[str, float]:
    """Difference between an untiled and a tiled result.

    Returns ``max_abs`` and ``mean_abs`` (absolute differences), ``data_range`` (max - min of
    ``whole``) and ``psnr`` in dB against that range (``inf`` when identical).
    """
    if tuple(whole.shape) != tuple(tiled.shape):
        raise ValueError(f"shapes differ: whole {tuple(whole.shape)} vs tiled {tuple(tiled.shape)}.")
    a = whole.detach().to("cpu", torch.float64)
    b = tiled.detach().to("cpu", torch.float64)
    diff = (a - b).abs()
    mse = float((diff**2).mean())
    data_range = float(a.max() - a.min())
    if mse == 0.0:
        psnr = math.inf
    elif data_range == 0.0:
        psnr = -math.inf
    else:
        psnr = 10.0 * math.log10(data_range**2 / mse)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "data_range": data_range, "psnr": psnr}


# ---------------------------------------------------------------------- helpers
def _fit_roi(roi: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """Shrink the window to the input along axes shorter than it.

    MONAI would zero-pad those axes instead, feeding the network values it never saw next to
    real data. Axes longer than the window need no padding: the last window is moved back to
    end at the border, so sizes that are not multiples of the window are covered exactly.
    """
    return tuple(min(r, s) for r, s in zip(roi, size, strict=False))


def _repeat(weights: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest up-sampling by an integer factor along every axis."""
    for axis in range(weights.ndim):
        weights = weights.repeat_interleave(factor, dim=axis)
    return weights


def _module_device(module: torch.nn.Module) -> torch.device:
    """Device of the module's first parameter (CPU for a parameter-free module)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
