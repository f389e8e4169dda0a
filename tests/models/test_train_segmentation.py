# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Downstream segmentation: the five CNNs train and are scored per class on the test split,
synthetic pairs join the training cases only when asked and never the evaluation, resume, and
one-line errors for bad choices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, run_bundle
from monai.bundle import ConfigParser, ConfigWorkflow
from stage_helpers import TINY, one_thread  # noqa: F401

import scripts.models.segmentation  # noqa: F401  (configs reach it as scripts.models.segmentation)
from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.settings import layered_config_files
from scripts.data.pairs import find_pairs
from scripts.models.segmentation import check_patch_fits, check_synthetic_sources, size_divisor, synthetic_pairs

CONFIG = layered_config_files("configs/train_segmentation.yaml")
#: HCC leads every summary; the other foreground classes follow by id.
REPORT_ORDER = ["hcc", "liver", "portal_vein", "hepatic_vein"]
#: Tiny grid (32^3), 16^3 patches (a multiple of 16 suits VNet too), one patch per volume.
TINY_SEG = {**TINY, "patch_size": [16, 16, 16], "num_crops": 1, "val_interval": 1, "device": "cpu"}


def _settings(dataset: Path, output: Path, **extra) -> dict:
    return {"dataset_dir": str(dataset), "output_dir": str(output), **TINY_SEG, **extra}


def _workflow(run_id: str = "run", **settings) -> ConfigWorkflow:
    assert Path.cwd().resolve() == BUNDLE_ROOT, "run bundle workflows from the bundle root"
    return ConfigWorkflow(config_file=CONFIG, workflow_type=None, run_id=run_id, **settings)


def _parser(**settings) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update(settings)
    parser.parse()
    return parser


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _datalist(dataset: Path) -> dict:
    return json.loads((dataset / "datalist.json").read_text())


@pytest.fixture(scope="module")
def synthetic_dir(tiny_phantoms, tmp_path_factory) -> Path:
    """Six pairs as inference writes them (2 samples of 3 masks, with pairs.json), from training cases."""
    folder = tmp_path_factory.mktemp("synthetic")
    training = _datalist(tiny_phantoms)["training"]
    records = []
    for m, name in enumerate(["m0", "m1", "m2"]):
        case = training[m % len(training)]
        for k in range(2):
            prefix = f"{name}_s{k}"
            shutil.copy(tiny_phantoms / case["image"], folder / f"{prefix}_image.nii.gz")
            shutil.copy(tiny_phantoms / case["label"], folder / f"{prefix}_label.nii.gz")
            records.append(
                {
                    "image": f"{prefix}_image.nii.gz",
                    "label": f"{prefix}_label.nii.gz",
                    "mask": str(tiny_phantoms / case["label"]),
                    "sample": k,
                }
            )
    (folder / "pairs.json").write_text(json.dumps({"seed": 0, "pairs": records}))
    return folder


# ---------------------------------------------------------------- the five networks
@pytest.mark.parametrize(
    "network, cls, divisor",
    [
        ("unet", "UNet", 8),
        ("segresnet", "SegResNet", 8),
        ("attention_unet", "AttentionUnet", 8),
        ("dynunet", "DynUNet", 8),
        ("vnet", "VNet", 16),
    ],
)
@pytest.mark.slow
def test_network_trains_and_reports_per_class_test_dice(network, cls, divisor, tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    settings = _settings(tiny_phantoms, tmp_path, network=network, max_epochs=1)
    run = _workflow(**settings)
    run.initialize()
    model = run.parser.get_parsed_content("model")
    assert type(model).__name__ == cls and size_divisor(model) == (divisor,) * 3
    with pytest.raises(BundleInputError, match=f"does not suit --network {network}"):
        check_patch_fits(model, [divisor * 3 // 2] * 3, network)
    with torch.no_grad():  # one output channel per class of the label contract, background included
        assert model.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 5, 16, 16, 16)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    run.run()
    metrics = dict(run.parser.get_parsed_content("validate#evaluator").state.metrics)
    run.finalize()

    ckpt_dir = tmp_path / f"segmentation_{network}"
    last = _load(ckpt_dir / f"segmentation_{network}_last.pt")
    assert last["epoch"] == 1 and last["trainer"]["iteration"] == 1  # 2 training cases, batch 2
    assert last["network"] == network and last["labels"] == {
        "background": 0,
        "liver": 1,
        "portal_vein": 2,
        "hepatic_vein": 3,
        "hcc": 4,
    }
    assert last["num_real_cases"] == 2 and last["num_synthetic_cases"] == 0 and last["synthetic_ratio"] == 0.0
    # VNet's input transition sums a broadcast input (zero gradient to its bias terms): most, not all, move
    changed = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert len(changed) > len(initial) // 2, changed
    assert (ckpt_dir / f"segmentation_{network}_best.pt").is_file()
    # the validation key metric and each class by name, background excluded
    assert {"val_mean_dice", *(f"val_dice_{c}" for c in REPORT_ORDER)} <= set(metrics)
    assert "val_dice_background" not in metrics and 0.0 <= metrics["val_mean_dice"] <= 1.0

    evaluation = _workflow(run_id="evaluating", **settings)
    evaluation.initialize()
    evaluation.run()
    evaluation.finalize()
    report = json.loads((ckpt_dir / "test_metrics.json").read_text())
    test_case = _datalist(tiny_phantoms)["test"][0]
    assert report["network"] == network and report["split"] == "test" and report["checkpoint_epoch"] == 1
    assert report["checkpoint"] == str(ckpt_dir / f"segmentation_{network}_best.pt")
    assert list(report["dice"]) == REPORT_ORDER and report["num_cases"] == 1
    assert [Path(c["label"]).name for c in report["per_case"]] == [Path(test_case["label"]).name]
    present = {c: v for c, v in report["dice"].items() if v is not None}
    assert {"liver", "portal_vein", "hepatic_vein"} <= set(present)  # every phantom has liver and vessels
    assert all(0.0 <= v <= 1.0 for v in present.values())
    assert report["mean_dice"] == pytest.approx(np.mean(list(present.values())), abs=1e-5)
    assert report["dice"] == report["per_case"][0]["dice"]  # one case: its values are the means
    assert not list(ckpt_dir.glob(".*.tmp")), "a temporary file was left behind"


# ---------------------------------------------------------------- synthetic pairs
def test_synthetic_cases_join_training_only_when_asked(tiny_phantoms, synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    sections = _datalist(tiny_phantoms)
    real = {s: [str(tiny_phantoms / c["label"]) for c in sections[s]] for s in ("training", "validation", "test")}

    def labels(parser, key):
        return [item["label"] for item in parser.get_parsed_content(key)]

    # a folder given with ratio 0: real cases only
    parser = _parser(**_settings(tiny_phantoms, tmp_path, synthetic_dir=str(synthetic_dir), synthetic_ratio=0))
    assert labels(parser, "train#datalist") == real["training"]
    assert len(parser.get_parsed_content("train#dataset")) == 2

    # ratio 1: one synthetic pair per real case, from different masks; held-out splits stay real
    parser = _parser(**_settings(tiny_phantoms, tmp_path, synthetic_dir=str(synthetic_dir), synthetic_ratio=1.0))
    synthetic = labels(parser, "train#synthetic_datalist")
    assert len(synthetic) == 2 and all(Path(p).parent == synthetic_dir for p in synthetic)
    assert len({Path(p).name.split("_s")[0] for p in synthetic}) == 2
    assert labels(parser, "train#datalist") == real["training"]  # the real cases; synthetic ones join in train#dataset
    assert len(parser.get_parsed_content("train#dataset")) == 4
    assert labels(parser, "validate#datalist") == real["validation"]
    assert labels(parser, "test#datalist") == real["test"]

    # and they are trained on: 4 cases, batch 2 -> 2 iterations
    run = _workflow(
        **_settings(tiny_phantoms, tmp_path, synthetic_dir=str(synthetic_dir), synthetic_ratio=1.0, max_epochs=1)
    )
    run.initialize()
    run.run()
    run.finalize()
    last = _load(tmp_path / "segmentation_unet" / "segmentation_unet_last.pt")
    assert last["trainer"]["iteration"] == 2 and last["num_synthetic_cases"] == 2
    assert last["synthetic_dir"] == str(synthetic_dir)

    # a fixed epoch_length (the study's equal_steps): 1 step per epoch whatever the number of cases
    equal = _workflow(
        **_settings(
            tiny_phantoms,
            tmp_path / "equal",
            synthetic_dir=str(synthetic_dir),
            synthetic_ratio=1.0,
            max_epochs=2,
            epoch_length=1,
        )
    )
    equal.initialize()
    equal.run()
    equal.finalize()
    assert _load(tmp_path / "equal" / "segmentation_unet" / "segmentation_unet_last.pt")["trainer"]["iteration"] == 2


def test_label_map_applies_to_real_labels_only(tiny_phantoms, synthetic_dir, tmp_path, monkeypatch):
    """Synthetic labels are written in bundle ids: a dataset's label_map must not remap them again."""
    monkeypatch.chdir(BUNDLE_ROOT)
    swap = {1: 1, 2: 3, 3: 2, 4: 4}  # a dataset numbering the two vessel trees the other way round
    parser = _parser(**_settings(tiny_phantoms, tmp_path, label_map=swap))
    case = {"image": str(synthetic_dir / "m0_s0_image.nii.gz"), "label": str(synthetic_dir / "m0_s0_label.nii.gz")}
    as_real = parser.get_parsed_content("pair_preprocessing")(dict(case))["label"]
    as_synthetic = parser.get_parsed_content("synthetic_preprocessing")(dict(case))["label"]
    assert (as_synthetic == 2).any() and (as_synthetic == 3).any()
    swapped = as_synthetic.clone()
    swapped[as_synthetic == 2], swapped[as_synthetic == 3] = 3, 2
    assert torch.equal(as_real, swapped)


def _pairs(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_synthetic_pair_choice_is_seeded_and_spreads_over_masks(tmp_path):
    folder = _pairs(
        tmp_path / "s",
        [f"{m}_s{k}_{r}.nii.gz" for m in "abcd" for k in range(3) for r in ("image", "label")]
        + ["pairs.json", "a_s0_preview.png", ".hidden_image.nii.gz"],
    )
    assert len(find_pairs(str(folder))) == 12
    chosen = synthetic_pairs(str(folder), 1.5, 4, seed=7)  # round(1.5 x 4) = 6
    assert len(chosen) == 6 and chosen == synthetic_pairs(str(folder), 1.5, 4, seed=7)
    masks = [Path(p["image"]).name[0] for p in chosen]
    assert sorted(set(masks)) == list("abcd") and max(masks.count(m) for m in masks) == 2
    assert all(p["label"] == p["image"].replace("_image.", "_label.") for p in chosen)
    others = {tuple(p["image"] for p in synthetic_pairs(str(folder), 1.5, 4, seed=s)) for s in range(8)}
    assert len(others) > 1  # the seed picks the subset
    assert len(synthetic_pairs(str(folder), 0.5, 3, seed=0)) == 2  # 1.5 rounds half up
    assert synthetic_pairs(None, 0, 4) == [] and synthetic_pairs(str(folder), 0.0, 4) == []


@pytest.mark.parametrize(
    "files, folder, ratio, expected",
    [
        (["a_image.nii.gz", "a_label.nii.gz"], "s", 2.0, "needs 4 synthetic pairs, the folder has 1"),
        ([], None, 1.0, "config 'synthetic_ratio' is 1 but no synthetic pairs are given: pass --synthetic_dir"),
        (
            ["a_image.nii.gz", "a_label.nii.gz", "b_image.nii.gz"],
            "s",
            1.0,
            "b_image.nii.gz: synthetic image has no label file",
        ),
        (["a_label.nii.gz"], "s", 1.0, "a_label.nii.gz: synthetic label has no image file (a_image.nii.gz)"),
        (["a_image.nii.gz", "a_label.nii"], "s", 0.5, None),
        (["pairs.json"], "s", 1.0, "no synthetic pairs (X_image.nii.gz + X_label.nii.gz) in this folder"),
        (
            ["case1.nii.gz"],
            "s",
            1.0,
            "case1.nii.gz: synthetic NIfTI files must be named X_image.nii.gz / X_label.nii.gz",
        ),
        (["a_image.nii.gz", "a_label.nii.gz"], "s", -1.0, "config 'synthetic_ratio' must be a number >= 0"),
        (["a_image.nii.gz", "a_label.nii.gz"], "s", 0.1, "rounds to 0 synthetic cases"),
        ([], "missing", 1.0, "missing: synthetic folder not found"),
    ],
)
def test_synthetic_pair_errors(files, folder, ratio, expected, tmp_path):
    path = None if folder is None else str(tmp_path / folder)
    if folder == "s":
        _pairs(tmp_path / "s", files)
    if expected is None:  # .nii and .nii.gz pair up
        assert len(synthetic_pairs(path, ratio, 2)) == 1
        return
    with pytest.raises(BundleInputError) as err:
        synthetic_pairs(path, ratio, 2)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_pairs_generated_from_held_out_masks_are_refused(tiny_phantoms, synthetic_dir, tmp_path):
    sections = _datalist(tiny_phantoms)
    held_out = [{"label": str(tiny_phantoms / c["label"])} for c in sections["validation"] + sections["test"]]
    chosen = synthetic_pairs(str(synthetic_dir), 3.0, 2)
    assert check_synthetic_sources(chosen, held_out, str(synthetic_dir)) == 6  # all from training masks
    leaky = tmp_path / "leaky"
    shutil.copytree(synthetic_dir, leaky)
    manifest = json.loads((leaky / "pairs.json").read_text())
    manifest["pairs"][0]["mask"] = held_out[-1]["label"]
    (leaky / "pairs.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleInputError, match="generated from the held-out mask .* training on it would leak"):
        check_synthetic_sources(synthetic_pairs(str(leaky), 3.0, 2), held_out, str(leaky))


# ---------------------------------------------------------------- resume and errors
def test_resume_continues_from_the_checkpoint_epoch(tiny_phantoms, synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    last_path = tmp_path / "segmentation_unet" / "segmentation_unet_last.pt"
    for max_epochs in (1, 2):
        run = _workflow(**_settings(tiny_phantoms, tmp_path, max_epochs=max_epochs))
        run.initialize()
        run.run()
        run.finalize()
        if max_epochs == 1:
            first = _load(last_path)
    resumed = _load(last_path)
    assert first["epoch"] == 1 and resumed["epoch"] == 2 and resumed["trainer"]["iteration"] == 2
    assert {int(s["step"]) for s in resumed["optimizer"]["state"].values()} == {2}  # AdamW counters survived
    assert any(not torch.equal(v, first["model"][k]) for k, v in resumed["model"].items())

    # another experiment in the same folder is refused before training: with synthetic cases, other labels
    tumour = {"background": 0, "liver": 1, "portal_vein": 2, "hepatic_vein": 3, "tumour": 4}
    for change, expected in (
        ({"synthetic_dir": str(synthetic_dir), "synthetic_ratio": 1.0}, "synthetic_ratio 0.0 but this run has 1.0"),
        ({"labels": tumour, "report_first": ["tumour"]}, "labels {'background': 0,"),
    ):
        other = _workflow(**_settings(tiny_phantoms, tmp_path, max_epochs=3, **change))
        other.initialize()
        with pytest.raises(RuntimeError) as err:
            other.run()
        message = str(find_input_error(err.value))
        assert f"{last_path}: cannot resume, it was saved with " in message and expected in message, message
    assert _load(last_path)["epoch"] == 2


@pytest.mark.slow
def test_unknown_network_is_one_clear_error_line(tiny_phantoms, tmp_path):
    args = [
        "training",
        "--config_file",
        str(CONFIG),
        "--dataset_dir",
        str(tiny_phantoms),
        "--output_dir",
        str(tmp_path / "out"),
        "--network",
        "resnet",
        "--device",
        "cpu",
    ]
    result = run_bundle(*args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        "ERROR: config 'network': unknown network 'resnet'; use --network attention_unet, dynunet, "
        "segresnet, unet, vnet"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "something was written before the error"
