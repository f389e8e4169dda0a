# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Baseline: the stage-2 latent diffusion model sampled alone, without label guidance.

``configs/generate_unconditional.yaml`` draws ``num_samples`` volumes with
``scripts.generation.sampler.LatentDiffusionSampler`` (no ControlNet) and writes them as
``sample_0000_image.nii.gz``, ... on the model grid (RAS, the configured spacing, centred on the
origin), with ``samples.json`` recording each file's seed. They have no label maps: the evaluation
measures their FID and diversity, not their mask fidelity. Seeds derive from the run seed and the
file name (``scripts.generation.inference.output_seed``), so asking for more samples adds files without
changing the first ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from scripts.core.errors import BundleInputError, require_finite
from scripts.core.outputs import staged_output
from scripts.data.pairs import pair_file_name
from scripts.generation.inference import output_seed

__all__ = ["model_grid_affine", "generate_unconditional"]


def model_grid_affine(spacing: Sequence[float], spatial_size: Sequence[int]) -> np.ndarray:
    """RAS affine of the model grid: voxel axes along x, y, z with ``spacing``, centred on the origin."""
    affine = np.diag([*[float(s) for s in spacing], 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(spatial_size, dtype=np.float64) - 1) * np.asarray(spacing, dtype=np.float64)
    return affine


def generate_unconditional(
    sampler: torch.nn.Module,
    num_samples: int,
    output_dir: str,
    spacing: Sequence[float],
    overwrite: bool = False,
    seed: int = 0,
    prefix: str = "sample",
    reference_latent_std: Sequence[float] | None = None,
) -> str:
    """Write ``num_samples`` unconditional images and ``samples.json`` to ``output_dir`` (atomically); returns it.

    ``samples.json`` also holds the per-channel std of the sampled (scaled) latents, pooled over the
    samples, and with ``reference_latent_std`` (the training latents' own, recorded by stage 2) their
    ratio to it: a UNet that fails at high noise samples latents several times too wide.
    """
    if int(num_samples) < 1:
        raise BundleInputError(f"config 'num_samples' must be at least 1, got {num_samples}")
    with staged_output(output_dir, overwrite, kind="set of unconditional samples") as staging:
        records, latents = [], []
        for k in tqdm(range(int(num_samples)), desc="sampling", unit="volume"):
            name = f"{prefix}_{k:04d}"
            case_seed = output_seed(seed, name, 0)
            torch.manual_seed(case_seed)  # DDPM's stochastic steps draw from the global generator
            with torch.no_grad():
                latent = sampler.sample_latents([case_seed])
                image = sampler.decode(latent)[0, 0].float().cpu().numpy()
            require_finite(image, f"unconditional sample {name}", "check --autoencoder_path and --diffusion_unet_path")
            latents.append(latent[0].float().cpu())
            affine = model_grid_affine(spacing, image.shape)
            nifti = nib.Nifti1Image(image.astype(np.float32), affine)
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, os.path.join(staging, pair_file_name(name, "image")))
            records.append({"image": pair_file_name(name, "image"), "seed": case_seed})
        spread = {
            "latent_channel_std": [round(float(v), 4) for v in torch.stack(latents).transpose(0, 1).flatten(1).std(1)]
        }
        if reference_latent_std is not None:
            spread["reference_latent_channel_std"] = [round(float(v), 4) for v in reference_latent_std]
            spread["latent_std_ratio"] = [
                round(s / r, 4) for s, r in zip(spread["latent_channel_std"], reference_latent_std, strict=False)
            ]
        with open(os.path.join(staging, "samples.json"), "w") as f:
            json.dump({"seed": int(seed), **spread, "samples": records}, f, indent=1)
    return os.path.abspath(output_dir)
