# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Every config parses; every network and scheduler definition instantiates and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser

from scripts.core.settings import layered_config_files

CONFIGS = sorted(p for p in (BUNDLE_ROOT / "configs").glob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _layers(path: Path) -> list[str]:
    """The files a config is meant to be used with: common.yaml under it, an overlay on its base config."""
    if path.name == "multi_gpu.yaml":
        return layered_config_files(str(path.with_name("train_controlnet.yaml")), str(path))
    if path.name == "train_base.yaml":  # the skeleton the training configs fill in
        return layered_config_files(str(path.with_name("train_autoencoder.yaml")))
    if path.name == "hires.yaml":
        return layered_config_files(str(path.with_name("inference.yaml")), str(path))
    return layered_config_files(str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_resolves(path: Path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(_layers(path))
    if path.name == "metadata.json":
        assert parser["version"] in parser["changelog"]
        return
    parser.parse()
    # every "@" reference resolves; nothing is run or instantiated
    for key in parser.get():
        parser.get_parsed_content(key, instantiate=False, eval_expr=False)


def test_role_configs_declare_run_and_role(monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    for path in CONFIGS:
        if path.name in ("metadata.json", "common.yaml", "logging.conf", "hires.yaml"):
            continue
        parser = ConfigParser()
        parser.read_config(_layers(path))
        assert "run" in parser.get(), f"{path.name} has no 'run' entry point"
        roles = {"training", "inference", "evaluating", "generating", "checking"} & set(parser.get())
        assert roles, f"{path.name} declares no role entry point"


def test_networks_instantiate_and_run_forward(common_config):
    cfg = common_config
    num_classes = cfg.get_parsed_content("num_classes")
    latent_channels = cfg["latent_channels"]
    compression = cfg["autoencoder_compression"]
    with torch.no_grad():
        autoencoder = cfg.get_parsed_content("autoencoder_def", instantiate=True).eval()
        image = torch.rand(1, 1, 32, 32, 32)
        reconstruction, z_mu, z_sigma = autoencoder(image)
        assert reconstruction.shape == image.shape
        assert z_mu.shape == (1, latent_channels) + (32 // compression,) * 3

        discriminator = cfg.get_parsed_content("discriminator_def", instantiate=True).eval()
        logits = discriminator(image)[-1]
        assert logits.shape[1] == 1 and torch.isfinite(logits).all()

        unet = cfg.get_parsed_content("diffusion_unet_def", instantiate=True).eval()
        controlnet = cfg.get_parsed_content("controlnet_def", instantiate=True).eval()
        latent = torch.randn(2, latent_channels, 8, 8, 8)
        timesteps = torch.tensor([10, 500])
        assert unet(latent, timesteps).shape == latent.shape

        # the conditioning embedding takes the one-hot map at image resolution (4x the latent grid)
        label = torch.randint(0, num_classes, (2, 1, 8 * compression, 8 * compression, 8 * compression))
        condition = torch.nn.functional.one_hot(label[:, 0], num_classes).permute(0, 4, 1, 2, 3).float()
        down_residuals, mid_residual = controlnet(latent, timesteps, controlnet_cond=condition)
        guided = unet(
            latent,
            timesteps,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
        )
        assert guided.shape == latent.shape and torch.isfinite(guided).all()
        # ControlNet mirrors the UNet, so it can start from the UNet's weights
        missing = controlnet.load_state_dict(unet.state_dict(), strict=False).missing_keys
        assert all(k.startswith(("controlnet_", "controlnet_cond_embedding")) for k in missing)


@pytest.mark.parametrize("name", ["ddpm_scheduler_def", "ddim_scheduler_def", "rflow_scheduler_def"])
def test_schedulers_noise_and_step(common_config, name):
    scheduler = common_config.get_parsed_content(name, instantiate=True)
    latent = torch.randn(1, 4, 8, 8, 8)
    noise = torch.randn_like(latent)
    timesteps = torch.tensor([999])
    noisy = scheduler.add_noise(original_samples=latent, noise=noise, timesteps=timesteps)
    assert noisy.shape == latent.shape and not torch.equal(noisy, latent)
    if name == "rflow_scheduler_def":
        scheduler.set_timesteps(num_inference_steps=5, input_img_size_numel=8 * 8 * 8)
    else:
        scheduler.set_timesteps(num_inference_steps=5)
    t = scheduler.timesteps[0]
    step = scheduler.step(noise, t, noisy)
    assert step[0].shape == latent.shape and torch.isfinite(step[0]).all()


@pytest.mark.parametrize(
    "base", ["train_autoencoder.yaml", "train_diffusion.yaml", "train_controlnet.yaml", "inference.yaml"]
)
def test_hires_overlay_sets_the_paper_scale_grid_and_networks(base, monkeypatch):
    """Layered last on any stage, the overlay changes grid and network sizes consistently: the
    latent grid passes through every UNet level and the ControlNet still mirrors the UNet."""
    monkeypatch.chdir(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(
        layered_config_files(str(BUNDLE_ROOT / "configs" / base), str(BUNDLE_ROOT / "configs" / "hires.yaml"))
    )
    parser.parse()
    assert parser.get_parsed_content("spatial_size") == [256, 256, 128]
    compression = 2 ** (len(parser.get_parsed_content("autoencoder_def#channels")) - 1)
    latent = [s // compression for s in parser.get_parsed_content("spatial_size")]
    assert latent == [64, 64, 32] and latent == parser.get_parsed_content("latent_size", default=latent)
    levels = len(parser.get_parsed_content("diffusion_unet_def#channels"))
    assert all(s % 2 ** (levels - 1) == 0 for s in latent)
    if "controlnet_def" in parser.get():
        assert parser.get_parsed_content("controlnet_def#channels") == parser.get_parsed_content(
            "diffusion_unet_def#channels"
        )


def test_hires_overlay_edits_values_inside_the_shared_definitions():
    """The overlay changes sizes only: what it does not name (network type, latent channels, norm
    placement) stays as configs/common.yaml declares it, so the two cannot drift apart."""
    common = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "common.yaml"))
    overlay = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "hires.yaml"))
    assert not any(
        isinstance(v, dict) and "_target_" in v for v in overlay.values()
    ), "hires.yaml restates a definition"
    parser = ConfigParser()
    parser.read_config(layered_config_files(str(BUNDLE_ROOT / "configs" / "hires.yaml")))
    for name in ("autoencoder_def", "discriminator_def", "diffusion_unet_def"):
        layered, shared = parser[name], common[name]
        edited = {key.split("#", 1)[1] for key in overlay if key.startswith(name + "#")}
        assert edited, f"hires.yaml does not resize {name}"
        assert {k: v for k, v in layered.items() if k not in edited} == {
            k: v for k, v in shared.items() if k not in edited
        }
        assert all(layered[k] == overlay[f"{name}#{k}"] for k in edited)


def test_task_configs_do_not_copy_shared_keys():
    """Task configs layer on common.yaml instead of re-importing its keys with macros."""
    for path in CONFIGS:
        if path.suffix == ".yaml":
            assert "%configs/" not in path.read_text(), f"{path.name} pulls keys with a working-directory macro"
