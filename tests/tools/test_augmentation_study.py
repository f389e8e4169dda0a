# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The augmentation study driver (configs/augmentation_study.yaml): the grid runs and the table is
written, synthetic pairs come only from the kept training masks (or a folder of extra masks), a
held-out mask in the synthetic set or among the extra masks (even renamed) stops the study, and a
re-run skips what is finished."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import BUNDLE_ROOT, run_bundle
from monai.bundle import ConfigWorkflow
from stage_helpers import TINY, one_thread, write_autoencoder, write_network, write_unet  # noqa: F401

import scripts.tools.augmentation_study as study_module
from scripts.core.checkpoints import weights_sha256
from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.outputs import OWNER_MARKER
from scripts.core.settings import layered_config_files
from scripts.data.labels import LABELS
from scripts.tools.augmentation_study import (
    CELL_LOCK,
    AugmentationStudy,
    check_synthetic_set,
    estimate_seconds_left,
    format_table,
    select_real_cases,
    summarise,
    verdict,
)

CONFIG = layered_config_files("configs/augmentation_study.yaml")
REPORT_ORDER = ["hcc", "liver", "portal_vein", "hepatic_vein"]
NETWORKS = ["unet", "segresnet"]
RUNS = ["unet_real_seed0", "unet_synthetic1_seed0", "segresnet_real_seed0", "segresnet_synthetic1_seed0"]


def _datalist(dataset: Path) -> dict:
    return json.loads((dataset / "datalist.json").read_text())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Tiny seeded-random DDPM weights, recorded as the training configs record them."""
    root = tmp_path_factory.mktemp("weights")
    autoencoder = write_autoencoder(root / "autoencoder.pt")
    unet = write_unet(root / "unet.pt", autoencoder)
    unet_checkpoint = torch.load(unet, weights_only=True)
    controlnet = write_network(
        root / "controlnet.pt",
        "controlnet_def",
        "controlnet",
        0,
        trained_like=True,
        noise_schedule=unet_checkpoint["noise_schedule"],
        labels=LABELS,
        diffusion_unet_sha256=weights_sha256(unet_checkpoint, "diffusion_unet"),
    )
    return {
        "autoencoder_path": str(autoencoder),
        "diffusion_unet_path": str(unet),
        "controlnet_path": str(controlnet),
        "autoguidance_unet_path": str(write_unet(root / "guide.pt", autoencoder, seed=1)),
        "label_guided_decoder": False,  # a plain autoencoder
        "decoder_upsampling": 0,  # on the model grid
    }


def _settings(dataset: Path, output: Path, weights: dict[str, str], **extra) -> dict:
    """A tiny study: 2 networks x {real, real + synthetic x1} x seed 0, one real training case kept,
    1 epoch at the tiny grid; synthetic pairs: 2 re-renderings + 1 layout with a new HCC nodule."""
    return {
        "dataset_dir": str(dataset),
        "output_dir": str(output),
        "device": "cpu",
        "networks": NETWORKS,
        "synthetic_ratios": [1.0],
        "seeds": [0],
        "num_real_cases": 1,
        "num_renderings_per_mask": 2,
        "edited_layouts": {"hcc": {"insert_hcc_diameters_mm": [20]}},
        "inference_overrides": {"num_inference_steps": 2, **weights},
        "segmentation_overrides": {"max_epochs": 1, "val_interval": 1, "patch_size": [16, 16, 16], "num_crops": 1},
        "shared_overrides": dict(TINY),
        **extra,
    }


def _constructor_settings(dataset: Path, tmp_path: Path) -> dict:
    """What every directly built AugmentationStudy of these tests needs: data, output and bundle root."""
    return {
        "datalist": str(dataset / "datalist.json"),
        "dataset_dir": str(dataset),
        "output_dir": str(tmp_path / "out"),
        "bundle_root": str(BUNDLE_ROOT),
    }


def _run_in_process(**settings) -> str:
    assert Path.cwd().resolve() == BUNDLE_ROOT, "run bundle workflows from the bundle root"
    workflow = ConfigWorkflow(
        config_file=CONFIG, workflow_type=None, run_id="training", launcher="in_process", **settings
    )
    workflow.initialize()
    workflow.run()
    return workflow.parser.get_parsed_content("output_dir")


@pytest.fixture(scope="module")
def study(tiny_phantoms, weights, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny study, run once in this process; returns its folder and settings."""
    previous = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        settings = _settings(tiny_phantoms, tmp_path_factory.mktemp("study") / "out", weights)
        _run_in_process(**settings)
    finally:
        os.chdir(previous)
    return Path(settings["output_dir"]), settings


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


# ---------------------------------------------------------------- the study end to end
@pytest.mark.slow
def test_study_runs_the_grid_and_writes_the_table(study, tiny_phantoms):
    out, _ = study
    record = json.loads((out / "study.json").read_text())
    runs = {r["name"]: r for r in record["runs"]}
    assert list(runs) == RUNS and all(r["status"] == "done" and not r["skipped"] for r in runs.values())
    for name, run in runs.items():
        synthetic = "synthetic" in name
        assert run["num_real_training_cases"] == 1 and run["num_synthetic_training_cases"] == int(synthetic)
        assert list(run["dice"]) == REPORT_ORDER and run["checkpoint_epoch"] == 1
        assert run["wall_time_s"]["training"] > 0 and run["wall_time_s"]["evaluating"] > 0
        assert (out / "runs" / name / f"segmentation_{run['network']}" / "test_metrics.json").is_file()
    assert record["conditions"] == {"real": "real only", "synthetic1": "real + synthetic x1"}

    # the summary: each condition's Dice and the synthetic arm minus the real arm, per class
    for network in NETWORKS:
        table = record["summary"][network]
        assert list(table) == [*REPORT_ORDER, "mean"]
        real, synthetic = runs[f"{network}_real_seed0"], runs[f"{network}_synthetic1_seed0"]
        for name in ("liver", "mean"):  # every phantom has a liver
            value = (lambda r: r["mean_dice"]) if name == "mean" else (lambda r: r["dice"][name])
            cells = table[name]
            assert cells["dice"]["real"]["mean"] == pytest.approx(value(real), abs=1e-6)
            assert cells["dice"]["synthetic1"]["mean"] == pytest.approx(value(synthetic), abs=1e-6)
            assert cells["difference"]["synthetic1"]["mean"] == pytest.approx(value(synthetic) - value(real), abs=1e-5)
            assert cells["dice"]["real"]["n"] == 1 and cells["dice"]["real"]["std"] is None

    markdown = (out / "study.md").read_text()
    assert "## hcc Dice by network" in markdown
    for network in NETWORKS:
        assert f"## {network}\n\n| class | real only | real + synthetic x1 | Δ x1 |" in markdown
        liver = record["summary"][network]["liver"]
        assert (
            f"| liver | {liver['dice']['real']['mean']:.3f} | {liver['dice']['synthetic1']['mean']:.3f} | "
            f"{liver['difference']['synthetic1']['mean']:+.3f} |"
        ) in markdown
    assert "| segresnet_synthetic1_seed0 | done | 1 / 1 |" in markdown
    # the per-network answer to "does the HCC gain exceed its seed spread?", in the report and its record
    assert "Does the hcc gain exceed its seed spread?" in markdown
    for network in NETWORKS:
        hcc = record["summary"][network]["hcc"]
        answer = verdict(hcc["dice"]["real"], hcc["difference"]["synthetic1"])
        assert record["verdicts"][network] == {"synthetic1": answer}
        assert f"- {network}: x1 {answer}" in markdown
    assert "![hcc Dice per network and seed](study.png)" in markdown and (out / "study.png").stat().st_size > 1000
    assert not list(out.glob(".*.tmp")) and not (out / "synthetic_parts").exists()


def test_synthetic_pairs_come_only_from_the_kept_training_masks(study, tiny_phantoms):
    out, _ = study
    sections = _datalist(tiny_phantoms)
    kept = json.loads((out / "datalist.json").read_text())
    # the low-data regime: the first training case; validation and test untouched
    assert [c["label"] for c in kept["training"]] == [str(tiny_phantoms / sections["training"][0]["label"])]
    for section in ("validation", "test"):
        assert [c["label"] for c in kept[section]] == [str(tiny_phantoms / c["label"]) for c in sections[section]]

    manifest = json.loads((out / "synthetic" / "pairs.json").read_text())
    held_out = {str(tiny_phantoms / c["label"]) for c in sections["validation"] + sections["test"]}
    sources = [p["mask"] for p in manifest["pairs"]]
    assert set(sources) == {kept["training"][0]["label"]} and not set(sources) & held_out
    names = sorted(p["image"] for p in manifest["pairs"])
    stem = Path(kept["training"][0]["label"]).name[: -len(".nii.gz")]
    assert names == [f"hcc_{stem}_image.nii.gz", f"render_{stem}_s0_image.nii.gz", f"render_{stem}_s1_image.nii.gz"]
    assert [p["edits"] != {} for p in sorted(manifest["pairs"], key=lambda p: p["image"])] == [True, False, False]
    assert len({p["seed"] for p in manifest["pairs"]}) == 3  # each pair its own noise
    assert sorted(f.name for f in (out / "synthetic").iterdir()) == sorted(
        [OWNER_MARKER, "pairs.json"] + names + [n.replace("_image", "_label") for n in names]
    )


def _mask_pool(dataset: Path, folder: Path, extra: dict[str, Path] | None = None) -> Path:
    """Label maps without images: the second training mask renamed, and the first one mirrored (new layouts)."""
    sections = _datalist(dataset)
    folder.mkdir(parents=True)
    shutil.copy(dataset / sections["training"][1]["label"], folder / "extra_a.nii.gz")
    first = nib.load(dataset / sections["training"][0]["label"])
    mirrored = np.ascontiguousarray(np.flip(np.asarray(first.dataobj), axis=0))
    nib.save(nib.Nifti1Image(mirrored, first.affine), folder / "extra_b.nii.gz")
    for name, source in (extra or {}).items():
        shutil.copy(source, folder / name)
    return folder


def test_synthetic_pairs_from_a_folder_of_masks_without_images(tiny_phantoms, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    pool = _mask_pool(tiny_phantoms, tmp_path / "pool")
    settings = _settings(tiny_phantoms, tmp_path / "out", weights, networks=["unet"], synthetic_mask_dir=str(pool))
    settings.update(num_renderings_per_mask=1, edited_layouts={})
    study = AugmentationStudy(
        datalist=str(tiny_phantoms / "datalist.json"), launcher="in_process", bundle_root=str(BUNDLE_ROOT), **settings
    )
    assert study.generate_synthetic()["generated"]
    manifest = json.loads((tmp_path / "out" / "synthetic" / "pairs.json").read_text())
    # every pair is rendered from a pool mask, none from the kept training case
    assert sorted(p["mask"] for p in manifest["pairs"]) == [str(pool / "extra_a.nii.gz"), str(pool / "extra_b.nii.gz")]
    assert manifest["settings"]["masks"] == [str(pool / "extra_a.nii.gz"), str(pool / "extra_b.nii.gz")]
    checked = check_synthetic_set(study.synthetic_dir, study.training, study.held_out)
    assert re.fullmatch("[0-9a-f]{64}", checked.pop("sha256"))
    assert checked == {"num_pairs": 2, "num_source_masks": 2, "sources_outside_training": 2}
    # the generated label maps are the pool's, carried through preprocessing (foreground kept)
    for record in manifest["pairs"]:
        assert np.asarray(nib.load(study.synthetic_dir + "/" + record["label"]).dataobj).max() > 0
    assert "label maps without images in " + str(pool) in study.markdown([], {}, [], {})


@pytest.mark.parametrize("section", ["test", "validation"])
def test_a_renamed_held_out_mask_among_the_extra_masks_stops_the_study_before_any_work(
    section, tiny_phantoms, tmp_path
):
    pool = _mask_pool(tiny_phantoms, tmp_path / "pool")
    # the held-out map re-saved under another name, format, data type and header: only its voxels give it away
    held_out = nib.load(tiny_phantoms / _datalist(tiny_phantoms)[section][0]["label"])
    affine = held_out.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(held_out.dataobj).astype(np.float32), affine), pool / "innocent_name.nii")
    expected = r"innocent_name.nii \(in config 'synthetic_mask_dir'\) holds the same label map as the held-out"
    with pytest.raises(BundleInputError, match=expected):
        AugmentationStudy(
            datalist=str(tiny_phantoms / "datalist.json"),
            dataset_dir=str(tiny_phantoms),
            output_dir=str(tmp_path / "out"),
            networks=["unet"],
            synthetic_mask_dir=str(pool),
            bundle_root=str(BUNDLE_ROOT),
        )
    assert not (tmp_path / "out").exists()


def test_extra_masks_are_counted_checked_and_never_the_datasets_own_labels(tiny_phantoms, tmp_path):
    settings = {
        **_constructor_settings(tiny_phantoms, tmp_path),
        "networks": ["unet"],
        "num_real_cases": 1,
        "num_renderings_per_mask": 1,
        "edited_layouts": {},
    }
    pool = _mask_pool(tiny_phantoms, tmp_path / "pool")
    # 2 pairs for 1 real case: the 2 extra masks give them, the 1 kept training mask would not
    study = AugmentationStudy(**settings, synthetic_ratios=[2.0], synthetic_mask_dir=str(pool))
    assert study.synthetic_needed == 2 and len(study.source_masks) == 2
    with pytest.raises(BundleInputError, match=re.escape("needs 3 synthetic pairs; 2 masks of synthetic_mask_dir x 1")):
        AugmentationStudy(**settings, synthetic_ratios=[3.0], synthetic_mask_dir=str(pool))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError, match="^config 'synthetic_mask_dir': .*empty"):
        AugmentationStudy(**settings, synthetic_mask_dir=str(tmp_path / "empty"))
    # the dataset's own label folder holds the validation and test masks too
    with pytest.raises(BundleInputError, match=r"\(in config 'synthetic_mask_dir'\) is a validation or test mask"):
        AugmentationStudy(**settings, synthetic_mask_dir=str(tiny_phantoms / "labelsTr"))
    assert not (tmp_path / "out").exists()


def test_rerun_skips_finished_runs_and_the_synthetic_set(study, monkeypatch):
    out, settings = study
    before = _mtimes(out, "runs/*/segmentation_*/test_metrics.json") | _mtimes(out, "synthetic/*")

    def no_command(*args, **kwargs):
        raise AssertionError(f"a finished step ran again: {args}")

    monkeypatch.chdir(BUNDLE_ROOT)
    monkeypatch.setattr(study_module, "run_bundle_command", no_command)
    _run_in_process(**settings)
    assert _mtimes(out, "runs/*/segmentation_*/test_metrics.json") | _mtimes(out, "synthetic/*") == before
    record = json.loads((out / "study.json").read_text())
    assert [r["skipped"] for r in record["runs"]] == [True] * 4 and all(r["status"] == "done" for r in record["runs"])


def test_a_run_is_not_reported_beside_a_synthetic_set_it_did_not_train_on(study, monkeypatch):
    """synthetic/ deleted and regenerated (here: one image replaced) under finished synthetic runs:
    the study stops before any work instead of skipping them as if they had trained on the new set."""
    out, settings = study
    record = json.loads((out / "runs" / "unet_synthetic1_seed0" / "run.json").read_text())
    assert record["synthetic_sha256"] == json.loads((out / "study.json").read_text())["synthetic"]["sha256"]
    images = sorted((out / "synthetic").glob("*_image.nii.gz"))
    original = images[0].read_bytes()

    def no_command(*args, **kwargs):
        raise AssertionError(f"a step ran: {args}")

    monkeypatch.chdir(BUNDLE_ROOT)
    monkeypatch.setattr(study_module, "run_bundle_command", no_command)
    try:
        shutil.copyfile(images[1], images[0])
        with pytest.raises(Exception) as caught:
            _run_in_process(**settings)
        message = str(find_input_error(caught.value))
        assert "unet_synthetic1_seed0: this run trained on another synthetic set than the one now in" in message
    finally:
        images[0].write_bytes(original)
    _run_in_process(**settings)  # the same set again: every run is reused


def test_a_second_synthetic_set_in_the_folder_reuses_the_real_only_runs(study, monkeypatch):
    """Another kind of synthetic pairs studied in the same folder (--synthetic_name): the real-only
    cells are not trained again, the new set's arms are, and it gets its own report."""
    out, settings = study
    ran = []

    def command(role, configs, log_path, bundle_root, launcher):
        ran.append((role, os.path.basename(os.path.dirname(log_path))))
        if role == "evaluating":  # stands in for the real command: this cell's report, a finished one's numbers
            metrics = Path(log_path).parent / "segmentation_unet" / "test_metrics.json"
            metrics.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "runs" / "unet_synthetic1_seed0" / "segmentation_unet" / "test_metrics.json", metrics)
        return 1.0

    monkeypatch.chdir(BUNDLE_ROOT)
    monkeypatch.setattr(study_module, "run_bundle_command", command)
    before = (out / "study.md").read_text()
    second = {**settings, "networks": ["unet"], "synthetic_name": "again", "synthetic_dir": str(out / "synthetic")}
    try:
        _run_in_process(**second)
        assert ran == [("training", "unet_again1_seed0"), ("evaluating", "unet_again1_seed0")]
        record = json.loads((out / "study_again.json").read_text())
        assert [(r["name"], r["skipped"]) for r in record["runs"]] == [
            ("unet_real_seed0", True),
            ("unet_again1_seed0", False),
        ]
        markdown = (out / "study_again.md").read_text()
        assert "| class | real only | real + again x1 | Δ x1 |" in markdown
        assert (out / "study.md").read_text() == before  # the first set's report is its own
        assert (out / "study_again.png").read_bytes()[:4] == b"\x89PNG" and "(study_again.png)" in markdown
    finally:
        shutil.rmtree(out / "runs" / "unet_again1_seed0", ignore_errors=True)


def test_a_cell_another_study_process_is_running_is_passed_over(study, monkeypatch):
    """Two study processes sharing a folder: a cell whose lock a live process holds is not trained a
    second time at once; it is reported as running elsewhere, and the others are collected."""
    out, settings = study
    cell = out / "runs" / "segresnet_real_seed0"
    metrics = cell / "segmentation_segresnet" / "test_metrics.json"
    kept = metrics.read_bytes()

    def no_command(*args, **kwargs):
        raise AssertionError(f"a step ran: {args}")

    monkeypatch.chdir(BUNDLE_ROOT)
    monkeypatch.setattr(study_module, "run_bundle_command", no_command)
    metrics.unlink()  # not finished ...
    (cell / CELL_LOCK).write_text(str(os.getppid()))  # ... and another live process is on it
    try:
        _run_in_process(**settings)
        record = json.loads((out / "study.json").read_text())
        status = {r["name"]: r["status"] for r in record["runs"]}
        assert status == {**dict.fromkeys(RUNS, "done"), "segresnet_real_seed0": "running elsewhere"}
        assert "| segresnet_real_seed0 | running elsewhere |" in (out / "study.md").read_text()
    finally:
        metrics.write_bytes(kept)
        (cell / CELL_LOCK).unlink()
    _run_in_process(**settings)  # that process gone: the full table again, nothing trained
    assert all(r["status"] == "done" for r in json.loads((out / "study.json").read_text())["runs"])


def test_time_left_is_estimated_per_network_from_finished_cells():
    def cell(network, minutes=None):
        wall = {"training": minutes * 60 - 30, "evaluating": 30} if minutes else {}
        return {"network": network, "wall_time_s": wall}

    timed = [cell("unet", 2), cell("unet", 4), cell("vnet", 30), cell("segresnet")]  # the last has no time yet
    assert estimate_seconds_left([cell("unet"), cell("vnet")], timed) == pytest.approx((3 + 30) * 60)
    # a network without a finished cell yet: the mean of all timed cells
    assert estimate_seconds_left([cell("dynunet")], timed) == pytest.approx(12 * 60)
    assert estimate_seconds_left([cell("unet")], [cell("unet")]) is None


@pytest.mark.slow
def test_command_resumes_an_interrupted_run_without_training_again(study, tmp_path):
    """The user's command (subprocess launcher): only the run lacking its test report runs again,
    and its finished training is not repeated."""
    out, settings = study
    run = out / "runs" / "segresnet_synthetic1_seed0"
    (run / "segmentation_segresnet" / "test_metrics.json").unlink()  # cut off during evaluation
    others = _mtimes(out, "runs/*/segmentation_*/test_metrics.json")
    trained = _mtimes(run, "segmentation_segresnet/*.pt") | _mtimes(run, "training.log")
    overlay = tmp_path / "study.yaml"
    overlay.write_text(yaml.safe_dump(settings))
    result = run_bundle("training", "--config_file", json.dumps([*CONFIG, str(overlay)]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _mtimes(out, "runs/*/segmentation_*/test_metrics.json").items() >= others.items()
    assert (run / "segmentation_segresnet" / "test_metrics.json").is_file()
    assert _mtimes(run, "segmentation_segresnet/*.pt") | _mtimes(run, "training.log") == trained
    assert "monai.bundle run evaluating" in (run / "evaluating.log").read_text()
    record = json.loads((out / "study.json").read_text())
    assert [r["skipped"] for r in record["runs"]] == [True, True, True, False]
    assert record["settings"]["launcher"] == "subprocess"


def test_changed_settings_under_a_study_folder_are_refused(study, monkeypatch, tmp_path):
    out, settings = study
    monkeypatch.chdir(BUNDLE_ROOT)
    changed = {**settings, "segmentation_overrides": {**settings["segmentation_overrides"], "max_epochs": 2}}
    with pytest.raises(Exception) as caught:
        _run_in_process(**changed)
    message = str(find_input_error(caught.value))
    assert "this run was started with other settings (max_epochs 1 -> 2)" in message
    with pytest.raises(Exception) as caught:
        _run_in_process(**{**settings, "num_real_cases": 2})
    assert "started with other real cases" in str(find_input_error(caught.value))
    # a default of the segmentation configs changed under finished runs: not reused as if trained with it
    overlay = tmp_path / "other_flips.yaml"
    overlay.write_text("flip_prob: 0.25\n")
    with pytest.raises(Exception) as caught:
        _run_in_process(**{**settings, "segmentation_configs": ["configs/train_segmentation.yaml", str(overlay)]})
    assert "this run was trained with other segmentation configs" in str(find_input_error(caught.value))


# ---------------------------------------------------------------- the guard
def _copy_pairs(dataset: Path, folder: Path, cases: list[dict], sources: list[str | None] | None) -> Path:
    """Pairs copied from real ``cases``, with a pairs.json naming ``sources`` (None: no manifest)."""
    folder.mkdir(parents=True)
    records = []
    for i, case in enumerate(cases):
        shutil.copy(dataset / case["image"], folder / f"p{i}_image.nii.gz")
        shutil.copy(dataset / case["label"], folder / f"p{i}_label.nii.gz")
        records.append({"image": f"p{i}_image.nii.gz", "label": f"p{i}_label.nii.gz"})
    if sources is not None:
        for record, source in zip(records, sources, strict=True):
            if source:
                record["mask"] = source
        (folder / "pairs.json").write_text(json.dumps({"seed": 0, "pairs": records}))
    return folder


@pytest.mark.parametrize(
    "manifest, expected",
    [
        ("test mask", "generated from the held-out mask .*training on it would leak"),
        ("validation mask", "generated from the held-out mask"),
        ("no source", "1 of 2 synthetic pairs have no source mask recorded"),
        ("no manifest", "no pairs.json recording the source mask"),
        ("renamed test mask", r"copy.nii.gz \(a source mask recorded in .*\) holds the same label map as the held-out"),
        ("missing source", "source mask .*gone.nii.gz .* is not among the study's training cases and not on disk"),
    ],
)
def test_a_held_out_mask_in_the_synthetic_set_stops_the_study(manifest, expected, tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    sections = _datalist(tiny_phantoms)
    training = str(tiny_phantoms / sections["training"][0]["label"])
    second = {
        "test mask": str(tiny_phantoms / sections["test"][0]["label"]),
        "validation mask": str(tiny_phantoms / sections["validation"][0]["label"]),
        "no source": None,
        "no manifest": None,
        "renamed test mask": str(tmp_path / "copy.nii.gz"),
        "missing source": str(tmp_path / "gone.nii.gz"),
    }[manifest]
    if manifest == "renamed test mask":  # a held-out label map under another name: only its content gives it away
        shutil.copy(tiny_phantoms / sections["test"][0]["label"], second)
    sources = None if manifest == "no manifest" else [training, second]
    folder = _copy_pairs(tiny_phantoms, tmp_path / "synthetic", sections["training"][:2], sources)
    study = AugmentationStudy(
        datalist=str(tiny_phantoms / "datalist.json"),
        dataset_dir=str(tiny_phantoms),
        output_dir=str(tmp_path / "out"),
        networks=["unet"],
        synthetic_dir=str(folder),
        segmentation_overrides={"max_epochs": 1},
        launcher="in_process",
        bundle_root=str(BUNDLE_ROOT),
    )
    with pytest.raises(BundleInputError, match=expected):
        study.run()
    assert not (tmp_path / "out" / "runs").exists(), "a run started before the synthetic set was checked"


def test_the_guard_accepts_pairs_from_training_masks(tiny_phantoms, tmp_path):
    sections = _datalist(tiny_phantoms)
    training = [{"label": str(tiny_phantoms / c["label"])} for c in sections["training"]]
    held_out = [{"label": str(tiny_phantoms / c["label"])} for c in sections["validation"] + sections["test"]]
    folder = _copy_pairs(tiny_phantoms, tmp_path / "s", sections["training"], [c["label"] for c in training])
    checked = check_synthetic_set(str(folder), training, held_out)
    del checked["sha256"]  # its behaviour: below
    assert checked == {"num_pairs": 2, "num_source_masks": 2, "sources_outside_training": 0}
    # the set's fingerprint follows its files: one label map changed, another fingerprint
    before = check_synthetic_set(str(folder), training, held_out)["sha256"]
    shutil.copyfile(folder / "p1_label.nii.gz", folder / "p0_label.nii.gz")
    assert check_synthetic_set(str(folder), training, held_out)["sha256"] != before
    shutil.copy(tiny_phantoms / sections["training"][0]["label"], folder / "p0_label.nii.gz")
    assert check_synthetic_set(str(folder), training, held_out)["sha256"] == before  # same files, same fingerprint
    # masks outside the kept training cases (a low-data cut) are allowed and counted
    assert check_synthetic_set(str(folder), training[:1], held_out)["sources_outside_training"] == 1


# ---------------------------------------------------------------- pieces
def test_real_case_selection():
    cases = [{"label": f"l{i}"} for i in range(6)]
    assert select_real_cases(cases, None) == cases
    assert select_real_cases(cases, 2) == cases[:2]
    drawn = select_real_cases(cases, 3, "random", seed=1)
    assert drawn == select_real_cases(cases, 3, "random", seed=1) and len(drawn) == 3
    assert drawn == sorted(drawn, key=lambda c: c["label"])  # datalist order kept
    assert {tuple(c["label"] for c in select_real_cases(cases, 3, "random", seed=s)) for s in range(5)} != {
        tuple(c["label"] for c in drawn)
    }
    for num, selection, message in (
        (7, "first", "has 6 training cases"),
        (0, "first", "whole number >= 1"),
        (2, "last", "must be 'first' or 'random'"),
    ):
        with pytest.raises(BundleInputError, match=message):
            select_real_cases(cases, num, selection)


def test_summary_over_seeds_gives_mean_std_and_paired_difference():
    def run(condition, seed, hcc, liver):
        return {
            "network": "unet",
            "condition": condition,
            "seed": seed,
            "dice": {"hcc": hcc, "liver": liver},
            "mean_dice": liver if hcc is None else (hcc + liver) / 2,
        }

    runs = [
        run("real", 0, 0.4, 0.9),
        run("real", 1, 0.6, 0.9),
        run("synthetic1", 0, 0.5, 0.92),
        run("synthetic1", 1, 0.9, 0.88),
        run("synthetic1", 2, None, 0.9),
    ]
    table = summarise(runs, ["real", "synthetic1"], ["hcc", "liver"])["unet"]
    assert table["hcc"]["dice"]["real"] == {"mean": 0.5, "std": pytest.approx(0.141421, abs=1e-6), "n": 2}
    synthetic = table["hcc"]["dice"]["synthetic1"]
    assert synthetic["mean"] == pytest.approx(0.7) and synthetic["n"] == 2
    # paired by seed: +0.1 and +0.3; seed 2 has no real-only partner
    assert table["hcc"]["difference"]["synthetic1"] == {
        "mean": 0.2,
        "std": pytest.approx(0.141421, abs=1e-6),
        "n": 2,
        "up": 2,
    }
    assert table["liver"]["difference"]["synthetic1"]["n"] == 2
    titles = {"real": "real only", "synthetic1": "real + synthetic x1"}
    text = format_table(table, ["real", "synthetic1"], titles, "class")
    assert text.splitlines()[0] == "| class | real only | real + synthetic x1 | Δ x1 |"
    assert "| hcc | 0.500 ± 0.141 | 0.700 ± 0.283 | +0.200 ± 0.141 |" in text


@pytest.mark.parametrize(
    "real_mean, deltas, expected",
    [
        (0.4, [0.10, 0.12, 0.08], "gain beyond its seed spread (up in 3 of 3 seeds)"),
        (0.4, [0.10, -0.05, 0.02], "within its seed spread (up in 2 of 3 seeds)"),
        (0.4, [-0.08, -0.07, -0.09], "loss beyond its seed spread (up in 0 of 3 seeds)"),
        (0.4, [0.10], "one seed, no spread (up in 1 of 1 seeds)"),
        (0.01, [0.30, 0.31, 0.29], "real only has not learned it (Dice 0.010 < 0.05): no answer"),
        (0.4, [], "no paired seeds yet"),
    ],
)
def test_verdict_answers_whether_the_gain_exceeds_its_seed_spread(real_mean, deltas, expected):
    runs = [
        {"network": "unet", "condition": c, "seed": s, "dice": {"hcc": v}, "mean_dice": v}
        for s, d in enumerate(deltas or [None])
        for c, v in (("real", real_mean), ("synthetic3", None if d is None else real_mean + d))
    ]
    table = summarise(runs, ["real", "synthetic3"], ["hcc"])["unet"]["hcc"]
    assert verdict(table["dice"]["real"], table["difference"]["synthetic3"]) == expected


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"networks": ["unet", "resnet"]}, "'networks' must list distinct networks among"),
        ({"synthetic_ratios": [0.0]}, "'synthetic_ratios' must be distinct numbers > 0"),
        ({"segmentation_overrides": {"synthetic_ratio": 2}}, "['synthetic_ratio'] are set by the study itself"),
        ({"edited_layouts": {"new_hcc": {"insert_hcc_diameters_mm": [10]}}}, "names ['new_hcc'] must be letters"),
        ({"edited_layouts": {"same": {}}}, "'edited_layouts#same': no editing step enabled"),
        ({"edited_layouts": {"hcc": {"hcc_diameter": 3}}}, "'edited_layouts#hcc': unknown edit 'hcc_diameter'"),
        ({"synthetic_ratios": [3.0], "num_renderings_per_mask": 1, "edited_layouts": {}}, "needs 6 synthetic pairs"),
        ({"num_real_cases": 5}, "'num_real_cases' is 5 but the datalist has 2 training cases"),
        ({"synthetic_mask_dir": "/no/such/masks"}, "config 'synthetic_mask_dir': /no/such/masks: folder not found"),
        ({"synthetic_mask_dir": ".", "synthetic_dir": "."}, "'synthetic_dir' (pairs made elsewhere) and"),
        (
            {"synthetic_name": "real"},
            "'synthetic_name' must be letters and '-', starting with a letter, and not 'real'",
        ),
        ({"network_overrides": {"vnet2": {"max_epochs": 1}}}, "'network_overrides': ['vnet2'] are not networks"),
        ({"network_overrides": {"vnet": {"seed": 1}}}, "'network_overrides#vnet': ['seed'] are set by the study"),
        ({"synthetic_name": "hcc2"}, "'synthetic_name' must be letters and '-'"),  # 'hcc23' would hide the ratio
    ],
)
def test_bad_settings_are_one_clear_error_before_any_work(change, expected, tiny_phantoms, tmp_path):
    settings = {**_constructor_settings(tiny_phantoms, tmp_path), **change}
    with pytest.raises(BundleInputError, match=expected if ".*" in expected else re.escape(expected)) as err:
        AugmentationStudy(**settings)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_equal_steps_gives_every_arm_the_real_only_arms_steps_per_epoch(tiny_phantoms, tmp_path):
    settings = {
        **_constructor_settings(tiny_phantoms, tmp_path),
        "networks": ["unet"],
        "synthetic_ratios": [1.0, 2.0],
        "num_real_cases": 2,
        "num_renderings_per_mask": 2,
    }
    study = AugmentationStudy(**settings, equal_steps="true", segmentation_overrides={"batch_size": 1})
    lengths = {run["condition"]: study.run_overrides(run).get("epoch_length") for run in study.grid()}
    assert lengths == {"real": 2, "synthetic1": 2, "synthetic2": 2}  # ceil(2 real cases / batch 1)
    assert AugmentationStudy(**settings, equal_steps=True).real_only_epoch_length() == 1  # the config's batch 2
    plain = AugmentationStudy(**settings)
    assert all("epoch_length" not in plain.run_overrides(run) for run in plain.grid())
    # a network's own settings apply to its runs only, its steps per epoch included
    per_network = AugmentationStudy(
        **{**settings, "networks": ["unet", "vnet"]},
        equal_steps=True,
        segmentation_overrides={"max_epochs": 300},
        network_overrides={"vnet": {"max_epochs": 100, "batch_size": 1}},
    )
    overrides = {(r["network"], r["condition"]): per_network.run_overrides(r) for r in per_network.grid()}
    assert {k: (o["max_epochs"], o["epoch_length"]) for k, o in overrides.items()} == {
        ("unet", "real"): (300, 1),
        ("unet", "synthetic1"): (300, 1),
        ("unet", "synthetic2"): (300, 1),
        ("vnet", "real"): (100, 2),
        ("vnet", "synthetic1"): (100, 2),
        ("vnet", "synthetic2"): (100, 2),
    }
