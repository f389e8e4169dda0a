# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Helpers for the latent-diffusion tests (stages 2 and 3): tiny-grid overrides, weight files made
from seeded random networks, and in-process bundle runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BUNDLE_ROOT, COMMON, TINY_GRID
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.core.checkpoints import weights_sha256
from scripts.core.settings import layered_config_files
from scripts.data.labels import LABELS
from scripts.models.autoencoder import latent_space_sha256

#: The tiny model grid of the stage-1 tests (32^3 voxels, 8^3 latents), without the stage-1 patch size.
TINY = {k.lstrip("-"): eval(v) for k, v in zip(TINY_GRID[::2], TINY_GRID[1::2], strict=True) if k != "--patch_size"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run a test module on one thread.

    On 8^3 latents every operation is tiny, and synchronising a second thread costs more than the
    work; on a machine busy with other jobs it made a UNet step about 100x slower (5 s vs 0.05 s).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def common_parser(**overrides: Any) -> ConfigParser:
    """``configs/common.yaml`` on the tiny grid, with ``overrides`` set (key paths allowed)."""
    parser = ConfigParser()
    parser.read_config(str(COMMON))
    for key, value in {**TINY, "device": "$torch.device('cpu')", **overrides}.items():
        parser[key] = value
    return parser


def write_network(path: Path, definition: str, key: str, seed: int, trained_like: bool = False, **extra: Any) -> Path:
    """Save ``{key: state_dict, **extra}`` of a seeded random instance of a common.yaml network.

    ``trained_like`` replaces MONAI's zero-initialised layers with small random weights: a fresh
    DiffusionModelUNet's output convolution is zero, so its output would not depend on anything
    (ControlNet residuals included), which trained weights never do.
    """
    torch.manual_seed(seed)
    network = common_parser().get_parsed_content(definition, instantiate=True)
    if trained_like:
        with torch.no_grad():
            for parameter in network.parameters():
                if not parameter.any():
                    parameter.normal_(0.0, 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: network.state_dict(), **extra}, path)
    return path


def write_autoencoder(path: Path, seed: int = 0) -> Path:
    """Stage-1 weights: a seeded random autoencoder (encoding needs weights, not a trained model)."""
    return write_network(path, "autoencoder_def", "autoencoder", seed)


def write_unet(
    path: Path,
    autoencoder: Path,
    seed: int = 0,
    noise_schedule: str = "ddpm",
    scale_factor: float = 1.7,
    prediction_type: str = "v_prediction",
    latent_shift: list[float] | None = None,
) -> Path:
    """Stage-2 weights as ``train_diffusion.yaml`` saves them, from a seeded random UNet
    (``latent_shift``: trained on centred latents; ``None``: saved as before 0.13.0, without one)."""
    centring = {} if latent_shift is None else {"latent_shift": list(latent_shift)}
    return write_network(
        path,
        "diffusion_unet_def",
        "diffusion_unet",
        seed,
        trained_like=True,
        scale_factor=scale_factor,
        noise_schedule=noise_schedule,
        prediction_type=prediction_type,
        latent_space_sha256=latent_space_sha256(torch.load(autoencoder, weights_only=True)),
        **centring,
    )


def overrides(dataset: Path, output: Path, **extra: Any) -> dict[str, Any]:
    """Tiny-grid, short-validation overrides of a stage-2/3 training config."""
    return {
        "dataset_dir": str(dataset),
        "output_dir": str(output),
        "val_interval": 1,
        "num_inference_steps": 2,
        **TINY,
        **extra,
    }


def cli(config: str | list[str], dataset: Path, output: Path, **extra: Any) -> list[str]:
    """``python -m monai.bundle run`` arguments for the same overrides."""
    files = layered_config_files(*([config] if isinstance(config, str) else config))
    args = ["training", "--config_file", str(files)]
    for key, value in overrides(dataset, output, **extra).items():
        args += [f"--{key}", str(value)]
    return args


def workflow(config: str, **settings: Any) -> ConfigWorkflow:
    """A training workflow of ``config`` (layered on configs/common.yaml) with ``settings`` overridden, not yet initialised.

    Config paths are relative to the bundle root: callers chdir there.
    """
    assert Path(os.getcwd()).resolve() == BUNDLE_ROOT, "run bundle workflows from the bundle root"
    return ConfigWorkflow(config_file=layered_config_files(config), workflow_type="train", **settings)


#: configs/inference.yaml and the layers under it
INFERENCE_CONFIG = layered_config_files("configs/inference.yaml")


def write_controlnet(path: Path, unet: Path, seed: int = 0) -> Path:
    unet_checkpoint = torch.load(unet, weights_only=True)
    return write_network(
        path,
        "controlnet_def",
        "controlnet",
        seed,
        trained_like=True,
        noise_schedule=unet_checkpoint["noise_schedule"],
        labels=LABELS,
        diffusion_unet_sha256=weights_sha256(unet_checkpoint, "diffusion_unet"),
    )


def build_weights(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Tiny seeded-random weights for both schedules, recorded as the training configs record them."""
    root = tmp_path_factory.mktemp("weights")
    autoencoder = write_autoencoder(root / "autoencoder.pt")
    found = {}
    for schedule in ("ddpm", "rflow"):
        unet = write_unet(root / f"unet_{schedule}.pt", autoencoder, noise_schedule=schedule)
        controlnet = write_controlnet(root / f"controlnet_{schedule}.pt", unet)
        guide = write_unet(root / f"guide_{schedule}.pt", autoencoder, seed=1, noise_schedule=schedule)
        found[schedule] = {
            "autoencoder_path": str(autoencoder),
            "diffusion_unet_path": str(unet),
            "controlnet_path": str(controlnet),
            "autoguidance_unet_path": str(guide),  # every run guides (configs/inference.yaml: weight 2)
            "label_guided_decoder": False,  # a plain autoencoder (configs/inference.yaml ships a label-guided one)
            "decoder_upsampling": 0,  # decoding on the model grid (the shipped one refines it)
        }
    return found


def inference_workflow(output: Path, weights: dict[str, str], **settings_given) -> ConfigWorkflow:
    """configs/inference.yaml on the tiny grid, initialized in this process (run it with ``.run()``)."""
    assert Path(os.getcwd()).resolve() == BUNDLE_ROOT
    # the tiny test autoencoders decode on the model grid (the shipped default is the refining decoder)
    settings = {"device": "$torch.device('cpu')", "num_inference_steps": 3, "decoder_upsampling": 0, **TINY}
    settings = {**settings, **weights, **settings_given}
    workflow = ConfigWorkflow(
        config_file=INFERENCE_CONFIG, workflow_type="infer", run_id="inference", output_dir=str(output), **settings
    )
    workflow.initialize()
    return workflow


def infer(output: Path, weights: dict[str, str], **settings) -> Path:
    """Run configs/inference.yaml in this process on the tiny grid; returns the output folder."""
    inference_workflow(output, weights, **settings).run()
    return output
