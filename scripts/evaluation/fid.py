# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Frechet distances between real and synthetic volumes, under two protocols.

* **2.5D** (MAISI's ``compute_fid_2-5d_ct.py``): every volume is min-max scaled to [0, 1] and cut
  into 2D slices along each of its three axes; a 2D network turns each slice into one feature
  vector (global average pool of its last feature map). The FID is computed per plane over all
  slices of all volumes - ``xy`` (axial, slices along z), ``yz`` (sagittal, along x), ``zx``
  (coronal, along y) - and the three are averaged. MAISI uses a RadImageNet ResNet-50.
* **3D**: one feature vector per whole volume from a 3D network (MedicalNet-style ResNet,
  z-scored input, global average pool of ``layer4``).

The distance itself is MONAI's ``FIDMetric``. Feature extractors are pluggable: the offline default
``segmentation``, the encoder of the segmentation network trained on real images only (see
:class:`SegmentationFeatures`: independent of the generator, whose own features would rate its images by
what it can represent); the pretrained ResNets of :mod:`scripts.networks.feature_networks`, loaded from a
LOCAL weights file (nothing downloads); or ``autoencoder``, the bundle's own stage-1 encoder (see
:class:`AutoencoderFeatures`), kept as a labelled option: its decoder family paints every generated volume.
Numbers from different extractors, grids or set sizes are not comparable with each other, and only
RadImageNet 2.5D on MAISI's grid approaches a published protocol.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from monai.metrics import FIDMetric
from monai.metrics.fid import compute_frechet_distance

from scripts.core.checkpoints import file_hash
from scripts.core.errors import BundleInputError
from scripts.models.autoencoder import load_autoencoder_weights
from scripts.networks import feature_networks
from scripts.networks.feature_networks import canonical_network_type, load_feature_extractor

__all__ = [
    "PLANES",
    "AUTOENCODER",
    "SEGMENTATION",
    "FeatureNetwork",
    "AutoencoderFeatures",
    "SegmentationFeatures",
    "build_fid_extractor",
    "frechet_distance",
    "Fid25D",
    "Fid3D",
    "fid_protocol",
    "describe",
]

logger = logging.getLogger(__name__)

#: Plane name -> the axis of a channel-first volume ``(C, X, Y, Z)`` (RAS) that the slices are cut along.
PLANES: dict[str, int] = {"xy": 3, "yz": 1, "zx": 2}
#: Names of the extractors the bundle has without downloads: the default, and the generator's own encoder.
SEGMENTATION = "segmentation"
AUTOENCODER = "autoencoder"
#: Thickness a slice is repeated to for a 3D segmentation network: a multiple of every demo network's
#: total downsampling (VNet: 16), so each level sees a whole number of voxels.
SEGMENTATION_SLAB = 16
#: Networks per protocol (besides ``autoencoder``): 2D for 2.5D, 3D for the whole-volume protocol.
_NETWORKS = {2: ("radimagenet_resnet50",), 3: ("medicalnet_resnet10", "medicalnet_resnet50")}
_PROTOCOL = {2: "2.5D", 3: "3D"}


class FeatureNetwork(Protocol):
    """What a FID protocol needs from an extractor: its input dimensionality and pooled features."""

    spatial_dims: int

    def pooled(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, *spatial) -> (B, F)
        ...


def _as_volumes(x: torch.Tensor, spatial_dims: int, slab: int) -> torch.Tensor:
    """``x`` as float volumes for a 3D network: slices ``(B, 1, H, W)`` (``spatial_dims`` 2) each repeated
    ``slab`` times along a third axis, volumes ``(B, 1, X, Y, Z)`` as they are."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != 1:
        raise ValueError(f"expected (B, 1, {'H, W' if spatial_dims == 2 else 'X, Y, Z'}), got {tuple(x.shape)}")
    h = x.float()
    return h.unsqueeze(-1).expand(*h.shape, slab) if spatial_dims == 2 else h


class AutoencoderFeatures(torch.nn.Module):
    """The bundle's stage-1 encoder as an offline feature network (the default extractor).

    Features: the output of every residual block of ``AutoencoderKL.encoder`` (one per level at
    demo size: 16, 32 and 64 channels at full, 1/2 and 1/4 resolution), each averaged over
    space, concatenated (112 values at demo size). The encoder is trained on this domain and
    needs no download, but it is not an ImageNet/RadImageNet/MedicalNet network: its FIDs rank
    sets measured with the same weights and are not comparable with published FIDs.

    ``spatial_dims=3`` takes whole volumes ``(B, 1, X, Y, Z)``. ``spatial_dims=2`` takes slices
    ``(B, 1, H, W)``: each is repeated ``compression`` times along a third axis (the thinnest slab
    the encoder's downsampling accepts), so a slice is encoded as a volume without through-plane change.
    Inputs are expected in [0, 1], as the autoencoder was trained.
    """

    def __init__(self, autoencoder: torch.nn.Module, spatial_dims: int = 3, compression: int = 4) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.encoder = autoencoder.encoder.eval().requires_grad_(False)
        self.spatial_dims = spatial_dims
        self.compression = int(compression)

    def train(self, mode: bool = True) -> AutoencoderFeatures:
        return super().train(False)  # a fixed feature network: GroupNorm has no state, but keep eval semantics

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = _as_volumes(x, self.spatial_dims, self.compression)
        features = []
        for block in self.encoder.blocks:
            h = block(h)
            if type(block).__name__ == "AEKLResBlock":
                features.append(h.flatten(2).mean(dim=2))
        return torch.cat(features, dim=1)


class SegmentationFeatures(torch.nn.Module):
    """The encoder of a segmentation network trained on real images only as a feature network.

    Features: for each resolution the network's encoder passes through, the last convolution output at that
    resolution, averaged over space; concatenated (found by hooking every ``Conv3d`` in the order they run,
    until the resolution grows again, where the decoder starts; this holds for the five MONAI networks of
    configs/train_segmentation.yaml). The network learned what real images of this domain hold and has
    never seen a generated one, so its features do not favour what the generator can represent.

    ``spatial_dims=3`` takes whole volumes ``(B, 1, X, Y, Z)``; ``spatial_dims=2`` takes slices
    ``(B, 1, H, W)``, each repeated :data:`SEGMENTATION_SLAB` times along a third axis. Inputs as the
    network was trained: preprocessed images in [0, 1].
    """

    def __init__(self, network: torch.nn.Module, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.network = network.eval().requires_grad_(False)
        self.spatial_dims = spatial_dims
        self.convolutions = [m for m in self.network.modules() if isinstance(m, torch.nn.Conv3d)]
        if not self.convolutions:
            raise ValueError(f"{type(network).__name__} has no Conv3d to take features from")

    def train(self, mode: bool = True) -> SegmentationFeatures:
        return super().train(False)  # a fixed feature network: batch/instance norms keep their eval behaviour

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = _as_volumes(x, self.spatial_dims, SEGMENTATION_SLAB)
        outputs: list[tuple[int, torch.Tensor]] = []  # (voxels per channel, pooled output) in the order run

        def record(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            outputs.append((output[0, 0].numel(), output.flatten(2).mean(dim=2)))

        handles = [conv.register_forward_hook(record) for conv in self.convolutions]
        try:
            self.network(h)
        finally:
            for handle in handles:
                handle.remove()
        levels: dict[int, torch.Tensor] = {}  # resolution -> its last output on the way down
        for voxels, pooled in outputs:
            if levels and voxels > min(levels):
                break  # the resolution grows: the decoder has started
            levels[voxels] = pooled
        return torch.cat(list(levels.values()), dim=1)


def _fid_weights_error(error: BundleInputError, setting: str) -> BundleInputError:
    """The feature-network loader speaks of the perceptual loss; say which FID setting to fix instead."""
    message = str(error).replace(feature_networks._WEIGHTS_HINT, f"check --{setting}")
    message = message.replace("perceptual weights file", "FID weights file")
    return BundleInputError(message if f"--{setting}" in message else f"{message} (--{setting})")


def build_fid_extractor(
    network: str,
    weights_path: str | None,
    spatial_dims: int,
    autoencoder: torch.nn.Module | None = None,
    autoencoder_path: str | None = None,
    compression: int = 4,
    setting: str = "fid_weights",
    device: torch.device | str = "cpu",
    segmenter: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """The feature network of one protocol (``spatial_dims`` 2: the 2.5D protocol, 3: the 3D one).

    ``network`` is ``"segmentation"`` (``segmenter``: the loaded segmentation network trained on real
    images, ``--segmentation_checkpoint``), ``"autoencoder"`` (the stage-1 encoder: ``autoencoder`` is the
    configured, not yet loaded network and ``autoencoder_path`` its weights) or a pretrained ResNet of
    :mod:`scripts.networks.feature_networks` of the right dimensionality with ``weights_path`` a local
    state dict. ``setting`` names the weights setting in error messages.

    Raises:
        BundleInputError: unknown network, a network of the other dimensionality, no or a missing
            weights file, or weights that do not fit the architecture (one line naming the file).
    """
    protocol = _PROTOCOL[spatial_dims]
    if str(network).lower() == SEGMENTATION:
        if segmenter is None:
            raise BundleInputError(
                f"{protocol} FID: its default extractor is the segmentation network trained on real images; pass "
                f"--segmentation_checkpoint, or --{setting.replace('weights', 'network')} {AUTOENCODER} (the "
                "generator's own encoder, not independent of it)"
            )
        return SegmentationFeatures(segmenter, spatial_dims).to(device)
    if str(network).lower() == AUTOENCODER:
        if autoencoder is None or not autoencoder_path:
            raise BundleInputError(f"{protocol} FID with the autoencoder extractor needs --autoencoder_path")
        load_autoencoder_weights(
            autoencoder,
            autoencoder_path,
            hint="train them with configs/train_autoencoder.yaml and pass --autoencoder_path",
        )
        return AutoencoderFeatures(autoencoder, spatial_dims, compression).to(device)
    try:
        name = canonical_network_type(network)
    except BundleInputError:
        name = None
    if name not in _NETWORKS[spatial_dims]:
        choices = ", ".join((SEGMENTATION, AUTOENCODER, *_NETWORKS[spatial_dims]))
        raise BundleInputError(f"{protocol} FID network {network!r} is not supported; use one of {choices}")
    if not weights_path:
        raise BundleInputError(
            f"{protocol} FID network {name!r} needs a local weights file: pass --{setting} FILE "
            f"(nothing is downloaded), or use the offline default --{setting.replace('weights', 'network')} {SEGMENTATION}"
        )
    try:
        return load_feature_extractor(name, weights_path).to(device)
    except BundleInputError as error:
        raise _fid_weights_error(error, setting) from error


def frechet_distance(synthetic: torch.Tensor, real: torch.Tensor) -> float:
    """MONAI's ``FIDMetric`` of two feature sets ``(N, F)``.

    With fewer samples than features the covariances are singular and ``scipy.linalg.sqrtm`` may
    return a large imaginary part, which MONAI refuses; the distance is then recomputed with a
    small ridge on both diagonals, as MONAI itself does for a non-finite square root.
    """
    if len(synthetic) < 2 or len(real) < 2:
        raise BundleInputError(f"FID needs at least 2 feature vectors per set, got {len(synthetic)} and {len(real)}")
    try:
        with (
            warnings.catch_warnings()
        ):  # singular covariances are expected with few samples; MONAI's scipy call is deprecated
            warnings.filterwarnings("ignore", message=".*(singular|`disp` argument).*")
            value = float(FIDMetric()(synthetic, real))
    except ValueError as error:
        if "Imaginary component" not in str(error):
            raise
        s, r = synthetic.double(), real.double()
        ridge = 1e-6 * max(float(s.var(0).mean()), float(r.var(0).mean()), 1e-12)
        eye = torch.eye(s.shape[1], dtype=torch.double) * ridge
        cov_s, cov_r = torch.cov(s.T) + eye, torch.cov(r.T) + eye
        value = float(compute_frechet_distance(s.mean(0), cov_s, r.mean(0), cov_r).real)
        logger.info(
            f"FID: singular covariances ({len(s)} and {len(r)} samples of {s.shape[1]} features), "
            f"recomputed with a ridge of {ridge:.3g}"
        )
    if not math.isfinite(value):
        raise RuntimeError(f"FID is not finite ({value})")
    return max(value, 0.0)  # rounding in the matrix square root can leave a tiny negative value


def _minmax(volume: torch.Tensor) -> torch.Tensor:
    low, high = volume.min(), volume.max()
    return (volume - low) / (high - low + 1e-10)


class Fid25D:
    """The 2.5D protocol: per-plane features of every slice, FID per plane and their mean.

    Args:
        extractor: a 2D feature network (``spatial_dims == 2``).
        center_slices_ratio: keep only this central share of the slices along each axis (MAISI's
            ``enable_center_slices_ratio``; 1.0: all slices).
        batch_size: slices per forward pass.
    """

    protocol = "2.5D"

    def __init__(self, extractor: FeatureNetwork, center_slices_ratio: float = 1.0, batch_size: int = 32) -> None:
        if extractor.spatial_dims != 2:
            raise BundleInputError("the 2.5D FID needs a 2D feature network (e.g. radimagenet_resnet50 or autoencoder)")
        if not 0 < center_slices_ratio <= 1:
            raise BundleInputError(f"config 'fid_center_slices_ratio' must be in (0, 1], got {center_slices_ratio}")
        self.extractor = extractor
        self.center_slices_ratio = float(center_slices_ratio)
        self.batch_size = int(batch_size)

    def _kept(self, size: int) -> slice:
        if self.center_slices_ratio == 1.0:
            return slice(0, size)
        return slice(
            int((1.0 - self.center_slices_ratio) / 2.0 * size), int((1.0 + self.center_slices_ratio) / 2.0 * size)
        )

    @torch.no_grad()
    def volume_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of one channel-first volume ``(1, X, Y, Z)``: plane -> ``(slices, F)`` (CPU, float32)."""
        device = next(iter(self.extractor.parameters())).device
        volume = _minmax(image.float().to(device))
        result = {}
        for plane, axis in PLANES.items():
            slices = volume.movedim(axis, 0)[self._kept(volume.shape[axis])]  # (S, 1, h, w)
            parts = [
                self.extractor.pooled(slices[i : i + self.batch_size]) for i in range(0, len(slices), self.batch_size)
            ]
            result[plane] = torch.cat(parts).float().cpu()
        return result

    @staticmethod
    def distance(
        synthetic: Sequence[Mapping[str, torch.Tensor]], real: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, float]:
        """``{"xy", "yz", "zx": FID of that plane's slices, "mean": their mean}`` from per-volume features."""
        result = {
            p: frechet_distance(torch.cat([v[p] for v in synthetic]), torch.cat([v[p] for v in real])) for p in PLANES
        }
        result["mean"] = sum(result[p] for p in PLANES) / len(PLANES)
        return result


class Fid3D:
    """The 3D protocol: one feature vector per whole volume, one FID.

    Args:
        extractor: a 3D feature network (``spatial_dims == 3``).
    """

    protocol = "3D"

    def __init__(self, extractor: FeatureNetwork) -> None:
        if extractor.spatial_dims != 3:
            raise BundleInputError("the 3D FID needs a 3D feature network (e.g. medicalnet_resnet10 or autoencoder)")
        self.extractor = extractor

    @torch.no_grad()
    def volume_features(self, image: torch.Tensor) -> torch.Tensor:
        """Features of one channel-first volume ``(1, X, Y, Z)``: ``(F,)`` (CPU, float32)."""
        device = next(iter(self.extractor.parameters())).device
        return self.extractor.pooled(image.float()[None].to(device))[0].float().cpu()

    @staticmethod
    def distance(synthetic: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> float:
        return frechet_distance(torch.stack(list(synthetic)), torch.stack(list(real)))


def fid_protocol(
    spatial_dims: int,
    network: str | None,
    weights_path: str | None = None,
    autoencoder: torch.nn.Module | None = None,
    autoencoder_path: str | None = None,
    compression: int = 4,
    center_slices_ratio: float = 1.0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    segmenter: torch.nn.Module | None = None,
) -> Fid25D | Fid3D | None:
    """The 2.5D (``spatial_dims`` 2) or 3D protocol with its extractor (:func:`build_fid_extractor`);
    ``None`` when ``network`` is not set (the protocol is not measured)."""
    if not network or str(network).strip().lower() in ("null", "none"):  # the CLI passes null as a string
        logger.info(f"{_PROTOCOL[spatial_dims]} FID not measured (no network configured)")
        return None
    setting = "fid_2_5d_weights" if spatial_dims == 2 else "fid_3d_weights"
    extractor = build_fid_extractor(
        network, weights_path, spatial_dims, autoencoder, autoencoder_path, compression, setting, device, segmenter
    )
    return Fid25D(extractor, center_slices_ratio, batch_size) if spatial_dims == 2 else Fid3D(extractor)


def describe(
    network: str | None,
    weights_path: str | None,
    autoencoder_path: str | None = None,
    segmentation_checkpoint: str | None = None,
) -> dict[str, Any] | None:
    """What a protocol measures with, for ``metrics.json``: the network and its weights file with sha256."""
    if not network or str(network).strip().lower() in ("null", "none"):
        return None
    own = {AUTOENCODER: autoencoder_path, SEGMENTATION: segmentation_checkpoint}
    path = own.get(str(network).lower(), weights_path)
    exists = bool(path) and os.path.isfile(path)
    return {
        "network": str(network),
        "weights": None if not path else os.path.abspath(path),
        "weights_sha256": file_hash(path) if exists else None,
        # True: features of no published protocol, so the values are not comparable with published FIDs
        "offline_surrogate": str(network).lower() in own,
        # False: the generator's own encoder, which favours what the generator can represent
        "independent_of_generator": str(network).lower() != AUTOENCODER,
    }
