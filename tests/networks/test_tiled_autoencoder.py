# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Tiled encode/decode: window placement, agreement with an untiled pass, shapes and errors.

Two kinds of network are used:

* a parameter-free toy autoencoder (4x average pooling / 4x nearest up-sampling) that is exactly
  local, so a tiled pass must equal the untiled one to float rounding: this checks that MONAI puts
  the 4x larger (or smaller) window outputs in the right place;
* the real ``autoencoder_def`` of configs/common.yaml, randomly initialised with a fixed seed.

Tolerances for the real network. Its tiled output cannot equal the untiled one: each window's
convolutions see zero padding where the volume has data (receptive field ~5-6 latent voxels, about
the 8-voxel overlap used here), and each ``GroupNorm`` normalises with its own window's statistics.
The second effect is a floor no overlap removes: the centre of a lone 16^3 window already differs
from the whole-volume decode by ~2.5 % of the output range. Measured max seam errors at overlap 0.5
over three seeds were 3.6-6.1 % of the output's dynamic range (decode) and 2.9-3.4 % of the latent's
range (encode). The limits below (8 % and 6 %) leave margin for that spread, yet a hard seam
(overlap 0, no blending) gives ~38 % and fails them, which the tests also check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser

import scripts.networks.tiled_autoencoder as tiled_module
from scripts.networks.tiled_autoencoder import TiledAutoencoder, gaussian_weight_map, seam_error

DECODE_MAX_REL_TOL = 0.08  # max |whole - tiled| / (max - min of whole), decode, overlap 0.5
DECODE_MEAN_REL_TOL = 0.01  # mean |whole - tiled| / range; measured 0.45-0.6 %
ENCODE_MAX_REL_TOL = 0.06  # same for the latent mean, encode, overlap 0.5


class ToyAutoencoder(torch.nn.Module):
    """Exactly local stand-in: encode = 4x average pooling, decode = 4x nearest up-sampling.

    ``encode`` returns a huge sigma, so any sampling instead of the mean would show. Every call's
    input shape is recorded.
    """

    def __init__(self, latent_channels: int = 4) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.calls: list[tuple[int, ...]] = []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(tuple(x.shape))
        scales = torch.arange(1, self.latent_channels + 1, dtype=x.dtype).view(1, -1, 1, 1, 1)
        z_mu = F.avg_pool3d(x, 4).repeat(1, self.latent_channels, 1, 1, 1) * scales
        return z_mu, torch.full_like(z_mu, 100.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(z.shape))
        return F.interpolate(z.sum(1, keepdim=True), scale_factor=4, mode="nearest")


@pytest.fixture(scope="module")
def autoencoder() -> torch.nn.Module:
    """``autoencoder_def`` from common.yaml, random weights from seed 0, eval mode."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "common.yaml"))
    torch.manual_seed(0)
    return parser.get_parsed_content("autoencoder_def").eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- window placement (toy)
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.6667, 0.75])
def test_toy_decode_places_upscaled_windows_exactly(overlap: float) -> None:
    toy = ToyAutoencoder()
    z = _randn(2, 4, 20, 13, 9, seed=1)  # sizes not multiples of the window
    tiled = TiledAutoencoder(toy, latent_roi_size=(8, 8, 8), overlap=overlap, sw_batch_size=3).decode(z)
    assert tiled.shape == (2, 1, 80, 52, 36)
    torch.testing.assert_close(tiled, toy.decode(z), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.6667, 0.75])
def test_toy_encode_places_downscaled_windows_exactly(overlap: float) -> None:
    toy = ToyAutoencoder()
    x = _randn(2, 1, 80, 52, 36, seed=2)
    tiled = TiledAutoencoder(toy, latent_roi_size=(8, 8, 8), overlap=overlap).encode(x)
    assert tiled.shape == (2, 4, 20, 13, 9)
    # the mean, not a sample (sigma is 100)
    torch.testing.assert_close(tiled, toy.encode(x)[0], rtol=1e-6, atol=1e-6)


def test_toy_windows_have_the_requested_size() -> None:
    toy = ToyAutoencoder()
    TiledAutoencoder(toy, latent_roi_size=(16, 16, 16), overlap=0.5).decode(_randn(1, 4, 24, 24, 16, seed=3))
    assert toy.calls == [(1, 4, 16, 16, 16)] * 4  # 2 x 2 x 1 windows
    toy.calls.clear()
    TiledAutoencoder(toy, latent_roi_size=(16, 16, 16), overlap=0.5).encode(_randn(1, 1, 96, 96, 64, seed=3))
    assert toy.calls == [(1, 1, 64, 64, 64)] * 4


# ---------------------------------------------------------------------- real autoencoder
@pytest.mark.slow
def test_tiled_decode_matches_whole_decode(autoencoder: torch.nn.Module) -> None:
    z = _randn(1, 4, 24, 24, 16, seed=10)
    with torch.no_grad():
        whole = autoencoder.decode(z)
    tiled = TiledAutoencoder(autoencoder, latent_roi_size=(16, 16, 16), overlap=0.5).decode(z)
    assert tiled.shape == (1, 1, 96, 96, 64) == whole.shape
    assert tiled.device.type == "cpu" and tiled.dtype == torch.float32
    err = seam_error(whole, tiled)
    print(f"decode seam error (overlap 0.5): {err}, max/range {err['max_abs'] / err['data_range']:.4f}")
    assert err["max_abs"] <= DECODE_MAX_REL_TOL * err["data_range"]
    assert err["mean_abs"] <= DECODE_MEAN_REL_TOL * err["data_range"]


@pytest.mark.slow
def test_larger_overlap_gives_smaller_seam_error(autoencoder: torch.nn.Module) -> None:
    z = _randn(1, 4, 32, 16, 16, seed=11)  # tiled along x only: windows 2 / 3 / 5
    with torch.no_grad():
        whole = autoencoder.decode(z)
    errors = {
        overlap: seam_error(whole, TiledAutoencoder(autoencoder, (16, 16, 16), overlap=overlap).decode(z))
        for overlap in (0.0, 0.5, 0.75)
    }
    for overlap, err in errors.items():
        print(f"overlap {overlap}: max {err['max_abs']:.4f} mean {err['mean_abs']:.5f} psnr {err['psnr']:.2f} dB")
    means = [errors[o]["mean_abs"] for o in (0.0, 0.5, 0.75)]
    assert means[0] > means[1] > means[2]
    # a hard seam is what the tolerance exists to catch; blending brings it under the limit
    assert errors[0.0]["max_abs"] > DECODE_MAX_REL_TOL * errors[0.0]["data_range"]
    assert errors[0.5]["max_abs"] <= DECODE_MAX_REL_TOL * errors[0.5]["data_range"]


def test_tiled_encode_matches_whole_encode_mean(autoencoder: torch.nn.Module) -> None:
    x = torch.rand(1, 1, 96, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        whole_mu, _ = autoencoder.encode(x)
    tiled = TiledAutoencoder(autoencoder, latent_roi_size=(16, 16, 16), overlap=0.5).encode(x)
    assert tiled.shape == (1, 4, 24, 16, 16) == whole_mu.shape
    assert tiled.device.type == "cpu" and tiled.dtype == torch.float32
    err = seam_error(whole_mu, tiled)
    print(f"encode seam error (overlap 0.5): {err}, max/range {err['max_abs'] / err['data_range']:.4f}")
    assert err["max_abs"] <= ENCODE_MAX_REL_TOL * err["data_range"]


def test_single_window_is_the_direct_call(autoencoder: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sliding_window(*args, **kwargs):
        raise AssertionError("a single window must not go through sliding_window_inference")

    monkeypatch.setattr(tiled_module, "sliding_window_inference", no_sliding_window)
    tiler = TiledAutoencoder(autoencoder, latent_roi_size=(16, 16, 16), amp=True)  # amp is ignored on the CPU
    z = _randn(1, 4, 16, 12, 8, seed=13)
    x = torch.rand(1, 1, 32, 48, 16, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        direct_image = autoencoder.decode(z)
        direct_mu, _ = autoencoder.encode(x)
    decoded, encoded = tiler.decode(z), tiler.encode(x)
    assert torch.equal(decoded, direct_image) and decoded.dtype == torch.float32
    assert torch.equal(encoded, direct_mu) and encoded.dtype == torch.float32


# ---------------------------------------------------------------------- errors and helpers
@pytest.mark.parametrize(
    "method, shape, message",
    [
        ("encode", (1, 1, 30, 32, 32), "divisible"),
        ("encode", (1, 1, 32, 32), "spatial"),
        ("decode", (1, 4, 0, 8, 8), "empty"),
        ("decode", (1, 4, 8, 8), "spatial"),
    ],
)
def test_bad_sizes_raise(method: str, shape: tuple[int, ...], message: str) -> None:
    tiler = TiledAutoencoder(ToyAutoencoder(), latent_roi_size=(8, 8, 8))
    with pytest.raises(ValueError, match=message):
        getattr(tiler, method)(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs",
    [{"overlap": 1.0}, {"overlap": -0.1}, {"latent_roi_size": (0, 8, 8)}, {"compression": 0}, {"sigma_scale": 0.0}],
)
def test_bad_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TiledAutoencoder(ToyAutoencoder(), **kwargs)


def test_image_roi_is_compression_times_latent_roi() -> None:
    assert TiledAutoencoder(ToyAutoencoder(), latent_roi_size=(16, 8, 12)).image_roi_size == (64, 32, 48)


def test_gaussian_weight_map_tails_are_not_clamped() -> None:
    weights = gaussian_weight_map((16, 16, 16))
    assert weights.shape == (16, 16, 16) and weights.dtype == torch.float32
    assert weights.max() == 1.0 and weights.min() > 0
    assert weights[0, 0, 0] < 1e-6  # MONAI's map would stop at 1e-3 here
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.permute(2, 0, 1))


def test_seam_error_values() -> None:
    whole = torch.zeros(1, 1, 4, 4, 4)
    whole[..., 0, 0, 0] = 2.0  # range 2
    assert seam_error(whole, whole.clone())["psnr"] == float("inf")
    tiled = whole.clone()
    tiled[..., 1, 1, 1] = 0.5  # one voxel off by 0.5: mse = 0.25 / 64
    err = seam_error(whole, tiled)
    assert err["max_abs"] == pytest.approx(0.5)
    assert err["mean_abs"] == pytest.approx(0.5 / 64)
    assert err["data_range"] == pytest.approx(2.0)
    assert err["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(4.0 / (0.25 / 64))).item())
    with pytest.raises(ValueError, match="shapes differ"):
        seam_error(whole, whole[..., :2])
