# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Inference, the bundle's main job: label maps in, paired MR volumes out.

For every input mask ``X.nii.gz`` the pipeline

1. reads it and applies the label contract (checks, ``label_map`` remapping);
2. optionally edits it (``scripts.data.masks.MaskEditor``: new layouts, not only re-renderings);
3. brings a copy onto the model grid with MONAI transforms (RAS, model spacing, crop/pad);
4. samples a latent guided by the ControlNet and decodes it (``scripts.generation.sampler``), on the model
   grid or, with a refining decoder (``decoder_upsampling``), on the finer grid aligned with it;
5. judges the volume as decoded against its mask (``scripts.generation.quality_gate``), sampling again
   with a new seed while it fails, up to the gate's ``max_tries``;
6. resamples the kept image onto the input mask's own grid (``ResampleToMatch``), adds acquisition noise
   there (``scripts.generation.acquisition_noise``, drawn from the output's seed) and writes
   ``X_image.nii.gz`` beside ``X_label.nii.gz``, the (remapped, edited) mask with the input's
   voxels, shape, affine and header, so the two always lie on the same grid.

Masks come from ``scripts.generation.mask_sources``. Every mask is checked before anything is generated
(its header: a 3D grid, real-valued voxels, a usable affine, and the memory it will need; then its voxels
against the label contract): one bad mask stops the command at once with one line naming it, before any
output exists (finding a bad file after hours of sampling would waste them, and a partial set of pairs is
easy to mistake for a whole one). Outputs go to a staging folder that replaces ``output_dir`` only when every pair is
written.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, Orientation, ResampleToMatch, ResizeWithPadOrCrop, Spacing, SpatialResample
from tqdm import tqdm

from scripts.core.errors import BundleInputError, require_finite
from scripts.core.memory import available_memory, format_bytes
from scripts.core.outputs import staged_output
from scripts.core.settings import as_bool, as_optional
from scripts.data.cases import load_nifti_header, read_nifti
from scripts.data.labels import LabelContract
from scripts.data.pairs import ROLES, pair_file_name, write_pairs_manifest
from scripts.generation.acquisition_noise import AcquisitionNoise
from scripts.generation.preview import save_pair_preview
from scripts.generation.quality_gate import HBPQualityGate

__all__ = [
    "on_refined_grid",
    "output_seed",
    "output_prefix",
    "MaskToImage",
    "CheckedMask",
    "check_masks",
    "generate_pairs",
]

logger = logging.getLogger(__name__)


def refinement(factor: int) -> torch.Tensor:
    """Voxel-to-voxel affine from a grid ``factor`` times finer to the coarse one, each coarse voxel split around its
    centre: coarse index = (fine index + 1/2) / factor - 1/2. A nearest upsampling of a coarse volume lands on it, as
    a refining decoder's output does (and its 2x2x2 means give back the coarse grid its encoder reads)."""
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] /= factor
    matrix[:3, 3] = (1.0 / factor - 1.0) / 2.0
    return matrix


def on_refined_grid(on_mask_grid: MetaTensor, on_model_grid: MetaTensor, factor: int) -> MetaTensor:
    """A label map on its own grid (``on_mask_grid``) resampled (nearest) onto the grid ``factor`` times finer than
    the model grid of ``on_model_grid`` (:func:`refinement`): the grid a refining decoder paints on. Taken from the
    mask as given, once, not from its model-grid copy, which would keep its blocks."""
    fine_affine = torch.as_tensor(on_model_grid.affine, dtype=torch.float64) @ refinement(factor)
    fine_size = [factor * int(s) for s in on_model_grid.shape[1:]]
    return SpatialResample(mode="nearest", padding_mode="zeros")(
        on_mask_grid, dst_affine=fine_affine, spatial_size=fine_size
    )


def output_seed(seed: int, name: str, sample: int, attempt: int = 0) -> int:
    """The seed of one output: a function of the run seed, the mask's name, the sample index and,
    for a volume regenerated after failing the quality gate, the attempt.

    Derived from the name rather than the position, so adding a mask to a folder changes no other
    output.
    """
    entropy = [int(seed), zlib.crc32(name.encode()), int(sample)] + ([int(attempt)] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def output_prefix(name: str, sample: int, num_samples: int) -> str:
    """``X`` for one sample per mask, ``X_s{k}`` for several."""
    return name if num_samples == 1 else f"{name}_s{sample}"


#: Memory needed for one mask, measured: peak RSS above what the command held after loading the
#: networks, sampled phase by phase (and /usr/bin/time -v for the whole command), shipped demo
#: weights, default 64^3 model grid at 5 x 5 x 4 mm, CPU, uint8 masks of 1.5 mm voxels:
#:   150 x 150 x 100 (2.25 M voxels)    251 MiB
#:   300 x 300 x 200 (18 M voxels)     1227 MiB (int16 1246, float64 1272, quality-gate retry and
#:                                     preview 1219, with mask editing 1391)
#:   400 x 400 x 260 (41.6 M voxels)   2512 MiB
#:   600 x 600 x 400 (144 M, 0.75 mm)  8514 MiB (maximum resident set size of the whole command
#:                                     9,208,940 kB by /usr/bin/time -v)
#: The model grid stays at spatial_size and reading a uint8 mask takes 2 bytes per voxel: in every
#: case the peak is ResampleToMatch bringing the generated image back onto the mask's own grid
#: (its sampling grid and float32 output at the mask's size, about 62 bytes per mask voxel).
#: Bytes per mask voxel, plus the voxel's own size as read:
_MASK_GRID_BYTES_PER_VOXEL = 63
#: Extra bytes per mask voxel with mask editing (the edited copy, int64 while edited).
_EDITING_BYTES_PER_VOXEL = 10
#: Bytes per voxel of the mask resampled to the model spacing, before the crop to spatial_size: that
#: grid is large only for masks with coarser voxels than the model's (a 100 x 100 x 60 mask of 10 mm
#: voxels gives 200 x 200 x 150 voxels at 5 x 5 x 4 mm: 325 MiB, 57 bytes per voxel).
_RESAMPLED_BYTES_PER_VOXEL = 60
#: Sampling, decoding and allocator slack, independent of the mask (120 to 250 MiB measured; 230 MiB
#: above the mask-sized terms in one full test-suite run, where earlier tests had shaped the heap):
#: the top of that range, so the estimate bounds the peak.
_FIXED_BYTES = 256 * 2**20
#: Bytes per voxel of a refining decoder's output grid (``decoder_upsampling``), on top of the fixed part: its top
#: levels run on that grid (measured: 1.26 GB above the loaded networks decoding one 128^3 volume on the CPU, about
#: 600 bytes per voxel, demo networks with decoder_upsampling 1).
_REFINED_DECODE_BYTES_PER_VOXEL = 640
#: A mask that needs more than this share of the available memory gets a warning.
_MEMORY_WARNING_SHARE = 0.5


class MaskToImage:
    """One input mask -> (image, label) on the mask's own grid.

    Args:
        sampler: guided ``scripts.generation.sampler.LatentDiffusionSampler`` (mask on the model grid -> image).
        contract: the label contract (checks and remapping of input ids).
        spacing: model-grid spacing (mm, RAS).
        spatial_size: model-grid size (voxels).
        editor: optional ``scripts.data.masks.MaskEditor`` applied on the input grid before generation.
        output_range: the [0, 1] model intensities are mapped linearly onto it (None: keep [0, 1]).
        memory_check: refuse, before anything is generated, a mask whose estimated peak memory
            (:meth:`memory_estimate`) exceeds the available memory; warn above half of it.
        decoder_upsampling: levels the decoder adds above the model grid (``configs/common.yaml``): the image
            comes out on the ``2**k`` times finer grid aligned with the model grid, which the decoder's label
            map is resampled onto, from the mask as given.
        noise: acquisition noise added on the mask's grid, drawn from each output's seed
            (``scripts.generation.acquisition_noise``; None: the decoded image as it is).
    """

    def __init__(
        self,
        sampler: torch.nn.Module,
        contract: LabelContract,
        spacing: Sequence[float],
        spatial_size: Sequence[int],
        editor: Any = None,
        output_range: Sequence[float] | None = None,
        memory_check: bool = True,
        decoder_upsampling: int = 0,
        noise: AcquisitionNoise | None = None,
    ) -> None:
        self.sampler = sampler
        self.noise = noise
        self.refine = 2 ** int(decoder_upsampling)
        if self.refine > 1 and not hasattr(sampler, "decoder"):  # e.g. the GAN baseline: it makes the image itself
            raise BundleInputError(
                "config 'decoder_upsampling': only the latent diffusion sampler decodes on a finer grid; pass 0"
            )
        self.spacing = tuple(float(s) for s in spacing)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.memory_check = as_bool(memory_check, "memory_check")
        self.contract = contract
        self.editor = editor
        output_range = as_optional(output_range)  # --output_intensity_range null arrives as text
        self.output_range = None if output_range is None else (float(output_range[0]), float(output_range[1]))
        # the label half of scripts.data.cases.preprocessing_transforms, on a label already read and checked
        self.to_model_grid = Compose(
            [
                Orientation(axcodes="RAS", labels=None),
                Spacing(pixdim=spacing, mode="nearest"),
                ResizeWithPadOrCrop(spatial_size=spatial_size),
            ]
        )
        self.to_mask_grid = ResampleToMatch(mode="bilinear", padding_mode="zeros")

    def memory_estimate(self, mask: nib.Nifti1Image) -> int:
        """Peak bytes that generating from ``mask`` takes beyond the loaded networks, from its header
        alone (grid, data type, affine), without reading its voxels. Against the measurements noted
        at ``_MASK_GRID_BYTES_PER_VOXEL`` it is 6 to 14 % high for masks of 18 M voxels or more, and
        relatively higher for small masks, where the fixed part dominates.
        """
        shape = tuple(int(s) for s in mask.shape[:3])
        scaled = mask.dataobj.slope not in (None, 1) or mask.dataobj.inter not in (None, 0)
        itemsize = 8 if scaled else mask.get_data_dtype().itemsize  # nibabel scales into float64
        per_voxel = _MASK_GRID_BYTES_PER_VOXEL + itemsize
        if self.editor is not None and getattr(self.editor, "enabled", True):
            per_voxel += _EDITING_BYTES_PER_VOXEL
        # the grid Orientation + Spacing make before the crop, from the transforms themselves run
        # lazily on a stand-in that holds no voxels
        affine = torch.as_tensor(mask.affine, dtype=torch.float64)
        stand_in = MetaTensor(torch.zeros(1).expand(1, *shape), affine=affine)
        resampled = self.to_model_grid_shape(stand_in)
        decoded = (
            0 if self.refine == 1 else _REFINED_DECODE_BYTES_PER_VOXEL * math.prod(self.spatial_size) * self.refine**3
        )
        return int(
            _FIXED_BYTES + decoded + per_voxel * math.prod(shape) + _RESAMPLED_BYTES_PER_VOXEL * math.prod(resampled)
        )

    def to_model_grid_shape(self, on_mask_grid: MetaTensor) -> tuple[int, ...]:
        """Shape of ``on_mask_grid`` reoriented and resampled to the model spacing, before the crop."""
        # one lazy transform after the other: a lazy Compose would carry out the resampling at its end
        pending = Orientation(axcodes="RAS", labels=None, lazy=True)(on_mask_grid)
        pending = Spacing(pixdim=self.spacing, mode="nearest", lazy=True)(pending)
        return tuple(int(s) for s in pending.peek_pending_shape())

    def check_memory(self, path: str, mask: nib.Nifti1Image) -> int | None:
        """Refuse ``mask`` (file ``path``) when its :meth:`memory_estimate` exceeds the available
        memory; warn when it takes more than half. Returns the estimate (``None`` when not checked).
        """
        if not self.memory_check:
            return None
        available = available_memory()
        if available is None:
            logger.debug("available memory unknown here: masks are not checked against it")
            return None
        needed = self.memory_estimate(mask)
        shape = "x".join(str(int(s)) for s in mask.shape[:3])
        size = f"{shape} voxels of {mask.get_data_dtype()}"
        if needed > available:
            raise BundleInputError(
                f"{path}: mask of {size} needs about {format_bytes(needed)} of memory to resample and write on its "
                f"own grid, but only {format_bytes(available)} is available; free memory, use a larger machine, or "
                f"resample the mask to coarser voxels (the model's are {'x'.join(f'{v:g}' for v in self.spacing)} mm)"
            )
        if needed > _MEMORY_WARNING_SHARE * available:
            logger.warning(
                f"{path}: mask of {size} needs about {format_bytes(needed)} of the {format_bytes(available)} of memory "
                "available; other programs may run short"
            )
        return needed

    def read(self, path: str, header: nib.Nifti1Image | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
        """The checked, remapped label array of ``path`` and its NIfTI image (for the header).

        ``header``: the file's checked header (``scripts.data.cases.load_nifti_header``), when already
        opened. The label ids are kept as uint8 when they fit (the contract's ids always do).
        """
        header = load_nifti_header(path, role="label mask") if header is None else header
        label, _ = read_nifti(path, role="label mask", header=header)
        label = np.asarray(self.contract.prepare(label, path))
        if label.size and 0 <= label.min() and label.max() <= np.iinfo(np.uint8).max:
            label = label.astype(np.uint8, copy=False)
        return label, header

    def edit(self, label: np.ndarray, affine: np.ndarray, seed: int, source: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The edited label (the label itself without an editor) and a summary of the edits."""
        if self.editor is None:
            return label, {}
        edited, summary = self.editor(
            label,
            spacing=affine_to_spacing(np.asarray(affine, dtype=np.float64), r=3, suppress_zeros=False),
            seed=seed,
            source=source,
        )
        self.contract.check(edited, f"{source} (edited)", remapped=True)
        return np.asarray(edited), dict(summary)

    def on_grids(self, label: np.ndarray, affine: np.ndarray) -> tuple[MetaTensor, MetaTensor, MetaTensor]:
        """``label`` (its own grid, ``affine``) as a channel-first MetaTensor, the same on the model grid, and on
        the grid the image is decoded on (the model grid, or its refinement for a refining decoder)."""
        on_mask_grid = MetaTensor(torch.as_tensor(label[None].astype(np.float32)), affine=torch.as_tensor(affine))
        on_model_grid = self.to_model_grid(on_mask_grid)
        if self.refine == 1:
            return on_mask_grid, on_model_grid, on_model_grid
        return on_mask_grid, on_model_grid, on_refined_grid(on_mask_grid, on_model_grid, self.refine)

    def sample(
        self, on_model_grid: MetaTensor, seed: int, device: torch.device, on_decode_grid: MetaTensor | None = None
    ) -> torch.Tensor:
        """The image generated with ``seed`` from a label on the model grid, on the decode grid (``on_decode_grid``,
        default the model grid): (1, *size), [0, 1], on the CPU."""
        # the sampler seeds its starting noise; DDPM's stochastic steps draw from the global generator
        torch.manual_seed(seed)
        refined = on_decode_grid is not None and on_decode_grid is not on_model_grid
        extra = {"decode_label": on_decode_grid[None].as_tensor().to(device)} if refined else {}
        generated = self.sampler(on_model_grid[None].as_tensor().to(device), seeds=[seed], **extra)[0].cpu()
        require_finite(
            generated, "the generated image", "check --autoencoder_path, --diffusion_unet_path and --controlnet_path"
        )
        return generated

    def to_mask_grid_image(
        self, generated: torch.Tensor, on_decode_grid: MetaTensor, on_mask_grid: MetaTensor
    ) -> np.ndarray:
        """A generated image (on ``on_decode_grid``'s grid) resampled onto the mask's grid (float32), on [0, 1]."""
        image = MetaTensor(generated, affine=on_decode_grid.affine, meta={"space": "RAS"})
        return self.to_mask_grid(image, img_dst=on_mask_grid)[0].numpy().astype(np.float32)

    def deliver(
        self, generated: torch.Tensor, on_decode_grid: MetaTensor, on_mask_grid: MetaTensor, seed: int
    ) -> tuple[np.ndarray, float | None]:
        """What is written: the generated image on the mask's grid with acquisition noise drawn from
        ``seed`` (when ``noise`` is set), in ``output_range``; and the relative noise level drawn."""
        image = self.to_mask_grid_image(generated, on_decode_grid, on_mask_grid)
        level = None
        if self.noise is not None:
            image, level = self.noise(image, on_mask_grid[0].numpy(), seed)
            image = np.clip(image, 0.0, 1.0)  # the [0, 1] scale of the training images (clipped percentile scaling)
        if self.output_range is not None:
            low, high = self.output_range
            image = low + (high - low) * image
        return image, level

    def __call__(self, label: np.ndarray, affine: np.ndarray, seed: int, device: torch.device) -> np.ndarray:
        """Image (float32, the label's shape) generated from ``label`` with ``seed``."""
        on_mask_grid, on_model_grid, on_decode_grid = self.on_grids(label, affine)
        generated = self.sample(on_model_grid, seed, device, on_decode_grid)
        return self.deliver(generated, on_decode_grid, on_mask_grid, seed)[0]


def _save(array: np.ndarray, like: nib.Nifti1Image, path: str, dtype: Any) -> None:
    """Write ``array`` with ``like``'s affine and header (orientation codes, units) as ``dtype``."""
    header = like.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)  # the data are written as they are, unscaled
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), like.affine, header=header), path)


def _label_dtype(like: nib.Nifti1Image, label: np.ndarray) -> Any:
    """The input's on-disk type when it holds the ids as they are, else uint8."""
    dtype = like.get_data_dtype()
    if like.dataobj.slope not in (None, 1) or like.dataobj.inter not in (None, 0):
        return np.uint8
    if np.issubdtype(dtype, np.integer) and label.max(initial=0) > np.iinfo(dtype).max:
        return np.uint8
    return dtype


@dataclass
class CheckedMask:
    """One input mask, read and checked once: its datalist entry, its header and its remapped label ids."""

    item: Mapping[str, str]
    nifti: nib.Nifti1Image
    label: np.ndarray


def check_masks(masks: Sequence[Mapping[str, str]], generator: MaskToImage) -> list[CheckedMask]:
    """Read and check every mask before anything is generated; raises on the first bad one.

    First every header (3D grid, real-valued data type, usable affine, the memory the mask will
    need: see :meth:`MaskToImage.check_memory`), which takes no time, then every mask's voxels
    against the label contract. Each file is decompressed once: generation uses what is returned
    (label ids as uint8, a few MB per mask).
    """
    headers = [load_nifti_header(item["label"], role="label mask") for item in masks]
    for item, header in zip(masks, headers, strict=True):
        generator.check_memory(item["label"], header)
    checked = []
    for item, header in tqdm(list(zip(masks, headers, strict=True)), desc="checking masks", unit="mask"):
        label, nifti = generator.read(item["label"], header)
        checked.append(CheckedMask(item, nifti, label))
    return checked


def generate_pairs(
    masks: Sequence[Mapping[str, str]],
    generator: MaskToImage,
    output_dir: str,
    overwrite: bool = False,
    seed: int = 0,
    num_samples_per_mask: int = 1,
    device: torch.device | str = "cpu",
    save_preview: bool = False,
    quality_gate: HBPQualityGate | None = None,
) -> str:
    """Write every pair (and ``pairs.json``, which maps each output to its mask and seed) to ``output_dir``.

    The masks are all checked first; the pairs are written into a staging folder that replaces
    ``output_dir`` only once complete (``overwrite`` must allow replacing a non-empty one) and
    is removed if anything fails. With a ``quality_gate``, a volume that fails it is generated
    again with a new seed, up to its ``max_tries``; the best attempt is kept and every attempt is
    recorded. Returns ``output_dir``.
    """
    if num_samples_per_mask < 1:
        raise BundleInputError(f"config 'num_samples_per_mask' must be at least 1, got {num_samples_per_mask}")
    save_preview = as_bool(save_preview, "save_preview")
    checked = check_masks(masks, generator)
    with staged_output(
        output_dir, overwrite, inputs=[item["label"] for item in masks], kind="set of generated pairs"
    ) as staging:
        records = []
        jobs = [(mask, k) for mask in checked for k in range(num_samples_per_mask)]
        for mask, k in tqdm(jobs, desc="generating", unit="volume"):
            records.append(
                _write_pair(
                    mask,
                    k,
                    num_samples_per_mask,
                    generator,
                    staging,
                    seed,
                    torch.device(device),
                    save_preview,
                    quality_gate,
                )
            )
        failed = [r["image"] for r in records if not r.get("quality_gate", {}).get("passed", True)]
        if failed:
            logger.warning(
                f"{len(failed)} volume(s) failed the quality gate in every attempt (kept the best; see pairs.json): "
                + ", ".join(failed)
            )
        write_pairs_manifest(staging, records, seed=int(seed))
    return os.path.abspath(output_dir)


def _write_pair(
    mask: CheckedMask,
    sample: int,
    num_samples: int,
    generator: MaskToImage,
    folder: str,
    seed: int,
    device: torch.device,
    save_preview: bool,
    quality_gate: HBPQualityGate | None = None,
) -> dict[str, Any]:
    item, label, nifti = mask.item, mask.label, mask.nifti
    prefix = output_prefix(item["name"], sample, num_samples)
    case_seed = output_seed(seed, item["name"], sample)
    edited, summary = generator.edit(label, nifti.affine, case_seed, item["label"])
    on_mask_grid, on_model_grid, on_decode_grid = generator.on_grids(edited, nifti.affine)
    generated = generator.sample(on_model_grid, case_seed, device, on_decode_grid)
    gate_record = None
    if quality_gate is not None:  # judged as generated, before any resampling
        generated, case_seed, gate_record = _regenerate_until_gate_passes(
            generated,
            case_seed,
            on_model_grid,
            on_decode_grid,
            generator,
            quality_gate,
            seed,
            item["name"],
            sample,
            device,
        )
    image, noise_level = generator.deliver(generated, on_decode_grid, on_mask_grid, case_seed)
    names = {role: pair_file_name(prefix, role) for role in ROLES}
    _save(image, nifti, os.path.join(folder, names["image"]), np.float32)
    _save(edited, nifti, os.path.join(folder, names["label"]), _label_dtype(nifti, edited))
    if save_preview:
        save_pair_preview(image, edited, nifti.affine, os.path.join(folder, f"{prefix}_preview.png"), title=prefix)
    return {
        **names,
        "mask": os.path.abspath(item["label"]),
        "sample": sample,
        "seed": case_seed,
        "edits": summary,
        **({} if noise_level is None else {"acquisition_noise": round(noise_level, 5)}),
        **({} if gate_record is None else {"quality_gate": gate_record}),
    }


def _regenerate_until_gate_passes(
    generated: torch.Tensor,
    case_seed: int,
    on_model_grid: MetaTensor,
    on_decode_grid: MetaTensor,
    generator: MaskToImage,
    gate: HBPQualityGate,
    seed: int,
    name: str,
    sample: int,
    device: torch.device,
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Judge ``generated`` (decode grid) against its label; while it fails, generate again with the next attempt's seed.

    Returns the image kept (the first that passes, else the one with the largest margin), its seed
    and the record of every attempt. The mask (and its edits) stays the same across attempts.
    """
    label = on_decode_grid[0].numpy().astype(np.int64)
    attempts = [{"seed": case_seed, **gate(generated[0].numpy(), label)}]
    best = (generated, case_seed, attempts[0])
    for attempt in range(1, gate.max_tries):
        if best[2]["passed"]:
            break
        retry_seed = output_seed(seed, name, sample, attempt)
        retry = generator.sample(on_model_grid, retry_seed, device, on_decode_grid)
        attempts.append({"seed": retry_seed, **gate(retry[0].numpy(), label)})
        if attempts[-1]["passed"] or attempts[-1]["margin"] > best[2]["margin"]:
            best = (retry, retry_seed, attempts[-1])
    kept_image, kept_seed, verdict = best
    return kept_image, kept_seed, {"passed": verdict["passed"], "tries": len(attempts), "attempts": attempts}
