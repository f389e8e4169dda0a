# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Inference (configs/inference.yaml): the output contract, reproducibility, every sampler, the
checks on bad input, and, with the shipped demo weights, the HBP pattern on unseen masks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, run_bundle, toy_label, write_nifti
from monai.bundle import ConfigWorkflow
from stage_helpers import (  # noqa: F401
    INFERENCE_CONFIG,
    TINY,
    build_weights,
    common_parser,
    infer,
    inference_workflow,
    one_thread,
    write_autoencoder,
    write_controlnet,
    write_network,
    write_unet,
)

from scripts.core.checkpoints import load_network_weights
from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.outputs import OWNER_MARKER
from scripts.core.settings import layered_config_files
from scripts.data.labels import LABELS
from scripts.generation.autoguidance import AutoGuidedUNet
from scripts.generation.inference import output_seed
from scripts.generation.sampler import conditioning_embedded_once
from scripts.models.autoencoder import load_initial_autoencoder
from scripts.models.diffusion import load_diffusion_unet


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict[str, str]]:
    return build_weights(tmp_path_factory)


def _lps_mask() -> tuple[np.ndarray, np.ndarray]:
    """The toy map stored LPS (x and y flipped) with anisotropic 9 x 11 x 14 mm voxels."""
    affine = np.diag([-9.0, -11.0, 14.0, 1.0])
    affine[:3, 3] = [100.0, 120.0, -90.0]
    return toy_label((28, 24, 12)), affine


@pytest.fixture(scope="module")
def mask_dir(tmp_path_factory, tiny_phantoms) -> Path:
    """An LPS anisotropic toy mask and two phantom masks (their on-disk orientations vary)."""
    root = tmp_path_factory.mktemp("masks")
    label, affine = _lps_mask()
    write_nifti(root / "lps.nii.gz", label.astype(np.int16), affine)
    for path in sorted((tiny_phantoms / "labelsTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, weights, mask_dir) -> Path:
    os.chdir(BUNDLE_ROOT)
    return infer(tmp_path_factory.mktemp("run") / "pairs", weights["ddpm"], mask_dir=str(mask_dir), save_preview=True)


def test_pairs_keep_the_input_mask_and_its_grid(pairs, mask_dir):
    inputs = sorted(mask_dir.glob("*.nii.gz"))
    record = json.loads((pairs / "pairs.json").read_text())
    assert sorted(p["mask"] for p in record["pairs"]) == sorted(str(p) for p in inputs)
    for path in inputs:
        name = path.name[: -len(".nii.gz")]
        given = nib.load(path)
        label = nib.load(pairs / f"{name}_label.nii.gz")
        image = nib.load(pairs / f"{name}_image.nii.gz")
        assert np.array_equal(np.asanyarray(label.dataobj), np.asanyarray(given.dataobj))  # voxels unchanged
        assert label.get_data_dtype() == given.get_data_dtype()
        for written in (label, image):
            assert written.shape == given.shape
            assert np.allclose(written.affine, given.affine, atol=1e-5)
            assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(given.affine)
        pixels = np.asanyarray(image.dataobj)
        assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 1e-3  # [0, 1], not constant
        assert (pairs / f"{name}_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_follows_the_mask_in_the_world_whatever_its_storage_order(weights, tmp_path):
    """The same physical mask stored LPS and stored RAS gives the same image, voxel for voxel:
    orientation and anisotropic spacing are handled in world coordinates both ways (acquisition noise
    off: white noise is drawn voxel by voxel in storage order, and has no orientation to keep)."""
    label, affine = _lps_mask()
    ras_affine = affine.copy()
    ras_affine[:2, :2] *= -1  # x and y axes reversed...
    ras_affine[:2, 3] = affine[:2, 3] - np.array([9.0 * 27, 11.0 * 23])  # ...from the opposite corner
    write_nifti(tmp_path / "lps" / "case.nii.gz", label, affine)
    write_nifti(tmp_path / "ras" / "case.nii.gz", label[::-1, ::-1].copy(), ras_affine)
    images = {}
    for order in ("lps", "ras"):
        out = infer(tmp_path / f"out_{order}", weights["ddpm"], mask_dir=str(tmp_path / order), acquisition_noise=None)
        images[order] = np.asanyarray(nib.load(out / "case_image.nii.gz").dataobj)
    assert images["lps"].std() > 1e-3
    assert np.allclose(images["lps"], images["ras"][::-1, ::-1], atol=1e-4)


@pytest.mark.slow
def test_same_seed_same_pairs_other_seed_other_pairs(pairs, weights, mask_dir, tmp_path):
    again = infer(tmp_path / "again", weights["ddpm"], mask_dir=str(mask_dir))
    other = infer(tmp_path / "other", weights["ddpm"], mask_dir=str(mask_dir), seed=1)
    for path in sorted(pairs.glob("*_image.nii.gz")):
        first = np.asanyarray(nib.load(path).dataobj)
        assert np.array_equal(first, np.asanyarray(nib.load(again / path.name).dataobj))
        assert not np.allclose(first, np.asanyarray(nib.load(other / path.name).dataobj))


@pytest.mark.parametrize("sampler,schedule", [("ddpm", "ddpm"), ("ddim", "ddpm"), ("rflow", "rflow")])
def test_every_sampler_generates_several_samples_per_mask(sampler, schedule, weights, tmp_path):
    masks = tmp_path / "masks"
    label, affine = _lps_mask()
    write_nifti(masks / "case.nii.gz", label, affine)
    # ddpm takes every training timestep: a short schedule keeps that quick
    steps = {"num_train_timesteps": 8, "num_inference_steps": 8} if sampler == "ddpm" else {}
    out = infer(
        tmp_path / "out", weights[schedule], mask_dir=str(masks), sampler=sampler, num_samples_per_mask=2, **steps
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        OWNER_MARKER,
        "case_s0_image.nii.gz",
        "case_s0_label.nii.gz",
        "case_s1_image.nii.gz",
        "case_s1_label.nii.gz",
        "pairs.json",
    ]
    first, second = (np.asanyarray(nib.load(out / f"case_s{k}_image.nii.gz").dataobj) for k in (0, 1))
    assert np.isfinite(first).all() and not np.allclose(first, second)
    pairs = json.loads((out / "pairs.json").read_text())["pairs"]
    # each sample starts from its own seed; the seed kept is that of the attempt the quality gate kept
    assert [p["quality_gate"]["attempts"][0]["seed"] for p in pairs] == [
        output_seed(0, "case", 0),
        output_seed(0, "case", 1),
    ]
    assert all(p["seed"] in [a["seed"] for a in p["quality_gate"]["attempts"]] for p in pairs)


def test_sampler_that_does_not_fit_the_model_is_refused(weights, mask_dir, tmp_path):
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["rflow"], mask_dir=str(mask_dir), sampler="ddim")
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and "rflow" in str(error) and "--sampler rflow" in str(error)
    assert not (tmp_path / "out").exists()


def test_ddpm_sampler_with_fewer_steps_than_training_timesteps_is_refused(weights, mask_dir, tmp_path):
    """MONAI's DDPMScheduler.step always steps t -> t - 1: skipping timesteps would decode noise."""
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["ddpm"], mask_dir=str(mask_dir), sampler="ddpm", num_inference_steps=50)
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError)
    assert "num_inference_steps" in str(error) and "all 1000 timesteps, got 50" in str(error)
    assert "--sampler ddim" in str(error)
    assert not (tmp_path / "out").exists()


def test_mask_embedding_computed_once_gives_the_same_guidance():
    """The sampler embeds the mask once per volume instead of at every step: same residuals."""
    torch.manual_seed(0)
    controlnet = common_parser().get_parsed_content("controlnet_def", instantiate=True).eval()
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.normal_(0.0, 0.05)
        x, cond = torch.randn(1, 4, 8, 8, 8), torch.rand(1, 5, 32, 32, 32)
        expected = controlnet(x=x, timesteps=torch.tensor([10]), controlnet_cond=cond)
        with conditioning_embedded_once(controlnet, cond):
            once = [controlnet(x=x, timesteps=torch.tensor([t]), controlnet_cond=cond) for t in (10, 500)]
        assert not torch.allclose(once[0][1], once[1][1])  # the timestep still matters
    for got, want in zip(once[0][0] + [once[0][1]], expected[0] + [expected[1]], strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert not hasattr(controlnet.controlnet_cond_embedding, "embedding")  # the real module is back


def _bad_masks(folder: Path) -> dict[str, Path]:
    """One file per kind of bad mask the command must refuse."""
    label = toy_label()
    bad = {
        "corrupt": folder / "corrupt.nii.gz",
        "not 3D": write_nifti(folder / "four_d.nii.gz", np.stack([label, label], axis=-1)),
        "unknown label": write_nifti(folder / "unknown.nii.gz", np.where(label == 4, 7, label).astype(np.uint8)),
        "non-integer": write_nifti(folder / "fraction.nii.gz", label.astype(np.float32) * 0.5),
        "NaN": write_nifti(folder / "nan.nii.gz", np.where(label == 4, np.nan, label).astype(np.float32)),
        "all background": write_nifti(folder / "empty.nii.gz", np.zeros_like(label)),
        "not NIfTI": folder / "mask.txt",
    }
    bad["corrupt"].write_bytes(b"\x1f\x8b not really gzip")
    bad["not NIfTI"].write_text("1 2 3")
    return {k: Path(v) for k, v in bad.items()}


@pytest.mark.parametrize(
    "kind", ["corrupt", "not 3D", "unknown label", "non-integer", "NaN", "all background", "not NIfTI"]
)
def test_bad_mask_is_one_error_naming_it_and_nothing_is_written(kind, weights, tmp_path):
    bad = _bad_masks(tmp_path / "bad")[kind]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"label": str(bad)}]}))
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["ddpm"], datalist=str(datalist))
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and str(bad) in str(error) and "\n" not in str(error)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging-*"))


@pytest.mark.parametrize("which", ["missing", "wrong network", "wrong UNet"])
def test_bad_weights_are_one_error_naming_the_file(which, weights, mask_dir, tmp_path):
    chosen = dict(weights["ddpm"])
    if which == "missing":
        chosen["controlnet_path"] = str(tmp_path / "nowhere.pt")
        named = chosen["controlnet_path"]
    elif which == "wrong network":
        chosen["diffusion_unet_path"] = chosen["autoencoder_path"]
        named = chosen["autoencoder_path"]
    else:  # a ControlNet trained beside another UNet
        chosen["controlnet_path"] = weights["rflow"]["controlnet_path"]
        named = chosen["controlnet_path"]
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", chosen, mask_dir=str(mask_dir))
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and named in str(error)
    assert not (tmp_path / "out").exists()


def test_weights_that_differ_from_large_files_yml_are_refused(weights, tmp_path, monkeypatch):
    import scripts.core.checkpoints as checkpoints

    listed = tmp_path / "large_files.yml"
    shutil.copy(weights["ddpm"]["autoencoder_path"], tmp_path / "autoencoder.pt")
    listed.write_text(
        'large_files:\n- path: "autoencoder.pt"\n  url: ""\n  hash_val: "' + "0" * 64 + '"\n  hash_type: "sha256"\n'
    )
    monkeypatch.setattr(checkpoints, "LARGE_FILES", str(listed))
    with pytest.raises(BundleInputError, match="sha256 listed in large_files.yml"):
        checkpoints.load_checkpoint(str(tmp_path / "autoencoder.pt"), "autoencoder weights")
    listed.write_text(listed.read_text().replace("0" * 64, checkpoints.file_hash(str(tmp_path / "autoencoder.pt"))))
    assert "autoencoder" in checkpoints.load_checkpoint(str(tmp_path / "autoencoder.pt"), "autoencoder weights")


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(weights, mask_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(Exception) as caught:
        infer(out, weights["ddpm"], mask_dir=str(mask_dir))
    assert "--overwrite true" in str(find_input_error(caught.value))
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(Exception) as caught:  # a folder the bundle did not write is never replaced
        infer(out, weights["ddpm"], mask_dir=str(mask_dir), overwrite=True)
    assert "not a folder this bundle wrote" in str(find_input_error(caught.value))
    assert (out / "mine.txt").read_text() == "keep me"
    ours = infer(tmp_path / "ours", weights["ddpm"], mask_dir=str(mask_dir))
    (ours / "added.txt").write_text("written into the published folder later")
    with pytest.raises(Exception) as caught:  # a file the bundle did not publish there is never deleted
        infer(ours, weights["ddpm"], mask_dir=str(mask_dir), overwrite=True)
    assert "holds files the bundle did not publish there (added.txt)" in str(find_input_error(caught.value))
    assert (ours / "added.txt").exists()
    (ours / "added.txt").unlink()
    (ours / "pairs.json").write_text("{}")  # a published file, changed: still the bundle's to replace
    infer(ours, weights["ddpm"], mask_dir=str(mask_dir), overwrite=True)
    assert (ours / "pairs.json").read_text() != "{}"
    # the mask folder itself (or its parent) as output: the inputs are never deleted
    masks = tmp_path / "masks"
    shutil.copytree(mask_dir, masks)
    (masks / ".3d-lldm-output.json").write_text("{}")
    before = sorted(p.name for p in masks.iterdir())
    for target in (masks, tmp_path):
        with pytest.raises(Exception) as caught:
            infer(target, weights["ddpm"], mask_dir=str(masks), overwrite=True)
        assert "holds an input of this command" in str(find_input_error(caught.value))
    assert sorted(p.name for p in masks.iterdir()) == before


@pytest.mark.slow
def test_one_bad_mask_among_good_ones_stops_the_command_before_any_output(weights, mask_dir, tmp_path):
    """Policy: every mask is checked first; one bad mask is one error line, exit 1, no output."""
    masks = tmp_path / "masks"
    shutil.copytree(mask_dir, masks)
    bad = _bad_masks(tmp_path / "bad")["unknown label"]
    shutil.copy(bad, masks / "zz_bad.nii.gz")
    args = [
        "inference",
        "--config_file",
        str(INFERENCE_CONFIG),
        "--mask_dir",
        str(masks),
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--num_inference_steps",
        "2",
    ]
    for key, value in {**TINY, **weights["ddpm"]}.items():
        args += [f"--{key}", str(value)]
    result = run_bundle(*args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "zz_bad.nii.gz" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_command_runs_from_another_folder_with_bundle_root(weights, mask_dir, tmp_path):
    """Absolute config paths, --bundle_root and the package on PYTHONPATH: the command works from any folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    files = layered_config_files(str(BUNDLE_ROOT / "configs" / "inference.yaml"))
    args = [
        "inference",
        "--config_file",
        str(files),
        "--bundle_root",
        str(BUNDLE_ROOT),
        "--mask_dir",
        str(mask_dir),
        "--device",
        "cpu",
        "--num_inference_steps",
        "2",
    ]
    for key, value in {**TINY, **weights["ddpm"]}.items():
        args += [f"--{key}", str(value)]
    result = run_bundle(
        *args, "--output_dir", str(tmp_path / "out"), cwd=elsewhere, env={"PYTHONPATH": str(BUNDLE_ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_image.nii.gz"))
    assert not any(elsewhere.iterdir())  # nothing written relative to the working directory
    # without the package on the path: one line saying what to set, nothing generated
    result = run_bundle(*args, "--output_dir", str(tmp_path / "out2"), cwd=elsewhere, env={"PYTHONPATH": ""})
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and f"PYTHONPATH={BUNDLE_ROOT}" in errors[0]
    assert not (tmp_path / "out2").exists()


def test_unwritable_output_folder_is_one_error(weights, mask_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(Exception) as caught:
        infer(blocker / "out", weights["ddpm"], mask_dir=str(mask_dir))
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and str(blocker) in str(error)


def test_mask_editing_writes_the_edited_map_with_hcc_inside_the_liver(weights, tmp_path):
    affine = np.diag([-4.0, -4.0, 6.0, 1.0])
    big = np.zeros((56, 48, 24), dtype=np.uint8)
    big[8:48, 6:42, 4:20] = 1  # a liver block wide enough for a 20 mm nodule away from its vessels
    big[10:46, 20, 12] = 2
    write_nifti(tmp_path / "masks" / "case.nii.gz", big, affine)
    out = infer(
        tmp_path / "out",
        weights["ddpm"],
        mask_dir=str(tmp_path / "masks"),
        mask_editing={"insert_hcc_diameters_mm": [20.0]},
    )
    edited = np.asanyarray(nib.load(out / "case_label.nii.gz").dataobj)
    assert set(np.unique(edited)) <= {0, 1, 2, 4} and (edited == 4).sum() > 20
    assert np.all(big[edited == 4] == 1)  # the nodule replaced parenchyma only
    assert np.array_equal(edited == 2, big == 2) and np.array_equal(edited > 0, big > 0)
    record = json.loads((out / "pairs.json").read_text())["pairs"][0]
    assert len(record["edits"]["hcc_inserted"]) == 1


@pytest.mark.slow
def test_demo_weights_give_the_hbp_pattern_on_unseen_masks(tmp_path):
    """The README's main job: shipped weights, bundled demo masks (not in the training set), default
    sampler. Pooled over the volumes, liver parenchyma is brighter than HCC and than each vessel."""
    os.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=INFERENCE_CONFIG,
        workflow_type="infer",
        run_id="inference",
        output_dir=str(tmp_path / "demo"),
        device="$torch.device('cpu')",
    )
    workflow.initialize()
    workflow.run()
    sums, counts = np.zeros(5), np.zeros(5)
    masks = sorted((BUNDLE_ROOT / "datasets" / "demo_masks").glob("*.nii.gz"))
    assert len(masks) == 4
    for mask in masks:
        name = mask.name[: -len(".nii.gz")]
        label = np.asanyarray(nib.load(tmp_path / "demo" / f"{name}_label.nii.gz").dataobj).astype(int)
        image = np.asanyarray(nib.load(tmp_path / "demo" / f"{name}_image.nii.gz").dataobj)
        sums += np.bincount(label.ravel(), weights=image.ravel(), minlength=5)
        counts += np.bincount(label.ravel(), minlength=5)
    means = dict(zip(LABELS, sums / np.maximum(counts, 1), strict=True))
    assert counts[4] > 0 and counts[2] > 0 and counts[3] > 0
    for darker in ("hcc", "portal_vein", "hepatic_vein"):
        assert means["liver"] > means[darker], means


def test_onednn_convolutions_give_the_same_output_and_are_restored():
    """Sampling runs the networks' 3D convolutions on oneDNN (much faster for one small volume on
    CPU); the results match the default kernels and the layers are restored afterwards."""
    from scripts.generation.sampler import onednn_conv3d

    torch.manual_seed(0)
    unet = common_parser().get_parsed_content("diffusion_unet_def", instantiate=True).eval()
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    with torch.no_grad():
        for parameter in unet.parameters():  # MONAI zero-initialises the output layer: make it matter
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
        expected = unet(x, t)
        assert expected.abs().mean() > 1e-3
        with onednn_conv3d(unet):
            assert any("_conv_forward" in vars(m) for m in unet.modules()) or not torch.backends.mkldnn.is_available()
            fast = unet(x, t)
        # the same network twice (e.g. a UNet guiding itself) is switched once and restored once
        with onednn_conv3d(unet, unet):
            twice = unet(x, t)
    assert torch.allclose(fast, expected, atol=1e-5) and torch.allclose(twice, fast)
    assert not any("_conv_forward" in vars(m) for m in unet.modules())


@pytest.mark.parametrize("enabled", [True, False])
def test_onednn_convolutions_setting_switches_the_sampling_kernels(enabled, weights, mask_dir, tmp_path):
    os.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=INFERENCE_CONFIG,
        workflow_type="infer",
        output_dir=str(tmp_path / "out"),
        mask_dir=str(mask_dir),
        onednn_convolutions=str(enabled).lower(),  # as the command line passes it
        num_inference_steps=2,
        **{"device": "$torch.device('cpu')", **TINY, **weights["ddpm"]},
    )
    sampler = workflow.parser.get_parsed_content("latent_sampler")
    seen = []
    layer = next(m for m in sampler.unet.modules() if isinstance(m, torch.nn.Conv3d))
    handle = layer.register_forward_pre_hook(lambda m, i: seen.append("_conv_forward" in vars(m)))
    label = torch.zeros(1, 1, *TINY["spatial_size"])
    label[..., 8:24, 8:24, 8:24] = 1
    sampler.sample_latents([0], label)
    handle.remove()
    assert seen and all(s == (enabled and torch.backends.mkldnn.is_available()) for s in seen)


def test_overwrite_false_as_text_keeps_the_folder_and_an_unknown_word_is_refused(weights, mask_dir, tmp_path):
    """The command line hands `--overwrite false` over as text, which Python treats as true."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for word in ("false", "no", "0"):
        with pytest.raises(Exception) as caught:
            infer(out, weights["ddpm"], mask_dir=str(mask_dir), overwrite=word)
        assert "--overwrite true" in str(find_input_error(caught.value))
        assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "other", weights["ddpm"], mask_dir=str(mask_dir), save_preview="maybe")
    assert "'save_preview'" in str(find_input_error(caught.value)) and not (tmp_path / "other").exists()
    quiet = infer(
        tmp_path / "quiet", weights["ddpm"], mask_dir=str(mask_dir), save_preview="no", quality_gate_enabled="no"
    )
    assert not list(quiet.glob("*_preview.png"))
    assert all("quality_gate" not in record for record in json.loads((quiet / "pairs.json").read_text())["pairs"])


def test_quality_gate_regenerates_a_failing_volume_with_new_recorded_seeds(weights, tmp_path):
    """A gate no volume can pass (contrast 1 on a [0, 1] scale): every output is tried max_tries
    times with distinct seeds, the best attempt is kept and pairs.json says it failed."""
    label, affine = _lps_mask()
    write_nifti(tmp_path / "masks" / "case.nii.gz", label, affine)
    out = infer(
        tmp_path / "out",
        weights["ddpm"],
        mask_dir=str(tmp_path / "masks"),
        quality_gate_settings={"min_contrast": 1.0, "min_class_voxels": 1, "max_tries": 3},
    )
    record = json.loads((out / "pairs.json").read_text())["pairs"][0]
    gate = record["quality_gate"]
    seeds = [attempt["seed"] for attempt in gate["attempts"]]
    assert gate["passed"] is False and gate["tries"] == 3 and len(set(seeds)) == 3
    assert seeds[0] == output_seed(0, "case", 0) and seeds[1:] == [output_seed(0, "case", 0, k) for k in (1, 2)]
    best = max(gate["attempts"], key=lambda attempt: attempt["margin"])
    assert record["seed"] == best["seed"]
    # the kept image is the one generated with the recorded seed
    kept = np.asanyarray(nib.load(out / "case_image.nii.gz").dataobj)
    first = infer(tmp_path / "first", weights["ddpm"], mask_dir=str(tmp_path / "masks"), quality_gate_enabled=False)
    assert np.array_equal(kept, np.asanyarray(nib.load(first / "case_image.nii.gz").dataobj)) == (
        record["seed"] == seeds[0]
    )


def test_the_quality_gate_judges_the_model_grid_image_before_the_output_mapping(weights, tmp_path):
    """pairs.json records the contrasts of the image the sampler made on the model grid (its [0, 1] scale),
    not of the volume resampled onto the mask's grid and mapped onto output_intensity_range."""
    label, affine = _lps_mask()
    path = write_nifti(tmp_path / "masks" / "case.nii.gz", label, affine)
    workflow = inference_workflow(
        tmp_path / "out",
        weights["ddpm"],
        mask_dir=str(tmp_path / "masks"),
        output_intensity_range=[0, 1000],
        quality_gate_settings={"min_contrast": 0.0, "min_class_voxels": 1, "max_tries": 1},
    )
    workflow.run()
    record = json.loads((tmp_path / "out" / "pairs.json").read_text())["pairs"][0]
    generator = workflow.parser.get_parsed_content("generator")
    _, on_model_grid, _ = generator.on_grids(generator.read(str(path))[0], affine)
    generated = generator.sample(on_model_grid, record["seed"], torch.device("cpu"))
    expected = workflow.parser.get_parsed_content("quality_gate")(
        generated[0].numpy(), on_model_grid[0].numpy().astype(np.int64)
    )
    assert expected["contrast"] and record["quality_gate"]["attempts"][0]["contrast"] == expected["contrast"]
    assert all(abs(c) <= 1 for c in expected["contrast"].values())


def test_a_refining_decoder_generates_on_the_finer_grid_aligned_with_the_model_grid(weights, tmp_path):
    """--decoder_upsampling 1 with a refining label-guided autoencoder over the UNet's latent space: the volume is
    decoded on the 2x finer grid (the mask resampled there from the file), judged there, then written on the mask's
    own grid like any other."""
    from scripts.generation.inference import refinement

    plain = torch.load(weights["ddpm"]["autoencoder_path"], weights_only=True)["autoencoder"]
    torch.manual_seed(0)
    refining = common_parser(label_guided_decoder=True, decoder_upsampling=1).get_parsed_content(
        "autoencoder_def", instantiate=True
    )
    encoder = {k: v for k, v in plain.items() if not k.startswith(("decoder.", "post_quant_conv."))}
    assert not refining.load_state_dict(encoder, strict=False).unexpected_keys  # the UNet's latent space
    torch.save({"autoencoder": refining.state_dict()}, tmp_path / "refining.pt")
    label, affine = _lps_mask()
    write_nifti(tmp_path / "masks" / "case.nii.gz", label, affine)
    settings = {**weights["ddpm"], "autoencoder_path": str(tmp_path / "refining.pt"), "label_guided_decoder": True}
    workflow = inference_workflow(
        tmp_path / "out",
        settings,
        mask_dir=str(tmp_path / "masks"),
        decoder_upsampling=1,
        quality_gate_settings={"min_contrast": 0.0, "min_class_voxels": 1, "max_tries": 1},
    )
    workflow.run()
    record = json.loads((tmp_path / "out" / "pairs.json").read_text())["pairs"][0]
    written = nib.load(tmp_path / "out" / "case_image.nii.gz")
    assert written.shape == label.shape and np.allclose(written.affine, affine)

    generator = workflow.parser.get_parsed_content("generator")
    _, on_model_grid, on_decode_grid = generator.on_grids(
        generator.read(str(tmp_path / "masks" / "case.nii.gz"))[0], affine
    )
    assert on_decode_grid.shape[1:] == tuple(2 * s for s in on_model_grid.shape[1:])
    torch.testing.assert_close(
        torch.as_tensor(on_decode_grid.affine, dtype=torch.float64),
        torch.as_tensor(on_model_grid.affine, dtype=torch.float64) @ refinement(2),
    )
    generated = generator.sample(on_model_grid, record["seed"], torch.device("cpu"), on_decode_grid)
    assert generated.shape[1:] == on_decode_grid.shape[1:]
    image, level = generator.deliver(generated, on_decode_grid, generator.on_grids(label, affine)[0], record["seed"])
    np.testing.assert_allclose(np.asanyarray(written.dataobj), image, atol=1e-6)
    assert record["acquisition_noise"] == pytest.approx(level, abs=1e-5) and 0.025 <= level <= 0.045
    gate = workflow.parser.get_parsed_content("quality_gate")
    verdict = gate(generated[0].numpy(), on_decode_grid[0].numpy().astype(np.int64))
    assert record["quality_gate"]["attempts"][0]["contrast"] == verdict["contrast"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_steps_use_the_prediction_type_the_unet_was_trained_with(prediction_type, weights, tmp_path):
    os.chdir(BUNDLE_ROOT)
    unet = write_unet(tmp_path / "unet.pt", Path(weights["ddpm"]["autoencoder_path"]), prediction_type=prediction_type)
    controlnet = write_controlnet(tmp_path / "controlnet.pt", unet)
    guide = write_unet(
        tmp_path / "guide.pt", Path(weights["ddpm"]["autoencoder_path"]), 1, prediction_type=prediction_type
    )
    for sampler in ("ddim", "ddpm"):
        workflow = ConfigWorkflow(
            config_file=INFERENCE_CONFIG,
            workflow_type="infer",
            run_id="inference",
            sampler=sampler,
            output_dir=str(tmp_path / "out"),
            device="$torch.device('cpu')",
            **TINY,
            **{
                **weights["ddpm"],
                "diffusion_unet_path": str(unet),
                "controlnet_path": str(controlnet),
                "autoguidance_unet_path": str(guide),
            },
        )
        workflow.initialize()
        assert workflow.parser.get_parsed_content("scheduler").prediction_type == prediction_type


@pytest.mark.parametrize(
    "setting,value,expected",
    [
        ("seed", -1, "config 'seed': expected an integer >= 0, got -1"),
        ("num_inference_steps", "abc", "config 'num_inference_steps': expected an integer >= 1 or null, got 'abc'"),
        ("num_samples_per_mask", 0, "config 'num_samples_per_mask': expected an integer >= 1, got 0"),
        ("conditioning_scale", "abc", "config 'conditioning_scale': expected a number >= 0.0, got 'abc'"),
        ("output_intensity_range", [0], "config 'output_intensity_range': expected a list of 2 numbers or null"),
        ("label_map", [1, 2], "config 'label_map': expected a dict or null, got [1, 2]"),
        ("mask_editing", "hcc", "config 'mask_editing': expected a dict or null, got 'hcc'"),
        ("sampler", "euler", "config 'sampler': expected one of ddpm, ddim, rflow or null, got 'euler'"),
        ("autoguidance_weight", 0.5, "config 'autoguidance_weight'"),
        ("device", "cuda:7" if not torch.cuda.is_available() else "nonsense", "config 'device'"),
    ],
)
def test_bad_settings_are_one_error_before_any_work(setting, value, expected, weights, mask_dir, tmp_path):
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", weights["ddpm"], mask_dir=str(mask_dir), **{setting: value})
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and expected in str(error) and "\n" not in str(error)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


def test_null_on_the_command_line_turns_list_settings_off(weights, mask_dir, tmp_path):
    """`--output_intensity_range null --acquisition_noise null` arrive as the text 'null': both are off."""
    out = infer(
        tmp_path / "out",
        weights["ddpm"],
        mask_dir=str(mask_dir),
        output_intensity_range="null",
        acquisition_noise="null",
    )
    records = json.loads((out / "pairs.json").read_text())["pairs"]
    assert records and all("acquisition_noise" not in r for r in records)
    image = np.asanyarray(nib.load(out / records[0]["image"]).dataobj)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_comparison_figure_puts_each_real_image_beside_the_one_generated_from_its_mask(
    weights, tiny_phantoms, tmp_path
):
    from scripts.tools.figures import save_comparison_figure

    datalist = tiny_phantoms / "datalist.json"
    out = infer(
        tmp_path / "out", weights["ddpm"], datalist=str(datalist), dataset_dir=str(tiny_phantoms), section="training"
    )
    figure = save_comparison_figure(str(out), str(datalist), str(tiny_phantoms), str(tmp_path / "cmp.png"))
    assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(figure).stat().st_size > 5_000
    other = json.loads(datalist.read_text())
    other["training"], other["validation"], other["test"] = other["test"], other["test"], other["test"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="no pair was generated from a mask of"):  # masks from elsewhere
        save_comparison_figure(str(out), str(tmp_path / "other.json"), str(tiny_phantoms), str(tmp_path / "x.png"))


def _write_label_guided(path: Path, plain: str, modulation: float) -> Path:
    """A label-guided autoencoder started from ``plain``; ``modulation`` > 0 makes the label map matter."""
    network = common_parser(label_guided_decoder=True).get_parsed_content("autoencoder_def", instantiate=True)
    load_initial_autoencoder(network, plain)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if modulation and (".mlp_gamma.conv.weight" in name or ".mlp_beta.conv.weight" in name):
                parameter.copy_(modulation * torch.randn(parameter.shape, generator=generator))
    torch.save({"autoencoder": network.state_dict()}, path)
    return path


@pytest.mark.slow
def test_label_guided_decoder_decodes_each_latent_with_its_mask(pairs, weights, mask_dir, tmp_path):
    plain = weights["ddpm"]["autoencoder_path"]
    same = _write_label_guided(tmp_path / "same.pt", plain, 0.0)
    guided = {**weights["ddpm"], "autoencoder_path": str(same)}
    started = infer(tmp_path / "started", guided, mask_dir=str(mask_dir), label_guided_decoder=True)
    # a fresh label-guided decoder is the plain decoder: the same pairs, so the mask reached each decode
    for path in sorted(pairs.glob("*_image.nii.gz")):
        first = np.asanyarray(nib.load(path).dataobj)
        np.testing.assert_allclose(np.asanyarray(nib.load(started / path.name).dataobj), first, atol=1e-5)
    modulated = {**weights["ddpm"], "autoencoder_path": str(_write_label_guided(tmp_path / "lg.pt", plain, 0.05))}
    changed = infer(tmp_path / "changed", modulated, mask_dir=str(mask_dir), label_guided_decoder=True)
    for path in sorted(pairs.glob("*_image.nii.gz")):
        first = np.asanyarray(nib.load(path).dataobj)
        assert not np.allclose(np.asanyarray(nib.load(changed / path.name).dataobj), first, atol=1e-3)

    with pytest.raises(RuntimeError) as err:  # a label-guided file needs the setting, and the reverse
        infer(tmp_path / "unset", modulated, mask_dir=str(mask_dir))
    assert "a label-guided autoencoder; pass --label_guided_decoder true" in str(find_input_error(err.value))
    with pytest.raises(RuntimeError) as err:
        infer(tmp_path / "plain", weights["ddpm"], mask_dir=str(mask_dir), label_guided_decoder=True)
    assert "a plain autoencoder, but --label_guided_decoder is true" in str(find_input_error(err.value))
    assert not (tmp_path / "unset").exists() and not (tmp_path / "plain").exists()


@pytest.mark.parametrize("config", ["configs/inference.yaml", "configs/generate_unconditional.yaml"])
def test_samplers_undo_the_latent_centring_the_unet_was_trained_with(config, weights, mask_dir, tmp_path):
    os.chdir(BUNDLE_ROOT)
    shift = [0.5, -0.25, 0.0, 0.125]
    unet = write_unet(tmp_path / "unet.pt", Path(weights["ddpm"]["autoencoder_path"]), latent_shift=shift)
    controlnet = write_controlnet(tmp_path / "controlnet.pt", unet)
    settings = {**weights["ddpm"], "diffusion_unet_path": str(unet), "controlnet_path": str(controlnet)}
    settings["autoguidance_weight"] = 1  # the guide of `weights` has no shift: it cannot guide this UNet
    workflow = ConfigWorkflow(
        config_file=layered_config_files(config),
        workflow_type="infer",
        output_dir=str(tmp_path / "out"),
        mask_dir=str(mask_dir),
        **{"device": "$torch.device('cpu')", **TINY, **settings},
    )
    sampler = workflow.parser.get_parsed_content("latent_sampler")
    torch.testing.assert_close(sampler.latent_shift.flatten(), torch.tensor(shift))
    # weights from before centring carry no shift: decoded as they were trained
    workflow.parser["diffusion_unet_path"] = weights["ddpm"]["diffusion_unet_path"]
    legacy = workflow.parser.get_parsed_content("latent_sampler", lazy=False)
    assert legacy.latent_shift is None


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*_image.nii.gz"))}


def test_autoguidance_extrapolates_from_the_guide_to_the_unet(weights, tmp_path):
    """guide + weight x (unet - guide), the ControlNet's residuals given to both networks."""
    parser = common_parser()
    unet, guide = (parser.get_parsed_content("diffusion_unet_def", lazy=False) for _ in range(2))
    load_diffusion_unet(unet, weights["ddpm"]["diffusion_unet_path"], "ddpm", None)
    load_diffusion_unet(guide, weights["ddpm"]["autoguidance_unet_path"], "ddpm", None)
    controlnet = parser.get_parsed_content("controlnet_def", lazy=False)
    load_network_weights(controlnet, weights["ddpm"]["controlnet_path"], "controlnet", "ControlNet weights")
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    condition = torch.rand(1, len(LABELS), 32, 32, 32)
    with torch.no_grad():
        down, mid = controlnet(x=x, timesteps=t, controlnet_cond=condition)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        expected = guide(x, t, **residuals) + 2.0 * (unet(x, t, **residuals) - guide(x, t, **residuals))
        torch.testing.assert_close(AutoGuidedUNet(unet, guide, 2.0)(x, t, **residuals), expected)
        assert torch.equal(AutoGuidedUNet(unet, guide, 1.0)(x, t, **residuals), unet(x, t, **residuals))
        # the residuals reach the guide too: without them its share of the result changes
        assert not torch.allclose(AutoGuidedUNet(unet, guide, 2.0)(x, t), expected)


@pytest.mark.slow
def test_autoguidance_changes_the_images_and_a_guide_equal_to_the_unet_changes_nothing(weights, mask_dir, tmp_path):
    os.chdir(BUNDLE_ROOT)
    chosen = weights["ddpm"]
    unguided = _images(infer(tmp_path / "off", chosen, mask_dir=str(mask_dir), autoguidance_weight=1.0))
    guided = _images(infer(tmp_path / "on", chosen, mask_dir=str(mask_dir), autoguidance_weight=2.0))
    itself = {**chosen, "autoguidance_unet_path": chosen["diffusion_unet_path"]}
    self_guided = _images(infer(tmp_path / "self", itself, mask_dir=str(mask_dir), autoguidance_weight=3.0))
    assert unguided.keys() == guided.keys() == self_guided.keys() and unguided
    for name, image in unguided.items():
        assert not np.allclose(image, guided[name], atol=1e-3)
        np.testing.assert_allclose(self_guided[name], image, atol=1e-5)
    # weight 1 never loads the guide, so a missing guide file does not matter
    missing = {**chosen, "autoguidance_unet_path": str(tmp_path / "nowhere.pt")}
    again = _images(infer(tmp_path / "again", missing, mask_dir=str(mask_dir), autoguidance_weight=1.0))
    assert all(np.array_equal(again[name], image) for name, image in unguided.items())


@pytest.mark.parametrize(
    "kind", ["missing", "other schedule", "other target", "other scale", "other shift", "other encoder"]
)
def test_a_guide_that_cannot_guide_the_unet_is_one_error_naming_it(kind, weights, mask_dir, tmp_path):
    autoencoder = Path(weights["ddpm"]["autoencoder_path"])
    guide = tmp_path / "guide.pt"
    if kind == "missing":
        pass
    elif kind == "other schedule":
        write_unet(guide, autoencoder, seed=1, noise_schedule="rflow")
    elif kind == "other target":
        write_unet(guide, autoencoder, seed=1, prediction_type="epsilon")
    elif kind == "other scale":
        write_unet(guide, autoencoder, seed=1, scale_factor=2.5)
    elif kind == "other shift":  # trained on centred latents, the UNet on uncentred ones
        write_unet(guide, autoencoder, seed=1, latent_shift=[0.5, 0.0, 0.0, 0.0])
    else:
        write_unet(guide, write_autoencoder(tmp_path / "other_autoencoder.pt", seed=5), seed=1)
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "out", {**weights["ddpm"], "autoguidance_unet_path": str(guide)}, mask_dir=str(mask_dir))
    error = find_input_error(caught.value)
    assert isinstance(error, BundleInputError) and str(guide) in str(error) and "\n" not in str(error)
    assert not (tmp_path / "out").exists()


def test_unconditional_sampling_guides_with_the_same_guide(weights, tmp_path):
    os.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=layered_config_files("configs/generate_unconditional.yaml"),
        workflow_type="infer",
        output_dir=str(tmp_path / "out"),
        **{"device": "$torch.device('cpu')", **TINY, **weights["ddpm"]},
    )
    sampler = workflow.parser.get_parsed_content("latent_sampler")
    workflow.parser.get_parsed_content("weights")
    reference = torch.load(weights["ddpm"]["autoguidance_unet_path"], weights_only=True)["diffusion_unet"]
    loaded = sampler.guide_unet.state_dict()
    assert sampler.autoguidance_weight == float(workflow.parser["autoguidance_weight"]) > 1.0
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    workflow.parser["autoguidance_weight"] = 1.0
    assert workflow.parser.get_parsed_content("latent_sampler", lazy=False).guide_unet is None
