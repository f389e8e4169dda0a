# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluation (configs/evaluate.yaml): FID under both protocols and every extractor kind, MS-SSIM
diversity, mask fidelity with a segmentation checkpoint, the report, the errors on bad input, and
the unconditional baseline's generation (configs/generate_unconditional.yaml).

Weights are seeded random networks saved in the layouts real checkpoints use, so the real loading
paths run; volumes are the tiny phantoms on the tiny grid."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, run_bundle, write_nifti
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from stage_helpers import TINY, common_parser, one_thread, write_autoencoder, write_unet  # noqa: F401

from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.settings import layered_config_files
from scripts.data.cases import read_nifti
from scripts.data.labels import LABELS, LabelContract
from scripts.data.pairs import find_pairs
from scripts.evaluation.delivered import DELIVERED_MEASURES
from scripts.evaluation.diversity import PairwiseMsSsim, ms_ssim_weights
from scripts.evaluation.evaluation import (
    NO_SEGMENTER_NOTICE,
    REALISM_COLUMNS,
    Evaluation,
    load_segmenter,
    real_volume_set,
)
from scripts.evaluation.fid import Fid3D, Fid25D, SegmentationFeatures, build_fid_extractor, frechet_distance
from scripts.generation.inference import refinement
from scripts.models.autoencoder import load_initial_autoencoder
from scripts.networks.feature_networks import build_feature_network

CONFIG = layered_config_files("configs/evaluate.yaml")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A stage-1 autoencoder, 2D/3D feature networks in their checkpoint layouts, a segmentation checkpoint."""
    root = tmp_path_factory.mktemp("eval_weights")
    torch.manual_seed(0)
    files = {"autoencoder": write_autoencoder(root / "autoencoder.pt")}
    files["radimagenet"] = root / "radimagenet.pth"
    torch.save(build_feature_network("radimagenet_resnet50").state_dict(), files["radimagenet"])
    files["medicalnet"] = root / "medicalnet10.pth"  # MedicalNet's DataParallel layout
    torch.save(
        {
            "state_dict": {
                f"module.{k}": v for k, v in build_feature_network("medicalnet_resnet10").state_dict().items()
            }
        },
        files["medicalnet"],
    )
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / c) for c in CONFIG])
    os.chdir(BUNDLE_ROOT)
    segmenter = parser.get_parsed_content("networks#unet")()
    files["segmentation"] = root / "segmentation_unet_best.pt"
    torch.save(
        {"model": segmenter.state_dict(), "network": "unet", "labels": LABELS, "epoch": 1}, files["segmentation"]
    )
    return files


@pytest.fixture(scope="module")
def volumes(tiny_phantoms) -> list[torch.Tensor]:
    """The four tiny phantoms on the tiny grid, and their left-right mirror images: 8 volumes (1, 32, 32, 32)."""
    preprocessing = common_parser().get_parsed_content("pair_preprocessing", instantiate=True)
    datalist = json.loads((tiny_phantoms / "datalist.json").read_text())
    items = [e for section in ("training", "validation", "test") for e in datalist[section]]
    images = [preprocessing({k: str(tiny_phantoms / v) for k, v in e.items()})["image"].as_tensor() for e in items]
    return images + [image.flip(1) for image in images]


def _noisy(volumes: list[torch.Tensor], sigma: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [(v + sigma * torch.randn(v.shape, generator=generator)).clamp(0, 1) for v in volumes]


def _protocol(kind: str, weights: dict[str, Path]) -> Fid25D | Fid3D:
    autoencoder = common_parser().get_parsed_content("autoencoder_def", instantiate=True)
    if kind == "2.5d-autoencoder":
        return Fid25D(build_fid_extractor("autoencoder", None, 2, autoencoder, str(weights["autoencoder"])))
    if kind == "3d-autoencoder":
        return Fid3D(build_fid_extractor("autoencoder", None, 3, autoencoder, str(weights["autoencoder"])))
    return Fid3D(build_fid_extractor("medicalnet_resnet10", str(weights["medicalnet"]), 3))


@pytest.mark.parametrize("kind", ["2.5d-autoencoder", "3d-autoencoder", "3d-medicalnet"])
@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(kind, weights, volumes):
    protocol = _protocol(kind, weights)
    real = volumes[:4] if kind.startswith("2.5d") else volumes  # 2.5D: 4 x 32 slices per plane
    reference = [protocol.volume_features(v) for v in real]

    def fid(sigma: float) -> float:
        synthetic = [protocol.volume_features(v) for v in _noisy(real, sigma)] if sigma else reference
        distance = protocol.distance(synthetic, reference)
        return distance["mean"] if isinstance(distance, dict) else distance

    itself, slight, strong = fid(0.0), fid(0.03), fid(0.15)
    assert itself < 1e-6 * strong
    assert 0 < slight < strong


def test_2_5d_fid_is_per_plane_and_their_mean(weights, volumes):
    protocol = _protocol("2.5d-autoencoder", weights)
    features = protocol.volume_features(volumes[0])
    assert set(features) == {"xy", "yz", "zx"} and all(
        f.shape == (32, 112) for f in features.values()
    )  # a row per slice
    distance = Fid25D.distance(
        [protocol.volume_features(v) for v in _noisy(volumes[:2], 0.1)],
        [protocol.volume_features(v) for v in volumes[:2]],
    )
    assert distance["mean"] == pytest.approx(sum(distance[p] for p in ("xy", "yz", "zx")) / 3)


def test_radimagenet_2_5d_features_from_a_local_file(weights, volumes):
    """MAISI's network: loaded from a torchvision-layout file, 2048 pooled features per slice.
    (Its FID is MONAI's FIDMetric as for any extractor; a 2048-wide matrix square root takes ~30 s
    on one CPU thread, so the FID itself is exercised above with the narrower extractors.)"""
    protocol = Fid25D(
        build_fid_extractor("radimagenet_resnet50", str(weights["radimagenet"]), 2), center_slices_ratio=0.25
    )
    clean, again = protocol.volume_features(volumes[0]), protocol.volume_features(volumes[0])
    noisy = protocol.volume_features(_noisy(volumes[:1], 0.1)[0])
    assert all(clean[p].shape == (8, 2048) for p in ("xy", "yz", "zx"))  # central quarter of 32 slices
    assert all(torch.equal(clean[p], again[p]) and not torch.allclose(clean[p], noisy[p]) for p in clean)


def test_fid_with_fewer_samples_than_features_is_finite():
    torch.manual_seed(0)
    real, synthetic = torch.randn(5, 64), torch.randn(5, 64) + 0.5
    assert 0 < frechet_distance(synthetic, real) < float("inf")
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize(
    "network, file, dims", [("medicalnet_resnet10", "radimagenet", 3), ("radimagenet_resnet50", "medicalnet", 2)]
)
def test_weights_of_another_architecture_are_one_clear_error(network, file, dims, weights):
    with pytest.raises(BundleInputError) as caught:
        build_fid_extractor(network, str(weights[file]), dims, setting="fid_weights")
    message = str(caught.value)
    assert (
        "\n" not in message and str(weights[file]) in message and "do not fit" in message and "--fid_weights" in message
    )


def test_networks_of_the_other_dimensionality_and_missing_weights_are_refused(weights, tmp_path):
    with pytest.raises(BundleInputError, match="not supported; use one of segmentation, autoencoder, medicalnet"):
        build_fid_extractor("radimagenet_resnet50", str(weights["radimagenet"]), 3)
    with pytest.raises(BundleInputError, match="needs a local weights file: pass --fid_3d_weights"):
        build_fid_extractor("medicalnet_resnet10", None, 3, setting="fid_3d_weights")
    with pytest.raises(BundleInputError, match="FID weights file not found"):
        build_fid_extractor("medicalnet_resnet10", str(tmp_path / "absent.pth"), 3)


@pytest.mark.parametrize("name", ["unet", "segresnet", "attention_unet", "dynunet", "vnet"])
def test_segmentation_features_come_from_the_encoder_of_any_study_network(name):
    """The default extractor pools the encoder's levels: changing the output layer leaves them as they were."""
    parser = ConfigParser()
    parser.read_config(layered_config_files(str(BUNDLE_ROOT / "configs" / "train_segmentation.yaml")))
    network = parser.get_parsed_content(f"networks#{name}", lazy=False)()
    order = []
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in network.modules()]
    with torch.no_grad():
        network.eval()(torch.rand(1, 1, 32, 32, 32))
    for handle in handles:
        handle.remove()
    convolutions = [m for m in order if isinstance(m, torch.nn.Conv3d)]
    volume, slices = torch.rand(2, 1, 32, 32, 32), torch.rand(3, 1, 32, 32)
    features = {dims: SegmentationFeatures(network, dims) for dims in (2, 3)}
    with torch.no_grad():
        before = features[3].pooled(volume), features[2].pooled(slices)
        convolutions[-1].weight.add_(1.0)  # the output layer
        after = features[3].pooled(volume), features[2].pooled(slices)
        convolutions[0].weight.add_(1.0)  # the first encoder layer
        changed = features[3].pooled(volume)
    assert before[0].shape[0] == 2 and before[1].shape[0] == 3 and before[0].shape[1] == before[1].shape[1] >= 3
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[0], changed)


def test_default_fid_extractor_is_the_real_trained_segmenter():
    network = ConfigParser.load_config_files(layered_config_files(str(BUNDLE_ROOT / "configs" / "evaluate.yaml")))
    assert network["fid_2_5d_network"] == network["fid_3d_network"] == "segmentation"
    with pytest.raises(BundleInputError, match="pass --segmentation_checkpoint, or --fid_3d_network autoencoder"):
        build_fid_extractor("segmentation", None, 3, setting="fid_3d_weights")
    segmenter = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.Conv3d(4, 2, 1))
    extractor = build_fid_extractor("segmentation", None, 2, segmenter=segmenter)
    assert isinstance(extractor, SegmentationFeatures) and extractor.spatial_dims == 2
    assert extractor.pooled(torch.rand(5, 1, 16, 16)).shape == (5, 2)  # both layers at half resolution: the last


# ---------------------------------------------------------------------------------------- diversity
def test_ms_ssim_on_tiny_volumes(volumes):
    assert len(ms_ssim_weights([64] * 3)) == 5 and len(ms_ssim_weights([32] * 3)) == 4  # as many scales as fit
    assert sum(ms_ssim_weights([32] * 3)) == pytest.approx(1.0)
    with pytest.raises(BundleInputError, match="too small"):
        ms_ssim_weights([2, 32, 32])
    same = PairwiseMsSsim(TINY["spatial_size"])
    same.update(volumes[0])
    same.update(volumes[0])
    assert same.compute() == pytest.approx(1.0, abs=1e-4)
    pairs = PairwiseMsSsim(TINY["spatial_size"], max_pairs=2)
    for volume in volumes:
        pairs.update(volume)
    assert pairs.num_pairs == 2 and 0 < pairs.compute() < 0.999


# ---------------------------------------------------------------------------------------- the whole command
def _stem(entry: dict[str, str]) -> str:
    """The output name inference gives the pair of a datalist entry's mask (its file name stem)."""
    return Path(entry["label"]).name.removesuffix(".gz").removesuffix(".nii")


def _write_pairs(
    folder: Path, dataset: Path, noise: float = 0.0, with_labels: bool = True, bright_dark: bool = False
) -> Path:
    """Synthetic sets made from the phantoms themselves, in the inference layout; ``bright_dark``
    paints the vessels and HCC brighter than anything else (a generator that inverts the HBP pattern)."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    rng = np.random.default_rng(0)
    for entry in (e for s in ("training", "validation", "test") for e in datalist[s]):
        image = nib.load(dataset / entry["image"])
        pixels = np.asarray(image.dataobj, dtype=np.float32)
        pixels = pixels + noise * pixels.std() * rng.standard_normal(pixels.shape).astype(np.float32)
        if bright_dark:
            label = np.asarray(nib.load(dataset / entry["label"]).dataobj)
            dark = np.isin(label, [LABELS[c] for c in ("portal_vein", "hepatic_vein", "hcc")])
            pixels[dark] = 2 * pixels.max()
        write_nifti(folder / f"{_stem(entry)}_image.nii.gz", pixels, image.affine)
        if with_labels:
            shutil.copy(dataset / entry["label"], folder / f"{_stem(entry)}_label.nii.gz")
    return folder


def _write_filtered(folder: Path, dataset: Path, filtered) -> Path:
    """The phantoms with each image filtered on its own grid (``filtered(image, label)``), labels kept."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    for entry in (e for s in ("training", "validation", "test") for e in datalist[s]):
        image = nib.load(dataset / entry["image"])
        label = np.asarray(nib.load(dataset / entry["label"]).dataobj)
        write_nifti(
            folder / f"{_stem(entry)}_image.nii.gz",
            filtered(np.asarray(image.dataobj, np.float32), label),
            image.affine,
        )
        shutil.copy(dataset / entry["label"], folder / f"{_stem(entry)}_label.nii.gz")
    return folder


def evaluate(output: Path, dataset: Path, synthetic: dict[str, str], **settings) -> ConfigWorkflow:
    assert Path(os.getcwd()).resolve() == BUNDLE_ROOT
    workflow = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type=None,
        run_id="evaluating",
        output_dir=str(output),
        dataset_dir=str(dataset),
        synthetic=synthetic,
        device="$torch.device('cpu')",
        real_sections=["training", "validation", "test"],
        **TINY,
        **{"decoder_upsampling": 0, **settings},  # the tiny test autoencoders decode on the model grid
    )
    workflow.initialize()
    workflow.run()
    return workflow


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_phantoms, weights) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    sets = {
        "copy": _write_pairs(root / "copy", tiny_phantoms),
        "noisy": _write_pairs(root / "noisy", tiny_phantoms, 0.3),
        "images_only": _write_pairs(root / "images", tiny_phantoms, 0.1, with_labels=False),
        "inverted": _write_pairs(root / "inverted", tiny_phantoms, bright_dark=True),
    }
    os.chdir(BUNDLE_ROOT)
    evaluate(
        root / "out",
        tiny_phantoms,
        {k: str(v) for k, v in sets.items()},
        autoencoder_path=str(weights["autoencoder"]),
        label_guided_decoder=False,
        segmentation_checkpoint=str(weights["segmentation"]),
    )
    return root / "out"


@pytest.mark.slow
@pytest.mark.slow
def test_degraded_copies_of_the_real_set_come_out_worse_through_the_command(tiny_phantoms, weights, tmp_path):
    """The sensitivity the realism measures must have: blur and noise removal lower the texture ratios, a shift
    of the dark structures lowers the contrast, and every FID of a degraded copy exceeds the copy's own (0)."""
    from scipy import ndimage

    dark = [LABELS[c] for c in ("portal_vein", "hepatic_vein", "hcc")]

    def denoised(image, label):
        out = image.copy()
        for value in np.unique(label):  # each class smoothed on its own: edges between classes kept
            mask = (label == value).astype(np.float32)
            smooth = ndimage.gaussian_filter(image * mask, 3.0) / np.maximum(ndimage.gaussian_filter(mask, 3.0), 1e-6)
            out[label == value] = smooth[label == value]
        return out

    def shifted(image, label):
        out, liver, vessels = image.copy(), label == LABELS["liver"], np.isin(label, dark)
        out[vessels] += 0.5 * (image[liver].mean() - image[vessels].mean())
        return out

    filters = {
        "copy": lambda image, label: image,
        "blurred": lambda image, label: ndimage.gaussian_filter(image, 3.0),
        "denoised": denoised,
        "shifted": shifted,
    }
    sets = {name: str(_write_filtered(tmp_path / name, tiny_phantoms, f)) for name, f in filters.items()}
    os.chdir(BUNDLE_ROOT)
    evaluate(
        tmp_path / "out",
        tiny_phantoms,
        sets,
        autoencoder_path=str(weights["autoencoder"]),
        label_guided_decoder=False,
        segmentation_checkpoint=str(weights["segmentation"]),
        classifier_test=None,
    )
    rows = {row["set"]: row for row in json.loads((tmp_path / "out" / "metrics.json").read_text())["table"]}
    for name in ("blurred", "denoised", "shifted"):
        assert rows[name]["fid_2.5d"] > rows["copy"]["fid_2.5d"] + 1e-6 and rows[name]["fid_3d"] > 1e-6, name
    # on the tiny 10 mm grid each degradation shows where it should (measured: blur 0.17-0.54 on every texture
    # ratio; noise removal 0.38 body detail, 0.75 high-frequency share; the shift 0.52 contrast, 0.88 edges)
    assert all(rows["copy"][f"{m}_vs_real"] == pytest.approx(1.0) for m in REALISM_COLUMNS)
    assert all(rows["blurred"][f"{m}_vs_real"] < 0.8 for m in REALISM_COLUMNS)
    assert rows["denoised"]["body_detail_vs_real"] < 0.6 and rows["denoised"]["high_frequency_share_vs_real"] < 0.9
    assert rows["shifted"]["structure_edges_vs_real"] < 0.95
    assert rows["shifted"]["contrast"] < 0.8 * rows["copy"]["contrast"]
    # on the pairs' own grid, each image against the real image of its mask: the copy is real, the degraded
    # copies lose what their degradation removes, and the real image through the model grid and back loses sharpness
    assert all(rows["copy"][f"delivered_{m}"] == pytest.approx(1.0) for m in DELIVERED_MEASURES)
    assert all(rows["blurred"][f"delivered_{m}"] < 0.8 for m in ("liver_grain", "body_detail", "structure_edges"))
    # (measured on the tiny 10 mm grid: blur 0.08-0.39 on these three, noise removal 0.62 liver grain and 0.08
    # body detail, the shift 0.50 contrast, the real image through the model grid and back 0.52-0.64)
    assert rows["denoised"]["delivered_liver_grain"] < 0.7 and rows["denoised"]["delivered_body_detail"] < 0.2
    assert rows["shifted"]["delivered_contrast"] < 0.8 and rows["shifted"]["delivered_hcc_conspicuity"] < 0.8
    assert all(rows["real"][f"delivered_{m}"] < 0.9 for m in ("liver_grain", "body_detail", "structure_edges"))


def test_report_has_one_row_per_set_and_every_metric(report):
    metrics = json.loads((report / "metrics.json").read_text())
    rows = {row["set"]: row for row in metrics["table"]}
    assert list(rows) == ["real", "copy", "noisy", "images_only", "inverted"]
    assert set(metrics["columns"]) >= {
        "fid_2.5d_xy",
        "fid_2.5d_yz",
        "fid_2.5d_zx",
        "fid_2.5d",
        "fid_3d",
        "ms_ssim",
        "dice_liver",
        "dice_portal_vein",
        "dice_hepatic_vein",
        "dice_hcc",
        "contrast",
        "hbp_order",
    }
    assert rows["copy"]["fid_2.5d"] == pytest.approx(0, abs=1e-6) and rows["copy"]["fid_3d"] == pytest.approx(
        0, abs=1e-6
    )
    assert rows["noisy"]["fid_2.5d"] > 1e-4 and rows["noisy"]["fid_3d"] > 1e-4
    assert rows["real"]["fid_2.5d"] is not None  # two halves of the 4 real volumes
    for name in ("real", "copy", "noisy"):  # sets with label maps: Dice of the segmenter, intensities per class
        assert all(0 <= rows[name][f"dice_{c}"] <= 1 for c in ("liver", "portal_vein", "hepatic_vein", "hcc"))
        assert rows[name]["contrast"] is not None
    assert rows["copy"]["dice_liver"] == pytest.approx(rows["real"]["dice_liver"])  # same volumes, same Dice
    assert rows["images_only"]["dice_liver"] is None and rows["images_only"]["contrast"] is None
    assert rows["images_only"]["fid_3d"] is not None and 0 < rows["images_only"]["ms_ssim"] < 1
    intensity = metrics["sets"]["copy"]["intensity"]
    assert intensity["mean"]["liver"] > intensity["mean"]["hcc"]  # HBP: bright liver, dark HCC
    # per volume: every real phantom shows the HBP order of its mask, none of the inverted ones does
    order = {name: metrics["sets"][name]["intensity"]["hbp_order"] for name in ("copy", "inverted")}
    assert order["copy"]["judged"] == order["inverted"]["judged"] >= 2
    assert order["copy"]["ordered"] == order["copy"]["judged"] and rows["copy"]["hbp_order"] == 1.0
    assert order["inverted"]["ordered"] == 0 and rows["inverted"]["hbp_order"] == 0.0
    assert rows["images_only"]["hbp_order"] is None
    assert (
        metrics["protocol"]["fid_3d"]["offline_surrogate"] is True and metrics["protocol"]["fid_3d"]["weights_sha256"]
    )
    # realism: a copy of the real images has their texture exactly, added noise adds high frequencies; the
    # classifier test runs for every set with its folds grouped by mask
    for name in ("liver_grain", "body_detail", "structure_edges", "high_frequency_share"):
        assert rows["copy"][f"{name}_vs_real"] == pytest.approx(1.0) and rows["real"][f"{name}_vs_real"] == 1.0
    assert rows["noisy"]["high_frequency_share_vs_real"] > 1.2  # noise is power at high frequencies
    assert rows["images_only"]["liver_grain_vs_real"] is None  # no label map: no per-class measures
    for name in ("copy", "noisy", "images_only", "inverted"):
        classifier = metrics["sets"][name]["realism"]["classifier_vs_real"]
        assert 0 <= rows[name]["c2st_auc"] <= 1 and classifier["volumes"] == [4, 4] and classifier["folds"] >= 2
    assert rows["real"]["c2st_auc"] is None  # halves of 4 volumes: too few to train on
    table = (report / "metrics.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "fid_2.5d" in table and "c2st_auc" in table
    assert (report / "intensity_histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reconstruction_row_is_the_real_set_through_the_autoencoder(report, tiny_phantoms, weights, tmp_path):
    """--reconstruction_row true adds the decoder's ceiling: each real volume encoded and decoded."""
    copy = {"copy": str(report.parent / "copy")}
    settings = dict(
        autoencoder_path=str(weights["autoencoder"]),
        label_guided_decoder=False,
        fid_2_5d_network=None,
        fid_3d_network=None,
    )
    workflow = evaluate(tmp_path / "out", tiny_phantoms, copy, reconstruction_row=True, **settings)
    rows = {row["set"]: row for row in json.loads((tmp_path / "out" / "metrics.json").read_text())["table"]}
    assert list(rows) == ["real", "copy", "reconstruction"]
    assert rows["reconstruction"]["volumes"] == rows["real"]["volumes"]
    assert rows["reconstruction"]["contrast"] != pytest.approx(rows["real"]["contrast"], abs=1e-4)

    real_set, row_set = (
        workflow.parser.get_parsed_content("real_set"),
        workflow.parser.get_parsed_content("compared_sets")[-1],
    )
    autoencoder = common_parser().get_parsed_content("autoencoder_def", instantiate=True).eval()
    autoencoder.load_state_dict(torch.load(weights["autoencoder"], weights_only=True)["autoencoder"])
    real = real_set.transform(dict(real_set.items[0]))
    with torch.no_grad():
        expected = autoencoder.decode(autoencoder.encode(torch.as_tensor(real["image"])[None])[0])[0].clamp(0, 1)
    passed = row_set.transform(dict(row_set.items[0]))
    torch.testing.assert_close(torch.as_tensor(passed["image"]), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.as_tensor(passed["label"]), torch.as_tensor(real["label"]))  # masks untouched

    with pytest.raises(Exception) as caught:
        evaluate(
            tmp_path / "clash", tiny_phantoms, {"reconstruction": copy["copy"]}, reconstruction_row=True, **settings
        )
    assert "the set name 'reconstruction' is reserved for the reconstruction row" in str(find_input_error(caught.value))


def test_existing_report_is_kept_unless_overwrite(report, tiny_phantoms, weights):
    before = (report / "metrics.json").read_text()
    with pytest.raises(Exception) as caught:
        evaluate(
            report,
            tiny_phantoms,
            {"copy": str(report.parent / "copy")},
            autoencoder_path=str(weights["autoencoder"]),
            label_guided_decoder=False,
            fid_2_5d_network=None,
            fid_3d_network=None,
        )
    assert "not empty" in str(find_input_error(caught.value))
    assert (report / "metrics.json").read_text() == before


def test_without_segmentation_checkpoint_dice_is_null_with_a_notice(caplog):
    with caplog.at_level("WARNING"):
        assert load_segmenter(None, {}, LABELS) is None
    assert NO_SEGMENTER_NOTICE in caplog.text


@pytest.mark.parametrize("problem", ["empty", "missing", "unpaired"])
def test_bad_synthetic_folder_is_one_error_naming_it(problem, tmp_path, tiny_phantoms):
    folder = tmp_path / "set"
    if problem != "missing":
        folder.mkdir()
    if problem == "unpaired":
        _write_pairs(folder, tiny_phantoms)
        next(folder.glob("*_label.nii.gz")).unlink()
    with pytest.raises(BundleInputError) as caught:
        find_pairs(str(folder), labels_required=False)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_sets_on_different_grids_are_one_error(tiny_phantoms, tmp_path):
    parser = common_parser()
    contract = parser.get_parsed_content("label_contract", instantiate=True)
    real = real_volume_set(
        str(tiny_phantoms / "datalist.json"),
        str(tiny_phantoms),
        "test",
        parser.get_parsed_content("pair_preprocessing", instantiate=True),
        contract,
    )
    other = common_parser(spatial_size=[32, 32, 24]).get_parsed_content("pair_preprocessing", instantiate=True)
    mismatched = real_volume_set(
        str(tiny_phantoms / "datalist.json"), str(tiny_phantoms), "validation", other, contract
    )
    mismatched.name = "synthetic"
    evaluation = Evaluation(real, [mismatched], contract, TINY["spatial_size"], TINY["spacing"])
    with pytest.raises(BundleInputError, match=r"set 'synthetic' has \[32, 32, 24\] voxels .* same grid"):
        evaluation.run(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_wrong_weights_is_one_error_line(tiny_phantoms, weights, tmp_path):
    folder = _write_pairs(tmp_path / "set", tiny_phantoms)
    result = run_bundle(
        "evaluating",
        "--config_file",
        str(CONFIG),
        "--dataset_dir",
        str(tiny_phantoms),
        "--synthetic",
        str({"copy": str(folder)}),
        "--output_dir",
        str(tmp_path / "out"),
        "--fid_3d_network",
        "medicalnet_resnet50",
        "--fid_3d_weights",
        str(weights["medicalnet"]),
        "--fid_2_5d_network",
        "null",
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert str(weights["medicalnet"]) in errors[0] and "--fid_3d_weights" in errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- unconditional baseline
def test_unconditional_generation_writes_images_on_the_model_grid(tmp_path):
    os.chdir(BUNDLE_ROOT)
    autoencoder = write_autoencoder(tmp_path / "autoencoder.pt")
    unet = write_unet(tmp_path / "unet.pt", autoencoder)
    recorded = torch.load(unet, weights_only=True)
    recorded["latent_channel_std"] = reference = [0.5, 1.0, 2.0, 4.0]  # as stage 2 records the training latents'
    torch.save(recorded, unet)
    output = tmp_path / "unconditional"
    workflow = ConfigWorkflow(
        config_file=layered_config_files("configs/generate_unconditional.yaml"),
        workflow_type=None,
        run_id="inference",
        output_dir=str(output),
        device="$torch.device('cpu')",
        num_inference_steps=2,
        num_samples=2,
        autoencoder_path=str(autoencoder),
        diffusion_unet_path=str(unet),
        autoguidance_unet_path=str(write_unet(tmp_path / "guide.pt", autoencoder, seed=1)),
        **TINY,
    )
    workflow.initialize()
    workflow.run()
    record = json.loads((output / "samples.json").read_text())
    assert [s["image"] for s in record["samples"]] == ["sample_0000_image.nii.gz", "sample_0001_image.nii.gz"]
    images = [nib.load(output / s["image"]) for s in record["samples"]]
    for image in images:
        assert image.shape == tuple(TINY["spatial_size"])
        assert np.allclose(nib.affines.voxel_sizes(image.affine), TINY["spacing"]) and nib.aff2axcodes(
            image.affine
        ) == ("R", "A", "S")
    pixels = [np.asanyarray(i.dataobj) for i in images]
    assert all(np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1 for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])  # two seeds, two samples
    assert find_pairs(str(output), labels_required=False)[0] == {
        "image": str(output / "sample_0000_image.nii.gz")
    }  # evaluable, no labels
    # the sampled latents' spread per channel, beside the training latents' recorded by stage 2
    spread = record["latent_channel_std"]
    assert len(spread) == 4 and all(s > 0 for s in spread) and record["reference_latent_channel_std"] == reference
    assert record["latent_std_ratio"] == pytest.approx(
        [s / r for s, r in zip(spread, reference, strict=True)], rel=1e-3
    )


@pytest.mark.slow
def test_label_guided_reconstruction_row_decodes_each_volume_with_its_own_mask(
    report, tiny_phantoms, weights, tmp_path
):
    guided = common_parser(label_guided_decoder=True).get_parsed_content("autoencoder_def", instantiate=True)
    load_initial_autoencoder(guided, str(weights["autoencoder"]))
    with torch.no_grad():
        for name, parameter in guided.named_parameters():
            if ".mlp_beta.conv.weight" in name:
                parameter.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "lg.pt"
    torch.save({"autoencoder": guided.state_dict()}, path)
    settings = dict(autoencoder_path=str(path), fid_2_5d_network=None, fid_3d_network=None, label_guided_decoder=True)
    workflow = evaluate(
        tmp_path / "out", tiny_phantoms, {"copy": str(report.parent / "copy")}, reconstruction_row=True, **settings
    )
    real_set, row_set = (
        workflow.parser.get_parsed_content("real_set"),
        workflow.parser.get_parsed_content("compared_sets")[-1],
    )
    real = real_set.transform(dict(real_set.items[0]))
    condition = LabelContract(LABELS).one_hot(torch.as_tensor(real["label"])[None].long()).float()
    with torch.no_grad():
        latent = guided.encode(torch.as_tensor(real["image"])[None])[0]
        expected = guided.decode(latent, condition)[0].clamp(0, 1)
    torch.testing.assert_close(
        torch.as_tensor(row_set.transform(dict(row_set.items[0]))["image"]), expected, rtol=1e-4, atol=1e-4
    )


def test_reconstruction_row_decodes_with_the_main_jobs_decoder_by_default():
    """By default the row shows the ceiling of the decoder inference uses, not of another one."""
    os.chdir(BUNDLE_ROOT)
    chosen = {}
    for config in ("configs/evaluate.yaml", "configs/inference.yaml"):
        parser = ConfigParser()
        parser.read_config(layered_config_files(config))
        chosen[config] = (
            parser.get_parsed_content("autoencoder_path"),
            parser.get_parsed_content("label_guided_decoder"),
            parser.get_parsed_content("decoder_upsampling"),
        )
    assert chosen["configs/evaluate.yaml"] == chosen["configs/inference.yaml"]
    assert chosen["configs/evaluate.yaml"][1] is True and os.path.isfile(chosen["configs/evaluate.yaml"][0])


@pytest.mark.slow
def test_refining_reconstruction_row_decodes_on_the_finer_grid_with_the_mask_from_its_file(
    report, tiny_phantoms, weights, tmp_path
):
    """With a refining decoder the row decodes as generation does: on the 2x finer grid, with the case's mask resampled
    there from its file; the model-grid image is the mean of each voxel's fine voxels, and the delivered-grid
    columns measure the fine image."""
    guided = common_parser(label_guided_decoder=True).get_parsed_content("autoencoder_def", instantiate=True)
    load_initial_autoencoder(guided, str(weights["autoencoder"]))
    torch.save({"autoencoder": guided.state_dict()}, tmp_path / "guided.pt")
    refining = common_parser(label_guided_decoder=True, decoder_upsampling=1).get_parsed_content(
        "autoencoder_def", instantiate=True
    )
    load_initial_autoencoder(refining, str(tmp_path / "guided.pt"))
    with torch.no_grad():
        for name, parameter in refining.named_parameters():
            if ".mlp_beta.conv.weight" in name:  # make the decoder read its label map
                parameter.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "refining.pt"
    torch.save({"autoencoder": refining.state_dict()}, path)
    settings = dict(
        autoencoder_path=str(path),
        label_guided_decoder=True,
        decoder_upsampling=1,
        fid_2_5d_network=None,
        fid_3d_network=None,
    )
    workflow = evaluate(
        tmp_path / "out", tiny_phantoms, {"copy": str(report.parent / "copy")}, reconstruction_row=True, **settings
    )
    real_set, row_set = (
        workflow.parser.get_parsed_content("real_set"),
        workflow.parser.get_parsed_content("compared_sets")[-1],
    )
    item = dict(real_set.items[0])
    real, row = real_set.transform(dict(item)), row_set.transform(dict(item))

    fine_affine = torch.as_tensor(real["image"].affine, dtype=torch.float64) @ refinement(2)
    label, affine = read_nifti(item["label"], role="label")
    label = MetaTensor(torch.as_tensor(label[None].astype(np.float32)), affine=torch.as_tensor(affine))
    fine_size = [2 * s for s in real["image"].shape[1:]]
    fine_label = SpatialResample(mode="nearest")(label, dst_affine=fine_affine, spatial_size=fine_size).as_tensor()
    blocks = torch.as_tensor(real["label"])
    for axis in (1, 2, 3):
        blocks = blocks.repeat_interleave(2, axis)
    assert not torch.equal(fine_label, blocks)  # the file's mask, not the blocks of its model-grid copy
    condition = LabelContract(LABELS).one_hot(fine_label[None].long()).float()
    with torch.no_grad():
        fine_image = torch.nn.functional.interpolate(torch.as_tensor(real["image"])[None], scale_factor=2)
        expected = refining.decode(refining.encode(fine_image)[0], condition).clamp(0, 1)
    torch.testing.assert_close(torch.as_tensor(row["decoded"])[None], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(row["decoded"].affine, dtype=torch.float64), fine_affine)
    pooled = torch.nn.functional.avg_pool3d(expected, 2)[0]
    torch.testing.assert_close(torch.as_tensor(row["image"]), pooled, rtol=1e-4, atol=1e-4)

    rows = {r["set"]: r for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["table"]}
    assert all(np.isfinite(rows["reconstruction"][f"delivered_{name}"]) for name in DELIVERED_MEASURES)
