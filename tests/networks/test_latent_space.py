# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The latent space's identity: a new decoder keeps later stages valid, a new encoder does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_helpers import common_parser, write_autoencoder, write_unet

from scripts.core.checkpoints import weights_sha256
from scripts.core.errors import BundleInputError
from scripts.models.autoencoder import LATENT_SPACE_MODULES, check_latent_space, latent_space_sha256
from scripts.models.diffusion import load_diffusion_unet


def _perturbed(checkpoint: dict, prefix: str) -> dict:
    """A copy of ``checkpoint`` with every weight under ``prefix`` shifted."""
    state = {
        k: v + 0.01 if k.startswith(prefix) and v.is_floating_point() else v
        for k, v in checkpoint["autoencoder"].items()
    }
    return {**checkpoint, "autoencoder": state}


@pytest.fixture()
def autoencoder(tmp_path) -> Path:
    return write_autoencoder(tmp_path / "ae.pt")


def test_identity_covers_the_encoder_side_and_nothing_else(autoencoder):
    start = torch.load(autoencoder, weights_only=True)
    names = {k.split(".")[0] for k in start["autoencoder"]}
    assert set(LATENT_SPACE_MODULES) < names  # the module names match MONAI's AutoencoderKL
    assert latent_space_sha256(_perturbed(start, "decoder.")) == latent_space_sha256(start)
    assert latent_space_sha256(_perturbed(start, "post_quant_conv.")) == latent_space_sha256(start)
    for module in LATENT_SPACE_MODULES:
        assert latent_space_sha256(_perturbed(start, f"{module}.")) != latent_space_sha256(start), module


def test_encoded_latents_do_not_depend_on_the_decoder(autoencoder):
    network = common_parser().get_parsed_content("autoencoder_def", instantiate=True).eval()
    start = torch.load(autoencoder, weights_only=True)
    image = torch.rand(1, 1, 16, 16, 16)
    latents = []
    for checkpoint in (start, _perturbed(start, "decoder.")):
        network.load_state_dict(checkpoint["autoencoder"])
        with torch.no_grad():
            latents.append(network.encode(image)[0])
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=0)


def test_unet_follows_its_encoder_not_its_decoder(autoencoder, tmp_path):
    unet = common_parser().get_parsed_content("diffusion_unet_def", instantiate=True)
    path = write_unet(tmp_path / "unet.pt", autoencoder)
    start = torch.load(autoencoder, weights_only=True)
    load_diffusion_unet(unet, str(path), "ddpm", _perturbed(start, "decoder."))  # a fine-tuned decoder is welcome
    with pytest.raises(BundleInputError, match=f"{path}: diffusion UNet was trained on the latents of another"):
        load_diffusion_unet(unet, str(path), "ddpm", _perturbed(start, "encoder."))


def test_checkpoints_that_recorded_the_whole_autoencoder_are_still_checked(autoencoder):
    start = torch.load(autoencoder, weights_only=True)
    legacy = {"autoencoder_sha256": weights_sha256(start, "autoencoder")}
    check_latent_space(legacy, start, "old.pt", "diffusion UNet")
    with pytest.raises(BundleInputError, match="old.pt: diffusion UNet was trained on the latents of another"):
        check_latent_space(legacy, _perturbed(start, "decoder."), "old.pt", "diffusion UNet")
    check_latent_space({}, start, "older.pt", "diffusion UNet")  # nothing recorded: nothing to check
