# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Perceptual loss and feature networks, loaded offline from local weight files.

The weight files are randomly initialised networks saved in the layouts real checkpoints use
(torchvision / Keras-converted RadImageNet, DataParallel-wrapped MedicalNet), so the real loading
path runs. MONAI parity is checked by handing MONAI's own ``PerceptualLoss`` the same network in
place of its ``torch.hub`` download.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ResNet

from scripts.core.errors import BundleInputError
from scripts.networks.feature_networks import (
    FeatureExtractor,
    build_feature_network,
    load_feature_extractor,
    load_feature_network,
)
from scripts.networks.perceptual import DISABLED_NOTICE, PerceptualLoss3D, build_perceptual_loss

SIZE = 16  # volume edge; small keeps the whole file well under a minute on 2 cores
RATIO = 0.25  # share of slices per axis for the 2.5D loss in these tests

#: (fixture key, network_type) for every supported network and file layout.
KINDS = [
    ("radimagenet_torchvision", "radimagenet_resnet50"),
    ("radimagenet_keras", "radimagenet_resnet50"),
    ("medicalnet_resnet10", "medicalnet_resnet10"),
    ("medicalnet_resnet50", "medicalnet_resnet50"),
]


def _torchvision_resnet50_state() -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet-50 state dict, classification head included."""
    net = ResNet(
        block="bottleneck",
        layers=[3, 4, 6, 3],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_stride=2,
        bias_downsample=False,
        num_classes=1000,
    )
    return net.state_dict()


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("perceptual_weights")
    files = {}

    state = _torchvision_resnet50_state()
    assert len(state) == 320 and "fc.weight" in state  # torchvision ResNet-50's key count
    files["radimagenet_torchvision"] = root / "radimagenet_tv.pt"
    torch.save(state, files["radimagenet_torchvision"])

    files["radimagenet_keras"] = root / "RadImageNet-ResNet50_notop.pth"
    torch.save(build_feature_network("radimagenet_resnet50", layout="keras").state_dict(), files["radimagenet_keras"])

    for depth in (10, 50):
        name = f"medicalnet_resnet{depth}"
        state = build_feature_network(name).state_dict()
        files[name] = root / f"resnet_{depth}_23dataset.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, files[name])
    return files


@pytest.fixture(scope="session")
def losses(weight_files) -> dict[str, PerceptualLoss3D]:
    return {key: PerceptualLoss3D(net, weight_files[key], fake_3d_ratio=RATIO) for key, net in KINDS}


def _volume(seed: int = 0) -> torch.Tensor:
    """A smooth [0, 1] test volume with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 4, 4, 4, generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=(SIZE,) * 3, mode="trilinear", align_corners=False)
    return (0.8 * vol + 0.2 * torch.rand(1, 1, SIZE, SIZE, SIZE, generator=g)).clamp(0, 1)


def _loss(loss_fn: PerceptualLoss3D, x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)  # the same slices for every call
    return loss_fn(x, y)


@pytest.mark.parametrize("key", [k for k, _ in KINDS])
@pytest.mark.slow
def test_identical_inputs_give_zero(losses, key):
    x = _volume()
    assert abs(_loss(losses[key], x, x.clone()).item()) < 1e-6


# the Keras layout runs the same code; its network is checked by the MONAI parity test
@pytest.mark.parametrize("key", ["radimagenet_torchvision", "medicalnet_resnet10", "medicalnet_resnet50"])
def test_loss_grows_with_noise_and_reaches_the_input(losses, key):
    x = _volume()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    values = [_loss(losses[key], x + s * noise, x).item() for s in (0.02, 0.1, 0.4)]
    assert 0 < values[0] < values[1] < values[2], values

    fake = (x + 0.1 * noise).requires_grad_(True)
    _loss(losses[key], fake, x).backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0


def test_gradient_is_finite_when_input_equals_target(losses):
    # LPIPS' normalisation divides by the feature norm; eps inside the sqrt keeps this finite
    x = _volume()
    fake = x.clone().requires_grad_(True)
    _loss(losses["radimagenet_torchvision"], fake, x).backward()
    assert torch.isfinite(fake.grad).all()


def test_frozen_network_stays_in_eval_mode(losses):
    loss_fn = losses["medicalnet_resnet10"]
    net = loss_fn.extractor.network
    before = net.bn1.running_mean.clone()
    loss_fn.train()
    _loss(loss_fn, _volume(1), _volume(2))
    assert not net.training and not net.bn1.training
    assert torch.equal(before, net.bn1.running_mean)
    assert not any(p.requires_grad for p in loss_fn.parameters())


def test_weight_scales_the_loss(losses, monkeypatch):
    loss_fn = losses["radimagenet_keras"]
    x, y = _volume(1), _volume(2)
    one = _loss(loss_fn, x, y)
    monkeypatch.setattr(loss_fn, "weight", 3.0)
    assert torch.allclose(_loss(loss_fn, x, y), 3 * one, rtol=1e-5)


class _HubStandIn(torch.nn.Module):
    """What MONAI's torch.hub download returns: the network's ``layer4`` output of a prepared input."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x, stages=(4,), normalise=False)[0]


@pytest.mark.parametrize(
    "key, monai_name, fake_3d",
    [
        ("radimagenet_keras", "radimagenet_resnet50", True),
        ("medicalnet_resnet10", "medicalnet_resnet10_23datasets", False),
    ],
)
def test_matches_monai_perceptual_loss_on_the_last_stage(weight_files, monkeypatch, key, monai_name, fake_3d):
    from monai.losses import PerceptualLoss

    mine = PerceptualLoss3D(monai_name, weight_files[key], fake_3d_ratio=RATIO, stages=(4,))
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: _HubStandIn(mine.extractor))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI suggests channel_wise for MedicalNet
        reference = PerceptualLoss(spatial_dims=3, network_type=monai_name, is_fake_3d=fake_3d, fake_3d_ratio=RATIO)
    x, y = _volume(1), _volume(2)
    assert torch.allclose(_loss(mine, x, y, seed=3), _loss(reference, x, y, seed=3), rtol=1e-4, atol=1e-6)


def test_2_5d_uses_the_requested_share_of_slices(losses, monkeypatch):
    loss_fn = losses["radimagenet_keras"]
    assert loss_fn.is_fake_3d and loss_fn.fake_3d_ratio == 0.25
    seen: list[int] = []
    monkeypatch.setattr(loss_fn, "_distance", lambda a, b: seen.append(a.shape[0]) or torch.zeros(a.shape[0]))
    x = torch.rand(2, 1, 12, 8, 3)
    loss_fn(x, torch.rand_like(x))
    # MONAI's int(count * ratio), but never fewer than one slice
    assert seen == [int(2 * 12 * 0.25), int(2 * 8 * 0.25), 1]


def test_feature_maps_and_pooled_features(losses, weight_files):
    rad = losses["radimagenet_torchvision"].extractor
    maps = rad(torch.rand(2, 1, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2), (2, 2048, 1, 1)]
    assert rad.pooled(torch.rand(3, 1, 32, 32)).shape == (3, 2048)

    med = load_feature_extractor("medicalnet_resnet10", weight_files["medicalnet_resnet10"])
    maps = med(torch.rand(1, 1, 32, 32, 32))
    # MedicalNet keeps layer3/layer4 at 1/8 resolution (dilated, not strided)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 8, 8, 8), (1, 128, 4, 4, 4), (1, 256, 4, 4, 4), (1, 512, 4, 4, 4)]
    assert med.pooled(torch.rand(2, 1, 16, 16, 16)).shape == (2, 512)


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    # checkpoints written by older PyTorch have no num_batches_tracked buffers
    torch.manual_seed(0)
    state = build_feature_network("medicalnet_resnet10").state_dict()
    path = tmp_path / "old.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if "num_batches_tracked" not in k}}, path)
    net = load_feature_network("medicalnet_resnet10", path)
    assert torch.equal(net.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_wrong_architecture_is_reported(weight_files):
    path = weight_files["medicalnet_resnet10"]
    with pytest.raises(BundleInputError) as err:
        load_feature_network("medicalnet_resnet50", path)
    message = _assert_one_line_naming(err, path)
    assert "MedicalNet ResNet-50" in message and "missing keys" in message and "layer1.0.conv3.weight" in message


def test_3d_weights_for_the_2d_network_are_reported(weight_files):
    path = weight_files["medicalnet_resnet50"]
    with pytest.raises(BundleInputError) as err:
        PerceptualLoss3D("radimagenet_resnet50", path)
    message = _assert_one_line_naming(err, path)
    assert "shape mismatch" in message and "conv1.weight (64, 1, 7, 7, 7) vs (64, 3, 7, 7)" in message


def test_missing_file_says_how_to_fix_it(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(BundleInputError) as err:
        build_perceptual_loss(str(path), "radimagenet_resnet50", 0.3)
    message = _assert_one_line_naming(err, path)
    assert "not found" in message and "perceptual_weights" in message and "null" in message


def test_file_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(BundleInputError) as err:
        load_feature_network("medicalnet_resnet10", path)
    assert "torch.load" in _assert_one_line_naming(err, path)


def test_checkpoint_that_needs_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(BundleInputError) as err:
        load_feature_network("medicalnet_resnet10", path)
    assert "weights_only" in _assert_one_line_naming(err, path)


def test_dict_without_tensors_is_refused(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(BundleInputError) as err:
        load_feature_network("medicalnet_resnet10", path)
    assert "'epoch'" in _assert_one_line_naming(err, path)


def test_unknown_network_type():
    with pytest.raises(BundleInputError, match="vgg16"):
        build_feature_network("vgg16")


def test_no_weights_disables_the_loss_with_a_notice(caplog):
    with caplog.at_level(logging.INFO, logger="scripts.networks.perceptual"):
        assert build_perceptual_loss(None, "radimagenet_resnet50", 0.3) is None
        assert build_perceptual_loss("", "medicalnet_resnet10", 0.3) is None
    assert caplog.messages.count(DISABLED_NOTICE) == 2


def test_configured_weights_build_the_loss(weight_files):
    loss_fn = build_perceptual_loss(str(weight_files["medicalnet_resnet50"]), "medicalnet_resnet50", 0.5)
    assert isinstance(loss_fn, PerceptualLoss3D) and loss_fn.weight == 0.5 and not loss_fn.is_fake_3d
    with pytest.raises(BundleInputError):
        build_perceptual_loss(str(weight_files["medicalnet_resnet50"]), "medicalnet_resnet50", -1.0)
