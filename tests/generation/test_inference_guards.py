# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Guards of the inference command. Before anything is generated: mask headers that cannot be used
(singular or non-finite affine, voxels that are not real numbers), folder entries that are no mask
files (broken symlinks, symlink loops, folders named like masks), masks too large for the memory
available. After sampling: a generated image with NaN or Inf is never written."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, toy_label, write_nifti
from stage_helpers import one_thread  # noqa: F401
from stage_helpers import build_weights, infer

import scripts.generation.inference as inference
from scripts.core.errors import BundleInputError, find_input_error
from scripts.data.cases import check_cases, load_nifti_header
from scripts.generation.inference import MaskToImage, available_memory
from scripts.generation.mask_sources import find_masks

# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The tiny weights of test_inference, built for this module."""
    return build_weights(tmp_path_factory)


def _write_with_header_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    """Save ``data`` with ``affine`` as the header's sform (qform off), as a damaged or hand-edited
    header has it: nibabel refuses to build an image from a singular affine, but reads one."""
    header = nib.Nifti1Image(data, np.eye(4)).header.copy()
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))
    return str(path)


def _bad_header_mask(kind: str, path: Path) -> str:
    label = toy_label()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    if kind == "singular affine":
        affine[2, 2] = 0.0  # no extent along z
    elif kind == "parallel axes":
        affine[:3, 1] = affine[:3, 0]  # y runs along x: voxels do not span 3D space
    elif kind == "NaN affine":
        affine[0, 3] = np.nan
    elif kind == "Inf affine":
        affine[1, 1] = np.inf
    elif kind == "complex":
        return write_nifti(path, label.astype(np.complex64), affine)
    elif kind == "RGB":
        rgb = np.zeros(label.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = label
        return write_nifti(path, rgb, affine)
    return _write_with_header_affine(path, label, affine)


EXPECTED = {
    "singular affine": "affine is singular",
    "parallel axes": "affine is singular",
    "NaN affine": "affine (voxel-to-world matrix of the header's sform/qform) contains NaN or Inf",
    "Inf affine": "contains NaN or Inf",
    "complex": "has data type complex64 (complex numbers)",
    "RGB": "has data type RGB (structured voxels, e.g. RGB)",
}


@pytest.fixture
def generated(monkeypatch) -> list[str]:
    """Every call of the generator (one per volume sampled) is recorded here."""
    calls: list[str] = []
    original = MaskToImage.__call__

    def recording(self, label, affine, seed, device):
        calls.append(str(seed))
        return original(self, label, affine, seed, device)

    monkeypatch.setattr(MaskToImage, "__call__", recording)
    return calls


@pytest.fixture
def warnings_logged() -> list[str]:
    """Warnings of scripts.generation (inference, mask sources), caught on its own logger: a bundle run
    reconfigures the root logger from configs/logging.conf, which removes pytest's caplog handler."""
    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                caught.append(record.getMessage())

    handler = Catch()
    logging.getLogger("scripts.generation").addHandler(handler)
    yield caught
    logging.getLogger("scripts.generation").removeHandler(handler)


def _good_mask(folder: Path, name: str = "a_good.nii.gz", shape=(24, 24, 16)) -> str:
    return write_nifti(folder / name, toy_label(shape), np.diag([9.0, 9.0, 12.0, 1.0]))


def _one_line_error(caught: pytest.ExceptionInfo) -> str:
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError), caught.value
    assert "\n" not in str(error)
    return str(error)


# ---------------------------------------------------------------- 1. headers


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_unusable_header_is_refused_before_any_volume_is_generated(kind, weights, generated, tmp_path):
    """A good mask sorts first: it must not be sampled before the bad one is found."""
    masks = tmp_path / "masks"
    _good_mask(masks)
    bad = _bad_header_mask(kind, masks / "z_bad.nii.gz")
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["ddpm"], mask_dir=str(masks))
    message = _one_line_error(caught)
    assert message.startswith(f"{bad}: label mask ") and EXPECTED[kind] in message
    assert generated == []
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_every_real_data_type_and_an_oblique_affine_pass_the_header_checks(dtype, tmp_path):
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([0.4, 0.5, 2.5])
    affine = np.eye(4)
    affine[:3, :3] = rotation  # sub-millimetre, rotated, anisotropic: not singular
    path = write_nifti(tmp_path / "mask.nii.gz", toy_label().astype(dtype), affine)
    assert load_nifti_header(path, role="label mask").shape == toy_label().shape


def test_training_data_checks_refuse_the_same_headers(tmp_path, contract):
    label = write_nifti(tmp_path / "labelsTr" / "case.nii.gz", toy_label())
    image = _bad_header_mask("singular affine", tmp_path / "imagesTr" / "case.nii.gz")
    with pytest.raises(BundleInputError, match=re.escape(f"{image}: image affine is singular")):
        check_cases([{"image": image, "label": label}], contract)


# ---------------------------------------------------------------- 2. mask folder entries


def _odd_entries(folder: Path) -> dict[str, str]:
    """Entries named like masks that are no mask files, with the reason each must be reported for."""
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(folder / "moved_away.nii.gz", folder / "broken.nii.gz")
    os.symlink(folder / "loop.nii.gz", folder / "loop.nii.gz")
    os.symlink(folder / "ping.nii", folder / "pong.nii")
    os.symlink(folder / "pong.nii", folder / "ping.nii")
    (folder / "folder.nii.gz").mkdir()
    (folder / "folder.nii.gz" / "case.nii.gz").write_bytes(b"not read")
    os.mkfifo(folder / "pipe.nii.gz")
    return {
        "broken.nii.gz": "broken symlink",
        "loop.nii.gz": "symlink loop",
        "ping.nii": "symlink loop",
        "pong.nii": "symlink loop",
        "folder.nii.gz": "a folder, not a file",
        "pipe.nii.gz": "not a regular file",
    }


def test_odd_folder_entries_are_reported_one_by_one_and_the_valid_masks_are_used(weights, tmp_path, warnings_logged):
    masks = tmp_path / "masks"
    odd = _odd_entries(masks)
    _good_mask(masks, "case.nii.gz")
    out = infer(tmp_path / "out", weights["ddpm"], mask_dir=str(masks), quality_gate_enabled=False)
    warnings = warnings_logged
    for name, reason in odd.items():
        assert [w for w in warnings if w.startswith(f"{masks / name}: skipped, {reason}")], (name, warnings)
    assert any(str(masks / "moved_away.nii.gz") in w for w in warnings)  # where the broken link points
    pairs = json.loads((out / "pairs.json").read_text())["pairs"]
    assert [p["mask"] for p in pairs] == [str(masks / "case.nii.gz")]


def test_a_folder_of_only_odd_entries_is_the_no_masks_error(tmp_path, warnings_logged):
    masks = tmp_path / "masks"
    odd = _odd_entries(masks)
    with pytest.raises(BundleInputError, match=re.escape(f"{masks}: no label maps (.nii or .nii.gz)")):
        find_masks(mask_dir=str(masks))
    assert sorted(w.split(": skipped")[0] for w in warnings_logged) == sorted(str(masks / name) for name in odd)


# ---------------------------------------------------------------- 4. memory


def _generator(sampler=None, **settings) -> MaskToImage:
    """The generator of configs/inference.yaml on the tiny grid (networks and weights not needed)."""
    from stage_helpers import common_parser

    parser = common_parser()
    return MaskToImage(
        sampler,
        parser.get_parsed_content("label_contract", instantiate=True),
        parser.get_parsed_content("spacing"),
        parser.get_parsed_content("spatial_size"),
        **settings,
    )


def test_a_refining_decoder_adds_its_finer_grid_to_the_estimate(tmp_path):
    """decoder_upsampling 1 decodes on 8x the model grid's voxels: the estimate grows by that grid's decoding
    (measured 1.26 GB for one 128^3 volume at demo size), whatever the mask."""
    path = write_nifti(tmp_path / "mask.nii.gz", toy_label((24, 24, 16)), np.diag([3.0, 3.0, 4.0, 1.0]))
    sampler = type("Sampler", (), {"decoder": None})()  # what the estimate needs of a latent diffusion sampler
    plain, refining = (
        _generator(decoder_upsampling=k, sampler=sampler).memory_estimate(nib.load(path)) for k in (0, 1)
    )
    fine_voxels = 8 * int(np.prod(_generator().spatial_size))
    assert refining - plain == pytest.approx(inference._REFINED_DECODE_BYTES_PER_VOXEL * fine_voxels)
    assert 1.2e9 < inference._REFINED_DECODE_BYTES_PER_VOXEL * 128**3 < 1.6e9  # the measurement it stands for


def test_a_generator_without_a_decoder_refuses_a_finer_decode_grid():
    """The GAN baseline makes its image on the model grid: decoder_upsampling with it is one clear error."""
    with pytest.raises(BundleInputError, match="decoder_upsampling"):
        _generator(decoder_upsampling=1)


def test_a_mask_too_large_for_the_memory_is_refused_from_its_header_before_any_generation(
    weights, generated, tmp_path, monkeypatch
):
    masks = tmp_path / "masks"
    _good_mask(masks)
    # a large grid whose voxels are never read: the file stops right after the header
    big = masks / "z_big.nii"
    nib.save(nib.Nifti1Image(np.zeros((160, 160, 120), dtype=np.int16), np.diag([1.5, 1.5, 2.0, 1.0])), str(big))
    os.truncate(big, 352 + 1000)
    needed = _generator().memory_estimate(nib.load(str(big)))
    small = _generator().memory_estimate(nib.load(str(masks / "a_good.nii.gz")))
    assert needed > small
    monkeypatch.setattr(inference, "available_memory", lambda: (needed + small) // 2)  # room for the small one only
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["ddpm"], mask_dir=str(masks))
    message = _one_line_error(caught)
    assert message.startswith(f"{big}: mask of 160x160x120 voxels of int16 needs about ")
    assert f"{needed / 1e9:.2f} GB" in message and f"only {(needed + small) // 2 / 1e9:.2f} GB is available" in message
    assert generated == [] and not (tmp_path / "out").exists()


def test_a_mask_taking_over_half_the_memory_gets_a_warning_and_is_generated(
    weights, tmp_path, monkeypatch, warnings_logged
):
    path = _good_mask(tmp_path / "masks", "case.nii.gz")
    needed = _generator().memory_estimate(nib.load(path))
    monkeypatch.setattr(inference, "available_memory", lambda: int(needed * 1.5))
    out = infer(tmp_path / "out", weights["ddpm"], mask_dir=str(tmp_path / "masks"), quality_gate_enabled=False)
    assert (out / "case_image.nii.gz").is_file()
    assert [w for w in warnings_logged if w.startswith(f"{path}: mask of 24x24x16 voxels of uint8 needs about")]
    monkeypatch.setattr(inference, "available_memory", lambda: needed // 2)
    assert _generator(memory_check=False).check_memory(path, nib.load(path)) is None  # switched off: no refusal


def test_available_memory_is_what_the_system_reports():
    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo or psutil here")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < available <= total


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give the heap that earlier tests of this process freed back to the system: glibc keeps it for
    reuse, and a run served from it would not raise the peak resident set size measured here."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize(
    "shape,voxel_mm",
    [
        ((200, 200, 120), 1.5),  # finer voxels than the model's: the mask grid dominates
        ((40, 40, 30), 40.0),  # coarser voxels: the grid resampled to the model spacing dominates
    ],
)
def test_the_estimate_bounds_the_measured_peak_memory(shape, voxel_mm, weights, tmp_path):
    """The steps of a run (read and check, resample to the model grid, sample, resample back,
    write) on one mask, measured by the kernel's peak resident set size of this process."""
    import torch

    if not _peak_rss_reset():
        pytest.skip("peak memory cannot be reset here (Linux /proc/self/clear_refs)")
    generator = _workflow_generator(weights["ddpm"])
    path = write_nifti(tmp_path / "mask.nii.gz", toy_label(shape), np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]))
    estimate = generator.memory_estimate(nib.load(path))
    _release_free_heap()
    _peak_rss_reset()
    before = _rss("VmRSS")
    label, nifti = generator.read(path)
    image = generator(label, nifti.affine, 0, torch.device("cpu"))
    inference._save(image, nifti, str(tmp_path / "image.nii.gz"), np.float32)
    inference._save(label, nifti, str(tmp_path / "label.nii.gz"), inference._label_dtype(nifti, label))
    measured = _rss("VmHWM") - before
    assert 0 < measured <= estimate, (measured, estimate)
    assert estimate <= 2 * measured + inference._FIXED_BYTES, (measured, estimate)  # and not far above it


def _workflow_generator(weights: dict[str, str]) -> MaskToImage:
    """The generator configs/inference.yaml builds, on the tiny grid with the tiny test weights."""
    from monai.bundle import ConfigWorkflow
    from stage_helpers import INFERENCE_CONFIG, TINY

    workflow = ConfigWorkflow(
        config_file=INFERENCE_CONFIG,
        workflow_type="infer",
        run_id="inference",
        num_inference_steps=2,
        device="$torch.device('cpu')",
        **TINY,
        **weights,
    )
    workflow.initialize()
    return workflow.parser.get_parsed_content("generator")


# ---------------------------------------------------------------- 5. non-finite output


def test_weights_that_generate_nan_are_one_error_and_nothing_is_written(weights, tmp_path):
    """An autoencoder whose decoder holds a NaN decodes NaN images: refused before any file is written."""
    import torch
    from stage_helpers import write_controlnet, write_unet

    checkpoint = torch.load(weights["ddpm"]["autoencoder_path"], weights_only=True)
    last = [key for key in checkpoint["autoencoder"] if key.startswith("decoder.") and key.endswith(".weight")][-1]
    checkpoint["autoencoder"][last].view(-1)[0] = float("nan")
    torch.save(checkpoint, tmp_path / "autoencoder.pt")
    unet = write_unet(tmp_path / "unet.pt", tmp_path / "autoencoder.pt")
    broken = {
        "autoencoder_path": str(tmp_path / "autoencoder.pt"),
        "diffusion_unet_path": str(unet),
        "controlnet_path": str(write_controlnet(tmp_path / "controlnet.pt", unet)),
        "autoguidance_unet_path": str(write_unet(tmp_path / "guide.pt", tmp_path / "autoencoder.pt", seed=1)),
        "label_guided_decoder": False,
        "decoder_upsampling": 0,
    }
    _good_mask(tmp_path / "masks")
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", broken, mask_dir=str(tmp_path / "masks"))
    assert _one_line_error(caught).startswith("the generated image holds NaN or Inf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))

    # the same weights through the other commands that publish volumes: unconditional sampling and
    # stage-1 reconstruction of a dataset
    from monai.bundle import ConfigWorkflow
    from stage_helpers import TINY

    from scripts.core.settings import layered_config_files
    from scripts.tools.phantom import write_phantom_dataset

    dataset = tmp_path / "dataset"
    write_phantom_dataset(str(dataset), num_cases=3, seed=5, shape=(40, 40, 32))
    for config, settings, what in (
        ("configs/generate_unconditional.yaml", {"num_samples": 1, "num_inference_steps": 2}, "unconditional sample"),
        ("configs/inference_autoencoder.yaml", {"dataset_dir": str(dataset)}, "the reconstruction"),
    ):
        output = tmp_path / Path(config).stem
        workflow = ConfigWorkflow(
            config_file=layered_config_files(config),
            workflow_type="infer",
            output_dir=str(output),
            **{"device": "$torch.device('cpu')", **TINY, **broken, **settings},
        )
        workflow.initialize()
        with pytest.raises(Exception) as caught:
            workflow.run()
        assert _one_line_error(caught).startswith(what) and "NaN or Inf" in str(find_input_error(caught.value))
        published = list(output.rglob("*.nii.gz")) if output.exists() else []
        assert published == [], f"{config} published {published}"


def test_a_missing_autoguidance_unet_names_its_own_setting(weights, tmp_path):
    os.chdir(BUNDLE_ROOT)
    _good_mask(tmp_path / "masks")
    settings = {**weights["ddpm"], "autoguidance_unet_path": str(tmp_path / "no_guide.pt"), "autoguidance_weight": 2.0}
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", settings, mask_dir=str(tmp_path / "masks"))
    message = _one_line_error(caught)
    assert message.startswith(f"{tmp_path / 'no_guide.pt'}: autoguidance UNet weights not found")
    assert "--autoguidance_unet_path" in message and "--diffusion_unet_path" not in message
    assert not (tmp_path / "out").exists()
