# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Frozen ResNet feature extractors built from MONAI's ``ResNet`` and loaded from a LOCAL state dict.

Used by the perceptual loss (:mod:`scripts.networks.perceptual`) and meant for FID-style evaluation too
(2.5D with the 2D network, 3D with MedicalNet), so nothing here is specific to a loss.

Why not MONAI's own helpers: ``monai.losses.PerceptualLoss`` fetches its networks through
``torch.hub`` (even with ``pretrained=False``) and ``monai.networks.nets.resnet*(pretrained=True)``
downloads from the Hugging Face hub; the bundle has to run offline from a file the user names.

Supported networks (``network_type``):

* ``radimagenet_resnet50`` - 2D ResNet-50 with 3-channel input. Two file layouts are accepted and
  told apart by their keys:

  - *torchvision* layout (``conv1.weight``, ``layer1.0.conv1.weight``, ..., optional ``fc.*``):
    torchvision's ResNet-50 v1.5, i.e. no conv biases, stride on the 3x3 conv of a bottleneck;
  - *keras* layout, the one MONAI distributes as ``RadImageNet-ResNet50_notop.pth`` (converted
    from the original Keras release): same key names plus a bias on every convolution, the stride
    on the first 1x1 conv of a bottleneck, and BatchNorm ``eps=1.001e-5``.

* ``medicalnet_resnet10`` / ``medicalnet_resnet50`` - MedicalNet (Med3D) 3D ResNets with 1-channel
  input; checkpoints usually look like ``{"state_dict": {"module.conv1.weight": ...}}``. MedicalNet
  runs ``layer3``/``layer4`` with stride 1 and dilation 2/4 (as in the Tencent code and in the
  network MONAI's perceptual loss downloads); MONAI's ``ResNet`` has no dilation option, so those
  convolutions are re-configured after construction. This changes no weight shape.

The MONAI names ``medicalnet_resnet10_23datasets`` / ``medicalnet_resnet50_23datasets`` are
accepted as aliases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBottleneck

from scripts.core.errors import BundleInputError

__all__ = [
    "ALL_STAGES",
    "NETWORK_TYPES",
    "FeatureExtractor",
    "build_feature_network",
    "canonical_network_type",
    "load_feature_extractor",
    "load_feature_network",
    "read_state_dict",
]

#: Keys of classification / segmentation heads that a feature extractor does not use.
_HEAD_PREFIXES = ("fc.", "conv_seg.")
#: How many offending keys an architecture-mismatch message lists per kind.
_MAX_LISTED = 3
#: Stages the extractor can return: the outputs of ``layer1`` .. ``layer4``.
ALL_STAGES = (1, 2, 3, 4)
#: RadImageNet preprocessing as in MONAI's ``RadImageNetPerceptualSimilarity``: ImageNet channel
#: means in [0, 1] units, in BGR order (the Keras "caffe" convention), subtracted without scaling.
_RADIMAGENET_BGR_MEAN = (0.406, 0.456, 0.485)
_WEIGHTS_HINT = (
    "set `perceptual_weights` to a local RadImageNet ResNet-50 / MedicalNet state dict, "
    "or null to train without perceptual loss"
)


@dataclass(frozen=True)
class _NetworkSpec:
    description: str
    spatial_dims: int
    in_channels: int
    block: str
    layers: tuple[int, int, int, int]


_SPECS: dict[str, _NetworkSpec] = {
    "radimagenet_resnet50": _NetworkSpec("2D RadImageNet ResNet-50", 2, 3, "bottleneck", (3, 4, 6, 3)),
    "medicalnet_resnet10": _NetworkSpec("3D MedicalNet ResNet-10", 3, 1, "basic", (1, 1, 1, 1)),
    "medicalnet_resnet50": _NetworkSpec("3D MedicalNet ResNet-50", 3, 1, "bottleneck", (3, 4, 6, 3)),
}
_ALIASES = {
    "medicalnet_resnet10_23datasets": "medicalnet_resnet10",
    "medicalnet_resnet50_23datasets": "medicalnet_resnet50",
}
#: Public list of accepted names (canonical first).
NETWORK_TYPES: tuple[str, ...] = tuple(_SPECS) + tuple(_ALIASES)


def canonical_network_type(network_type: str) -> str:
    """Map ``network_type`` (case-insensitive, MONAI aliases allowed) to a key of the supported set."""
    name = str(network_type).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in _SPECS:
        raise BundleInputError(
            f"perceptual network type {network_type!r} is not supported; use one of {', '.join(NETWORK_TYPES)}"
        )
    return name


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------


class _KerasBottleneck(ResNetBottleneck):
    """Bottleneck of Keras' ResNet50 v1 (RadImageNet): stride on the first 1x1 conv, biased convs."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 2,
        stride: int = 1,
        downsample: nn.Module | None = None,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__(in_planes, planes, spatial_dims, 1, downsample, act, norm)
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv1 = conv(in_planes, planes, kernel_size=1, stride=stride, bias=True)
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1, bias=True)
        self.conv3 = conv(planes, planes * self.expansion, kernel_size=1, bias=True)
        self.stride = stride


def _dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Give a ResNet stage MedicalNet's geometry: stride 1, 3x3x3 convs dilated by ``dilation``."""
    for module in stage.modules():
        if isinstance(module, nn.Conv3d):
            module.stride = (1, 1, 1)
            if module.kernel_size == (3, 3, 3):
                module.dilation = (dilation,) * 3
                module.padding = (dilation,) * 3


def _build_radimagenet(layout: str) -> ResNet:
    keras = layout == "keras"
    net = ResNet(
        block=_KerasBottleneck if keras else "bottleneck",
        layers=[3, 4, 6, 3],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,  # torchvision/Keras stem; MONAI's default stride is 1
        shortcut_type="B",
        bias_downsample=keras,
        feed_forward=False,
    )
    if keras:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=True)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 1.001e-5  # Keras' BatchNormalization epsilon in ResNet50
    return net


def _build_medicalnet(spec: _NetworkSpec) -> ResNet:
    net = ResNet(
        block=spec.block,
        layers=list(spec.layers),
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )
    _dilate_stage(net.layer3, 2)
    _dilate_stage(net.layer4, 4)
    return net


def build_feature_network(network_type: str, layout: str = "torchvision") -> ResNet:
    """A randomly initialised MONAI ``ResNet`` with the architecture of ``network_type``, no head.

    ``layout`` ("torchvision" or "keras") only matters for ``radimagenet_resnet50``.
    """
    name = canonical_network_type(network_type)
    if layout not in ("torchvision", "keras"):
        raise ValueError(f"layout must be 'torchvision' or 'keras', got {layout!r}")
    if name == "radimagenet_resnet50":
        return _build_radimagenet(layout)
    return _build_medicalnet(_SPECS[name])


# ----------------------------------------------------------------------------------------------
# Reading and checking a state dict
# ----------------------------------------------------------------------------------------------


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """Return the state dict inside a checkpoint (plain, or under ``state_dict`` / ``model``)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        return obj
    raise BundleInputError(
        f"{path}: holds a {type(obj).__name__}, not a state dict (expected a dict of tensors, "
        f"optionally under 'state_dict' or 'model'); {_WEIGHTS_HINT}"
    )


def _strip_prefix(key: str) -> str:
    # DataParallel checkpoints (MedicalNet) prefix every key with "module."
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def read_state_dict(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local weights file safely and return a clean state dict.

    ``torch.load(..., weights_only=True)`` so a weights file cannot execute code; ``module.``
    prefixes are stripped and head keys (``fc.*``, ``conv_seg.*``) dropped.

    Raises:
        BundleInputError: file missing, unreadable by ``torch.load(weights_only=True)`` or not
            holding a dict of tensors.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise BundleInputError(f"perceptual weights file not found: {path}; {_WEIGHTS_HINT}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and OS errors all mean "not a usable weights file"
        reason = " ".join(str(err).split())[:200]
        raise BundleInputError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({type(err).__name__}: {reason}); "
            f"{_WEIGHTS_HINT}"
        ) from err
    raw = _unwrap(obj, path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BundleInputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor - this is not a state dict; "
                f"{_WEIGHTS_HINT}"
            )
        key = _strip_prefix(key)
        if not key.startswith(_HEAD_PREFIXES):
            state[key] = value
    if not state:
        raise BundleInputError(f"{path}: holds no network weights; {_WEIGHTS_HINT}")
    return state


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _mismatch_report(net: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Describe missing / unexpected / wrongly shaped keys; empty when ``state`` fits ``net``."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch (file vs expected) {_listed(shapes)}")
    return "; ".join(parts)


def _fill_batchnorm_counters(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add BatchNorm ``num_batches_tracked`` counters a file lacks (older PyTorch checkpoints).

    They only matter when training BatchNorm with ``momentum=None``; a frozen extractor never reads them.
    """
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    return state


def _radimagenet_layout(state: Mapping[str, torch.Tensor]) -> str:
    # Only the Keras conversion has conv biases; the stem conv is the cheapest tell.
    return "keras" if "conv1.bias" in state else "torchvision"


def load_feature_network(network_type: str, weights_path: str | Path) -> ResNet:
    """Build ``network_type`` and load ``weights_path`` into it strictly; returns it frozen, in eval mode.

    Raises:
        BundleInputError: see :func:`read_state_dict`, or the weights do not fit the architecture
            (the message lists a few missing / unexpected / mis-shaped keys).
    """
    name = canonical_network_type(network_type)
    state = read_state_dict(weights_path)
    layout = _radimagenet_layout(state) if name == "radimagenet_resnet50" else "torchvision"
    net = build_feature_network(name, layout)
    state = _fill_batchnorm_counters(net, state)
    report = _mismatch_report(net, state)
    if report:
        raise BundleInputError(
            f"{Path(weights_path).expanduser()}: weights do not fit the expected {_SPECS[name].description} "
            f"(network_type {name!r}): {report}"
        )
    net.load_state_dict(state, strict=True)  # also guards anything the report above missed
    return _freeze(net)


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """A frozen feature network plus the input normalisation it was trained with.

    ``forward(x)`` returns the feature maps after the requested stages (``layer1`` .. ``layer4``);
    :meth:`pooled` returns globally average-pooled ``layer4`` features (for FID-style statistics).

    Input: ``(B, C, H, W)`` for the 2D network, ``(B, C, H, W, D)`` for MedicalNet.

    * RadImageNet expects intensities in [0, 1]; a 1-channel input is replicated to 3 channels,
      channels reordered RGB -> BGR and the BGR ImageNet means subtracted (MONAI's
      ``RadImageNetPerceptualSimilarity``). A 3-channel input is treated as RGB.
    * MedicalNet expects 1 channel; each sample is z-scored over its whole volume (MedicalNet's
      ``brains18`` preprocessing, as MONAI's ``medicalnet_intensity_normalisation``; MONAI uses
      one mean/std for the whole batch, here it is per sample so features do not depend on what
      else is in the batch - identical for batch size 1).

    The network stays in eval mode even when a parent module is put in training mode.
    """

    def __init__(self, network_type: str, network: ResNet) -> None:
        super().__init__()
        self.network_type = canonical_network_type(network_type)
        spec = _SPECS[self.network_type]
        self.spatial_dims = spec.spatial_dims
        self.in_channels = spec.in_channels
        self.network = _freeze(network)
        bgr_mean = torch.tensor(_RADIMAGENET_BGR_MEAN).view(1, 3, 1, 1)
        self.register_buffer("bgr_mean", bgr_mean, persistent=False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # BatchNorm must keep its pretrained running statistics.
        super().train(False)
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network's input normalisation (see the class docstring)."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{self.network_type} expects a {self.spatial_dims + 2}D tensor (B, C, spatial...), got shape "
                f"{tuple(x.shape)}"
            )
        x = x.float()
        if self.network_type == "radimagenet_resnet50":
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[1] != 3:
                raise ValueError(f"{self.network_type} expects 1 or 3 channels, got {x.shape[1]}")
            return x[:, [2, 1, 0]] - self.bgr_mean.to(x.device)
        if x.shape[1] != 1:
            raise ValueError(f"{self.network_type} expects 1 channel, got {x.shape[1]}")
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        return (x - mean) / (std + 1e-8)  # eps: a constant volume would otherwise give NaNs

    def forward(
        self, x: torch.Tensor, stages: Sequence[int] = ALL_STAGES, normalise: bool = True
    ) -> list[torch.Tensor]:
        """Feature maps after each stage in ``stages`` (1 = ``layer1`` ... 4 = ``layer4``), in that order."""
        wanted = sorted(set(stages))
        if not wanted or any(s not in ALL_STAGES for s in wanted):
            raise ValueError(f"stages must be a non-empty subset of {ALL_STAGES}, got {tuple(stages)}")
        net = self.network
        h = self.normalise(x) if normalise else x
        h = net.act(net.bn1(net.conv1(h)))
        if not net.no_max_pool:
            h = net.maxpool(h)
        out: dict[int, torch.Tensor] = {}
        for index, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
            h = layer(h)
            if index in wanted:
                out[index] = h
            if index == wanted[-1]:
                break  # later stages are not needed
        return [out[s] for s in stages]

    def pooled(self, x: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """Globally average-pooled ``layer4`` features, shape ``(B, 2048)`` (ResNet-50) or ``(B, 512)``."""
        (h,) = self.forward(x, stages=(4,), normalise=normalise)
        return h.flatten(2).mean(dim=2)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the ``layer1`` .. ``layer4`` outputs."""
        expansion = 4 if _SPECS[self.network_type].block == "bottleneck" else 1
        return tuple(c * expansion for c in (64, 128, 256, 512))

    @property
    def downsampling(self) -> tuple[int, ...]:
        """Spatial reduction factor of each stage's output relative to the input."""
        if self.spatial_dims == 2:
            return (4, 8, 16, 32)
        return (4, 8, 8, 8)  # MedicalNet: dilated, not strided, layer3/layer4

    def extra_repr(self) -> str:
        return f"network_type={self.network_type!r}, spatial_dims={self.spatial_dims}"


def load_feature_extractor(network_type: str, weights_path: str | Path) -> FeatureExtractor:
    """:func:`load_feature_network` wrapped with its input normalisation; see :class:`FeatureExtractor`."""
    return FeatureExtractor(network_type, load_feature_network(network_type, weights_path))
