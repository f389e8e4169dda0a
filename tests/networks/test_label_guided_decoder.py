# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Label-guided decoding: a SPADE decoder on the plain autoencoder's latents, started from its decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_helpers import common_parser, write_autoencoder

from scripts.core.errors import BundleInputError
from scripts.data.labels import LabelContract
from scripts.generation.sampler import LatentDiffusionSampler
from scripts.models.autoencoder import (
    latent_space_sha256,
    load_autoencoder_weights,
    load_initial_autoencoder,
    warm_start_label_guided,
)
from scripts.networks.label_guided import build_autoencoder, is_label_guided
from scripts.networks.tiled_autoencoder import TiledAutoencoder

LABELS = {"background": 0, "liver": 1, "portal_vein": 2, "hepatic_vein": 3, "hcc": 4}


@pytest.fixture()
def plain_weights(tmp_path) -> Path:
    """A plain autoencoder whose GroupNorm scales and shifts are far from the identity, as trained ones are."""
    path = write_autoencoder(tmp_path / "ae.pt", seed=3)
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, value in checkpoint["autoencoder"].items():
        if name.startswith("decoder.") and ".norm" in name:
            value.add_(0.5 * torch.randn(value.shape, generator=generator))
    torch.save(checkpoint, path)
    return path


def _networks(plain_weights: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = common_parser().get_parsed_content("autoencoder_def", instantiate=True).eval()
    plain.load_state_dict(torch.load(plain_weights, weights_only=True)["autoencoder"])
    guided = common_parser(label_guided_decoder=True).get_parsed_content("autoencoder_def", instantiate=True)
    load_initial_autoencoder(guided, str(plain_weights))
    return plain, guided.eval()


def _modulate(guided: torch.nn.Module, heads: tuple[str, ...] = ("mlp_gamma", "mlp_beta")) -> None:
    """Give the label map a say: small random kernels in the named scale/shift heads, as after training."""
    with torch.no_grad():
        for name, parameter in guided.named_parameters():
            if any(f"{head}.conv.weight" in name for head in heads):
                parameter.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))


def _label_map(seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, len(LABELS), (1, 1, size, size, size), generator=torch.Generator().manual_seed(seed))


def _one_hot(label: torch.Tensor) -> torch.Tensor:
    return LabelContract(LABELS).one_hot(label).float()


def test_warm_start_decodes_exactly_as_the_plain_autoencoder_for_any_label_map(plain_weights):
    plain, guided = _networks(plain_weights)
    assert is_label_guided(guided) and not is_label_guided(plain)
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain.reconstruct(image)
        for seed in (0, 1):
            torch.testing.assert_close(guided.reconstruct(image, _one_hot(_label_map(seed))), expected)
        torch.testing.assert_close(guided.encode(image)[0], plain.encode(image)[0], rtol=0, atol=0)
    # the label map's weights start at zero, the plain GroupNorm's scale and shift in the biases
    state = guided.state_dict()
    gamma = [k for k in state if k.endswith("mlp_gamma.conv.weight")]
    assert gamma and all(not state[k].any() for k in gamma)
    checkpoint = {"autoencoder": state}
    assert latent_space_sha256(checkpoint) == latent_space_sha256(torch.load(plain_weights, weights_only=True))


def test_trained_modulation_makes_the_image_follow_the_label_map(plain_weights):
    _, guided = _networks(plain_weights)
    _modulate(guided)
    with torch.no_grad():
        latent = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
        first = guided.decode(latent, _one_hot(_label_map(0)))
        second = guided.decode(latent, _one_hot(_label_map(1)))
    assert (first - second).abs().mean() > 1e-3


def test_scale_and_shift_heads_are_plain_convolutions(plain_weights):
    """MONAI's heads instance-normalise gamma/beta, which would erase a constant (GroupNorm) scale and shift."""
    _, guided = _networks(plain_weights)
    heads = [m for name, m in guided.named_modules() if name.endswith(("mlp_gamma", "mlp_beta"))]
    assert heads and all(isinstance(head.adn, torch.nn.Identity) for head in heads)


def test_a_plain_checkpoint_missing_encoder_weights_is_one_line(plain_weights, tmp_path):
    _, guided = _networks(plain_weights)
    state = torch.load(plain_weights, weights_only=True)["autoencoder"]
    broken = {k: v for k, v in state.items() if not k.startswith("encoder.blocks.0")}
    with pytest.raises(BundleInputError, match="does not fit the label-guided autoencoder's encoder"):
        warm_start_label_guided(guided, broken, "x.pt")


def test_tiled_decoding_gives_each_window_its_own_part_of_the_label_map(plain_weights):
    _, guided = _networks(plain_weights)
    _modulate(guided, ("mlp_gamma",))
    with torch.no_grad():
        latent = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(4))
        condition = _one_hot(_label_map(5))
        # without overlap each voxel comes from exactly one window: the window's own decode
        tiled = TiledAutoencoder(guided, latent_roi_size=(4, 8, 8), overlap=0.0).decode(latent, condition)
        for half in (0, 1):
            window = guided.decode(latent[:, :, 4 * half : 4 * half + 4], condition[:, :, 16 * half : 16 * half + 16])
            torch.testing.assert_close(tiled[:, :, 16 * half : 16 * half + 16], window, rtol=1e-5, atol=1e-5)
        whole = TiledAutoencoder(guided, latent_roi_size=(8, 8, 8)).decode(latent, condition)
        torch.testing.assert_close(whole, guided.decode(latent, condition))
    with pytest.raises(ValueError, match="decodes only with a label map"):
        TiledAutoencoder(guided).decode(latent)
    with pytest.raises(ValueError, match="does not fit latents"):
        TiledAutoencoder(guided).decode(latent, condition[:, :, :16])
    plain = common_parser().get_parsed_content("autoencoder_def", instantiate=True).eval()
    with pytest.raises(ValueError, match="not label-guided"):
        TiledAutoencoder(plain).decode(latent, condition)


def _decoding_sampler(guided: torch.nn.Module, **extra) -> LatentDiffusionSampler:
    """A sampler of scale 2 around ``guided``, for its ``decode`` alone."""
    return LatentDiffusionSampler(
        unet=torch.nn.Conv3d(4, 4, 1),  # decode() uses neither the UNet nor the scheduler
        scheduler=None,
        decoder=TiledAutoencoder(guided),
        scale_factor=2.0,
        num_inference_steps=1,
        latent_channels=4,
        compression=4,
        contract=LabelContract(LABELS),
        **extra,
    )


def test_sampler_decodes_with_the_mask_it_was_given(plain_weights):
    _, guided = _networks(plain_weights)
    _modulate(guided, ("mlp_beta",))
    sampler = _decoding_sampler(guided)
    latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(6))
    label = _label_map(7)
    with torch.no_grad():
        expected = guided.decode(latents / 2.0, _one_hot(label)).clamp(0, 1)
    torch.testing.assert_close(sampler.decode(latents, label), expected)
    with pytest.raises(ValueError, match="needs the label map"):
        sampler.decode(latents)


def test_sampler_adds_the_latent_shift_back_before_decoding(plain_weights):
    """A UNet trained on centred latents: its samples are unscaled, then shifted back, then decoded."""
    _, guided = _networks(plain_weights)
    shift = [0.8, -0.4, 0.0, 0.3]
    sampler = _decoding_sampler(guided, latent_shift=shift)
    latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(6))
    label = _label_map(7)
    with torch.no_grad():
        expected = guided.decode(latents / 2.0 + torch.tensor(shift).view(1, 4, 1, 1, 1), _one_hot(label))
        unshifted = guided.decode(latents / 2.0, _one_hot(label))
    decoded = sampler.decode(latents, label)
    torch.testing.assert_close(decoded, expected.clamp(0, 1))
    assert not torch.allclose(decoded, unshifted.clamp(0, 1), atol=1e-3)


# ---------------------------------------------------------------------------------------- refining decoder
TINY_AE = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    channels=[8, 16],
    latent_channels=2,
    num_res_blocks=1,
    attention_levels=[False, False],
    norm_num_groups=8,
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
    include_fc=False,
)


def test_a_refining_decoder_starts_as_the_label_guided_one_then_nearest_upsampling(tmp_path):
    """decoder_upsampling 1: the same latents, decoded onto a 2x finer grid; warm-started from a label-guided
    autoencoder it is that decoder with a nearest 2x upsampling before its final norm and output convolution,
    and a forward pass maps a fine image to a fine reconstruction."""
    from monai.networks.nets.spade_autoencoderkl import SPADEResBlock

    torch.manual_seed(0)
    source = build_autoencoder(True, 5, 8, **TINY_AE).eval()
    with torch.no_grad():  # decoder weights moved off their initialisation, so that a wrong mapping of blocks shows
        for name, value in source.named_parameters():
            if name.startswith("decoder."):
                value.add_(0.3 * torch.randn_like(value))
    path = tmp_path / "guided.pt"
    torch.save({"autoencoder": source.state_dict()}, path)
    refining = build_autoencoder(True, 5, 8, decoder_upsampling=1, **TINY_AE).eval()
    load_initial_autoencoder(refining, str(path))

    contract = LabelContract(LABELS)
    label = torch.randint(0, 5, (1, 1, 16, 16, 16))
    seg = contract.one_hot(label).float()
    fine_seg = torch.nn.functional.interpolate(seg, scale_factor=2, mode="nearest")
    fine_image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        # the latent space is kept: a fine image is read as its 2x2x2 means on the coarse grid
        latent = source.encode(torch.nn.functional.avg_pool3d(fine_image, 2))[0]
        torch.testing.assert_close(refining.encode(fine_image)[0], latent, rtol=0, atol=0)
        h = source.post_quant_conv(latent)
        for block in source.decoder.blocks[:-2]:
            h = block(h, seg) if isinstance(block, SPADEResBlock) else block(h)
        h = torch.nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        expected = source.decoder.blocks[-1](source.decoder.blocks[-2](h))
        decoded = refining.decode(latent, fine_seg)
    assert decoded.shape[2:] == (32, 32, 32)
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)
    assert refining(fine_image, fine_seg)[0].shape == fine_image.shape


def test_a_refining_decoder_needs_a_label_guided_decoder_and_start(tmp_path):
    with pytest.raises(BundleInputError, match="decoder_upsampling"):
        build_autoencoder(False, 5, 8, decoder_upsampling=1, **TINY_AE)
    plain = build_autoencoder(False, 5, 8, **TINY_AE)
    path = tmp_path / "plain.pt"
    torch.save({"autoencoder": plain.state_dict()}, path)
    with pytest.raises(BundleInputError, match="starts from a label-guided one"):
        load_initial_autoencoder(build_autoencoder(True, 5, 8, decoder_upsampling=1, **TINY_AE), str(path))


def test_trained_weights_of_the_other_decoder_grid_are_one_line_naming_decoder_upsampling(tmp_path):
    """A refining decoder's file with --decoder_upsampling 0, or a model-grid decoder's with 1, says which value
    to pass instead of listing mismatched weight names; matching files load."""
    guided, refining = (build_autoencoder(True, 5, 8, decoder_upsampling=k, **TINY_AE) for k in (0, 1))
    for name, network in (("guided.pt", guided), ("refining.pt", refining)):
        torch.save({"autoencoder": network.state_dict()}, tmp_path / name)
    with pytest.raises(BundleInputError, match="a refining decoder .* --decoder_upsampling is 0") as caught:
        load_autoencoder_weights(build_autoencoder(True, 5, 8, **TINY_AE), str(tmp_path / "refining.pt"))
    assert "\n" not in str(caught.value)
    with pytest.raises(BundleInputError, match="on the model grid, but --decoder_upsampling is 1; pass 0"):
        load_autoencoder_weights(
            build_autoencoder(True, 5, 8, decoder_upsampling=1, **TINY_AE), str(tmp_path / "guided.pt")
        )
    load_autoencoder_weights(
        build_autoencoder(True, 5, 8, decoder_upsampling=1, **TINY_AE), str(tmp_path / "refining.pt")
    )
    load_autoencoder_weights(build_autoencoder(True, 5, 8, **TINY_AE), str(tmp_path / "guided.pt"))
