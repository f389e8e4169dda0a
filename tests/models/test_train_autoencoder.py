# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage 1: autoencoder training, validation, resume after SIGKILL, DDP on CPU, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_GRID, run_bundle
from monai.bundle import ConfigWorkflow

from scripts.core.checkpoints import export_weights, weights_sha256
from scripts.core.errors import find_input_error
from scripts.core.settings import layered_config_files
from scripts.models.autoencoder import LATENT_SPACE_MODULES, latent_space_sha256

CONFIG = layered_config_files("configs/train_autoencoder.yaml")


def _overrides(dataset: Path, output: Path, **extra) -> dict:
    keys = dict(zip((k.lstrip("-") for k in TINY_GRID[::2]), (eval(v) for v in TINY_GRID[1::2]), strict=True))
    return {
        "dataset_dir": str(dataset),
        "output_dir": str(output),
        "val_interval": 1,
        "adversarial_warmup_epochs": 1,
        **keys,
        **extra,
    }


def _cli(dataset: Path, output: Path, max_epochs: int, **extra: str) -> list[str]:
    options = dict(zip(TINY_GRID[::2], TINY_GRID[1::2], strict=True))
    options.update({"--max_epochs": str(max_epochs), "--val_interval": "1", "--adversarial_warmup_epochs": "1"})
    options.update({f"--{k}": v for k, v in extra.items()})
    return [
        "training",
        "--config_file",
        str(CONFIG),
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(output),
        *[part for item in options.items() for part in item],
    ]


def _initialize_and_run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tiny_phantoms, tmp_path_factory) -> tuple[Path, dict]:
    """Two epochs of in-process training; returns the output folder and the initial weights."""
    output = tmp_path_factory.mktemp("ae_run")
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        workflow = ConfigWorkflow(
            config_file=CONFIG, workflow_type="train", **_overrides(tiny_phantoms, output, max_epochs=2)
        )
        workflow.initialize()
        initial = {k: v.clone() for k, v in workflow.parser.get_parsed_content("autoencoder").state_dict().items()}
        workflow.run()
        workflow.finalize()
    finally:
        os.chdir(cwd)
    return output, initial


@pytest.mark.slow
def test_trains_two_epochs_and_validates(trained):
    output, initial = trained
    last = _load(output / "autoencoder" / "autoencoder_last.pt")
    best = _load(output / "autoencoder" / "autoencoder_best.pt")
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 2  # 2 training cases, batch 2
    assert torch.isfinite(torch.tensor(best["best_metric"])) and best["best_metric_epoch"] in (1, 2)
    changed = [k for k, v in last["autoencoder"].items() if not torch.equal(v, initial[k])]
    assert len(changed) > len(initial) // 2, "training did not update the autoencoder"
    assert last["d_optimizer"]["state"], "the discriminator never stepped after the warm-up epoch"
    events = list((output / "autoencoder" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_validation_reports_the_reconstruction_contrast_against_the_real_one(trained):
    """Stage 1 logs what a label-guided generator can reach: liver minus vessels/HCC after decoding."""
    output, _ = trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "autoencoder" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val_recon_contrast", "val_real_contrast"} <= tags
    real = [e.value for e in events.Scalars("val_real_contrast")]
    assert all(r == pytest.approx(real[0]) and r > 0.1 for r in real)  # HBP phantoms: the liver is bright


def _scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_training_crops_are_the_whole_volume_by_default(tiny_phantoms, monkeypatch):
    """Stage 1 trains on what it decodes at inference: whole volumes. Its GroupNorm statistics depend
    on the extent seen, and a decoder trained on crops decodes whole volumes darker (model card)."""
    from monai.bundle import ConfigParser

    monkeypatch.chdir(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(CONFIG)
    overrides = _overrides(tiny_phantoms, Path("unused"), spatial_size=[32, 48, 16])
    del overrides["patch_size"]  # the default is what is under test
    parser.update(overrides)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    item = parser.get_parsed_content("train#datalist")[0]
    case = preprocessing(dict(item))  # a smaller random crop would show a smaller shape
    assert tuple(case["image"].shape) == (1, 32, 48, 16) and tuple(case["label"].shape) == (1, 32, 48, 16)
    assert parser.get_parsed_content("patch_size") == [32, 48, 16]


def test_key_metric_picks_the_best_checkpoint_and_a_resume_may_switch_it(tiny_phantoms, tmp_path, monkeypatch):
    """`key_metric` decides autoencoder_best.pt; resuming under another metric starts a new best."""
    monkeypatch.chdir(BUNDLE_ROOT)
    output = tmp_path / "run"
    for max_epochs, key_metric in ((1, "val_psnr"), (2, "val_recon_contrast")):
        workflow = ConfigWorkflow(
            config_file=CONFIG,
            workflow_type="train",
            **_overrides(tiny_phantoms, output, max_epochs=max_epochs, key_metric=key_metric),
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        best = _load(output / "autoencoder" / "autoencoder_best.pt")
        assert best["best_metric_name"] == key_metric
    # a PSNR in dB restored as the best would never be beaten by a contrast: the resumed run's first
    # validation must be the best so far, with the contrast it logged
    assert best["best_metric_epoch"] == 2
    logged = _scalars(output / "autoencoder" / "tensorboard", "val_recon_contrast")
    assert best["best_metric"] == pytest.approx(logged[2], rel=1e-5)
    assert best["best_metric"] < 1.0 < _scalars(output / "autoencoder" / "tensorboard", "val_psnr")[1]


def test_class_weights_make_the_l1_a_weighted_mean(tiny_phantoms, tmp_path, monkeypatch):
    """An error on a heavily weighted class counts more: mean over voxels of w * |error| / mean(w)."""
    monkeypatch.chdir(BUNDLE_ROOT)
    weights = {"portal_vein": 10.0}
    workflow = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        **_overrides(tiny_phantoms, tmp_path, max_epochs=1, recon_class_weights=weights),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    label = torch.ones(1, 1, 4, 4, 4)
    label[0, 0, 0, 0, 0] = 2  # one portal-vein voxel
    image, reconstruction = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    reconstruction[0, 0, 0, 0, 0] = 1.0  # the only error sits on that voxel
    loss = trainer._reconstruction_loss(reconstruction, image, {"image": image, "label": label})
    assert float(loss) == pytest.approx(10.0 / (63 + 10.0))  # plain L1 would give 1 / 64
    plain = ConfigWorkflow(
        config_file=CONFIG, workflow_type="train", **_overrides(tiny_phantoms, tmp_path, max_epochs=1)
    )
    plain.initialize()
    plain_loss = plain.parser.get_parsed_content("train#trainer")._reconstruction_loss(reconstruction, image, {})
    assert float(plain_loss) == pytest.approx(1.0 / 64)

    def build_trainer() -> None:
        bad = ConfigWorkflow(
            config_file=CONFIG,
            workflow_type="train",
            **_overrides(tiny_phantoms, tmp_path, recon_class_weights={"vessel": 2.0}),
        )
        bad.initialize()
        bad.parser.get_parsed_content("train#trainer")

    with pytest.raises(Exception) as caught:
        build_trainer()
    assert "config 'recon_class_weights': unknown class 'vessel'" in str(find_input_error(caught.value))


def test_feature_matching_adds_the_discriminator_feature_distance_to_the_generator_loss(
    tiny_phantoms, tmp_path, monkeypatch
):
    """--feature_matching_weight w: the generator loss gains w x the mean L1 between the discriminator's
    intermediate features of reconstruction and image; 0 (the default) leaves the loss as it was."""
    monkeypatch.chdir(BUNDLE_ROOT)
    torch.manual_seed(0)
    batch = {"image": torch.rand(1, 1, 32, 32, 32), "label": torch.ones(1, 1, 32, 32, 32)}
    results = {}
    for weight in (0.0, 2.0):
        settings = _overrides(
            tiny_phantoms, tmp_path / str(weight), max_epochs=1, adversarial_warmup_epochs=0, adv_weight=0.5
        )
        workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="train", feature_matching_weight=weight, **settings)
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.state.epoch = 1  # past the warm-up: adversarial
        results[weight] = trainer._iteration(trainer, batch)
    plain, matched = results[0.0], results[2.0]
    assert plain["fm_loss"] == 0.0 and matched["fm_loss"] > 0.0
    others = matched["recon_loss"] + 1e-6 * matched["kl_loss"] + 0.5 * matched["g_adv_loss"]
    assert matched["loss"] == pytest.approx(others + 2.0 * matched["fm_loss"], rel=1e-4)
    assert plain["loss"] == pytest.approx(
        plain["recon_loss"] + 1e-6 * plain["kl_loss"] + 0.5 * plain["g_adv_loss"], rel=1e-4
    )


@pytest.mark.slow
def test_without_adversarial_weight_the_discriminator_never_steps(tiny_phantoms, tmp_path, monkeypatch):
    """--adv_weight 0 is plain reconstruction training: no discriminator passes after the warm-up either."""
    monkeypatch.chdir(BUNDLE_ROOT)
    settings = _overrides(
        tiny_phantoms, tmp_path, max_epochs=2, adv_weight=0.0
    )  # warm-up 1: epoch 2 would be adversarial
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="train", **settings)
    workflow.initialize()
    initial = {k: v.clone() for k, v in workflow.parser.get_parsed_content("discriminator").state_dict().items()}
    workflow.run()
    workflow.finalize()
    last = _load(tmp_path / "autoencoder" / "autoencoder_last.pt")
    assert last["epoch"] == 2
    assert all(torch.equal(last["discriminator"][k], v) for k, v in initial.items())
    assert not last["d_optimizer"]["state"], "the discriminator's optimizer took a step"


def test_fine_tuning_starts_from_the_given_weights(trained, tiny_phantoms, tmp_path, monkeypatch):
    """--init_autoencoder_path loads stage-1 weights before training; without it the start is random."""
    output, _ = trained
    exported = export_weights(
        str(output / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "ae.pt"), "autoencoder"
    )
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        **_overrides(tiny_phantoms, tmp_path / "run", init_autoencoder_path=str(exported)),
    )
    workflow.initialize()
    start = workflow.parser.get_parsed_content("autoencoder").state_dict()
    saved = _load(exported)["autoencoder"]
    assert all(torch.equal(start[k], saved[k].to(start[k].dtype)) for k in saved)


@pytest.mark.slow
def test_decoder_only_fine_tuning_keeps_every_latent(trained, tiny_phantoms, tmp_path, monkeypatch):
    """--freeze_encoder true trains the decoder alone; a resume with the encoder unfrozen is refused."""
    output, _ = trained
    exported = export_weights(
        str(output / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "ae.pt"), "autoencoder"
    )
    monkeypatch.chdir(BUNDLE_ROOT)
    run = tmp_path / "run"
    settings = _overrides(tiny_phantoms, run, max_epochs=2, init_autoencoder_path=str(exported), freeze_encoder=True)
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="train", **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    start, last = _load(exported), _load(run / "autoencoder" / "autoencoder_last.pt")
    assert last["epoch"] == 2 and last["freeze_encoder"] is True
    encoder_side = [k for k in start["autoencoder"] if k.split(".")[0] in LATENT_SPACE_MODULES]
    assert encoder_side and all(torch.equal(last["autoencoder"][k], start["autoencoder"][k]) for k in encoder_side)
    decoder_moved = [
        k
        for k in start["autoencoder"]
        if k.startswith("decoder.") and not torch.equal(last["autoencoder"][k], start["autoencoder"][k])
    ]
    assert decoder_moved, "the decoder did not train"
    assert latent_space_sha256(last) == latent_space_sha256(start)
    assert weights_sha256(last, "autoencoder") != weights_sha256(start, "autoencoder")

    resumed = ConfigWorkflow(
        config_file=CONFIG, workflow_type="train", **{**settings, "max_epochs": 3, "freeze_encoder": False}
    )
    with pytest.raises(RuntimeError) as err:
        _initialize_and_run(resumed)
    error = find_input_error(err.value)
    assert error is not None and "cannot resume, it was saved with freeze_encoder True but this run has False" in str(
        error
    )

    from_scratch = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="train",
        **{**settings, "output_dir": str(tmp_path / "fresh"), "init_autoencoder_path": None},
    )
    with pytest.raises(RuntimeError) as err:
        _initialize_and_run(from_scratch)
    assert "config 'freeze_encoder': true needs --init_autoencoder_path" in str(find_input_error(err.value))


@pytest.mark.slow
def test_label_guided_decoder_trains_from_the_plain_one_on_the_same_latents(
    trained, tiny_phantoms, tmp_path, monkeypatch
):
    """--label_guided_decoder true: a SPADE decoder starts as the plain decoder, learns from the label map."""
    output, _ = trained
    plain = export_weights(str(output / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "ae.pt"), "autoencoder")
    monkeypatch.chdir(BUNDLE_ROOT)
    run = tmp_path / "run"
    settings = _overrides(
        tiny_phantoms,
        run,
        max_epochs=1,
        init_autoencoder_path=str(plain),
        freeze_encoder=True,
        label_guided_decoder=True,
        key_metric="val_recon_contrast",
    )
    workflow = ConfigWorkflow(config_file=CONFIG, workflow_type="train", **settings)
    _initialize_and_run(workflow)
    start, last = _load(plain), _load(run / "autoencoder" / "autoencoder_best.pt")
    assert latent_space_sha256(last) == latent_space_sha256(start)  # UNet, ControlNet and cache stay valid
    modulation = [k for k in last["autoencoder"] if ".mlp_gamma.conv.weight" in k or ".mlp_beta.conv.weight" in k]
    assert modulation and any(last["autoencoder"][k].any() for k in modulation), "the label map was never used"
    assert last["best_metric_name"] == "val_recon_contrast"

    # the stage-1 check config reconstructs with each case's label map
    guided = export_weights(str(run / "autoencoder" / "autoencoder_best.pt"), str(tmp_path / "lg.pt"), "autoencoder")
    check = ConfigWorkflow(
        config_file=layered_config_files("configs/inference_autoencoder.yaml"),
        workflow_type="infer",
        autoencoder_path=guided,
        label_guided_decoder=True,
        **{k: v for k, v in settings.items() if k in ("dataset_dir", "spacing", "spatial_size")},
        output_dir=str(tmp_path / "check"),
    )
    _initialize_and_run(check)
    assert len(list((tmp_path / "check" / "autoencoder_reconstruction").glob("*_recon.nii.gz"))) == 1

    wrong = ConfigWorkflow(
        config_file=layered_config_files("configs/inference_autoencoder.yaml"),
        workflow_type="infer",
        autoencoder_path=guided,
        **{k: v for k, v in settings.items() if k in ("dataset_dir", "spacing", "spatial_size")},
        output_dir=str(tmp_path / "wrong"),
    )
    with pytest.raises(RuntimeError) as err:
        wrong.initialize()
    assert "--label_guided_decoder true" in str(find_input_error(err.value))


@pytest.mark.slow
def test_a_refining_decoder_trains_on_the_finer_grid_over_the_same_latents(
    trained, tiny_phantoms, tmp_path, monkeypatch
):
    """--decoder_upsampling 1 from a label-guided autoencoder: stage 1's workflow on the 2x finer grid trains a
    decoder that outputs that grid while the encoder (the latents of every later stage) stays as it was."""
    output, _ = trained
    plain = export_weights(str(output / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "ae.pt"), "autoencoder")
    monkeypatch.chdir(BUNDLE_ROOT)
    guided_run = _overrides(
        tiny_phantoms, tmp_path / "guided", max_epochs=1, init_autoencoder_path=str(plain), freeze_encoder=True
    )
    _initialize_and_run(
        ConfigWorkflow(config_file=CONFIG, workflow_type="train", label_guided_decoder=True, **guided_run)
    )
    guided = export_weights(
        str(tmp_path / "guided" / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "lg.pt"), "autoencoder"
    )
    fine_grid = {"spacing": [5.0, 5.0, 4.0], "spatial_size": [64, 64, 64], "patch_size": [32, 32, 32]}
    settings = {
        **_overrides(tiny_phantoms, tmp_path / "refining", max_epochs=1, init_autoencoder_path=guided),
        **fine_grid,
        "freeze_encoder": True,
        "label_guided_decoder": True,
        "decoder_upsampling": 1,
    }
    _initialize_and_run(ConfigWorkflow(config_file=CONFIG, workflow_type="train", **settings))
    start, last = _load(guided), _load(tmp_path / "refining" / "autoencoder" / "autoencoder_last.pt")
    assert latent_space_sha256(last) == latent_space_sha256(start) == latent_space_sha256(_load(plain))
    blocks = {name.split(".")[2] for name in last["autoencoder"] if name.startswith("decoder.blocks.")}
    assert len(blocks) == 2 + len({name.split(".")[2] for name in start["autoencoder"] if name.startswith("decoder.")})

    # its reconstructions of the validation case come out on the fine grid
    check = ConfigWorkflow(
        config_file=layered_config_files("configs/inference_autoencoder.yaml"),
        workflow_type="infer",
        autoencoder_path=export_weights(
            str(tmp_path / "refining" / "autoencoder" / "autoencoder_last.pt"), str(tmp_path / "r.pt"), "autoencoder"
        ),
        label_guided_decoder=True,
        decoder_upsampling=1,
        dataset_dir=str(tiny_phantoms),
        spacing=fine_grid["spacing"],
        spatial_size=fine_grid["spatial_size"],
        output_dir=str(tmp_path / "check"),
    )
    _initialize_and_run(check)
    (recon,) = (tmp_path / "check" / "autoencoder_reconstruction").glob("*_recon.nii.gz")
    assert nib.load(recon).shape[:3] == (64, 64, 64)


def test_reconstruction_config_writes_pairs_and_metrics(trained, tiny_phantoms, tmp_path, monkeypatch):
    output, _ = trained
    monkeypatch.chdir(BUNDLE_ROOT)
    best = output / "autoencoder" / "autoencoder_best.pt"
    # ship-ready weights: the autoencoder alone, and they reconstruct exactly as the checkpoint did
    shipped = export_weights(str(best), str(tmp_path / "autoencoder.pt"), "autoencoder")
    assert set(_load(Path(shipped))) >= {"autoencoder", "source_epoch"} and "g_optimizer" not in _load(Path(shipped))
    overrides = {
        k: v
        for k, v in _overrides(tiny_phantoms, tmp_path).items()
        if k in ("dataset_dir", "output_dir", "spacing", "spatial_size")
    }
    workflow = ConfigWorkflow(
        config_file=layered_config_files("configs/inference_autoencoder.yaml"),
        workflow_type="infer",
        autoencoder_path=shipped,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    folder = tmp_path / "autoencoder_reconstruction"
    images, recons = sorted(folder.glob("*_image.nii.gz")), sorted(folder.glob("*_recon.nii.gz"))
    assert len(images) == len(recons) == 1  # one validation case
    assert nib.load(images[0]).shape[:3] == nib.load(recons[0]).shape[:3] == (32, 32, 32)
    metrics = dict(line.split(",") for line in (folder / "metrics.csv").read_text().splitlines())
    # the same volumes through the same weights: the PSNR the training validation recorded as best
    assert float(metrics["psnr"]) == pytest.approx(_load(best)["best_metric"], rel=1e-4)
    assert -1.0 <= float(metrics["ssim"]) <= 1.0
    again = ConfigWorkflow(
        config_file=layered_config_files("configs/inference_autoencoder.yaml"),
        workflow_type="infer",
        autoencoder_path=str(best),
        **overrides,
    )
    with pytest.raises(RuntimeError) as err:  # an existing result is never overwritten unasked
        again.initialize()
    assert "exists and is not empty; pass --overwrite true" in str(find_input_error(err.value))


@pytest.mark.slow
def test_resume_after_sigkill_continues_epochs_and_optimizer(tiny_phantoms, tmp_path):
    ckpt = tmp_path / "autoencoder" / "autoencoder_last.pt"
    cmd = [sys.executable, "-m", "monai.bundle", "run", *_cli(tiny_phantoms, tmp_path, 4)]
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: a checkpoint exists, training goes on
    proc.wait()
    killed_at = _load(ckpt)["epoch"]
    assert 1 <= killed_at < 4, "the run finished before it could be killed"

    result = run_bundle(*_cli(tiny_phantoms, tmp_path, 4))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed autoencoder from {ckpt} at epoch {killed_at}" in result.stdout + result.stderr
    final = _load(ckpt)
    assert final["epoch"] == 4 and final["trainer"]["iteration"] == 4
    # Adam's step counter survived the kill: one step per iteration over all four epochs
    steps = {int(s["step"]) for s in final["g_optimizer"]["state"].values()}
    assert steps == {4}


@pytest.mark.slow
def test_training_runs_from_another_folder_with_bundle_root(tiny_phantoms, tmp_path):
    """Absolute config paths, --bundle_root and the package on PYTHONPATH: training works from any folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = _cli(tiny_phantoms, tmp_path / "out", 1)
    cmd[cmd.index(str(CONFIG))] = str(layered_config_files(str(BUNDLE_ROOT / "configs" / "train_autoencoder.yaml")))
    result = run_bundle(*cmd, "--bundle_root", str(BUNDLE_ROOT), cwd=elsewhere, env={"PYTHONPATH": str(BUNDLE_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "autoencoder" / "autoencoder_last.pt").is_file()
    assert not any(elsewhere.iterdir())


@pytest.mark.slow
def test_ddp_overlay_runs_two_gloo_processes(tiny_phantoms, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        *_cli(tiny_phantoms, tmp_path, 1),
    ]
    cmd[cmd.index(str(CONFIG))] = str([*CONFIG, "configs/multi_gpu.yaml"])
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = _load(tmp_path / "autoencoder" / "autoencoder_last.pt")
    # each rank trains on its own shard: 2 cases / 2 ranks = 1 case, 1 iteration per epoch
    assert last["epoch"] == 1 and last["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in last["autoencoder"]), "weights saved with the DDP prefix"


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing_image", "image file not found"),
        ("patch_too_large", "config 'patch_size' [48, 48, 48] does not fit"),
        ("missing_perceptual_weights", "nope_resnet50.pt"),
    ],
)
@pytest.mark.slow
def test_bad_input_gives_one_clear_line(tiny_phantoms, tmp_path, breakage, expected):
    import json
    import shutil

    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_phantoms, dataset)
    extra: dict[str, str] = {}
    if breakage == "missing_image":
        entry = json.loads((dataset / "datalist.json").read_text())["training"][0]
        (dataset / entry["image"]).unlink()
        expected = f"{dataset / entry['image']}: {expected}"
    elif breakage == "patch_too_large":
        extra = {"patch_size": "[48, 48, 48]"}
    else:
        extra = {"perceptual_weights": str(tmp_path / "nope_resnet50.pt")}
    result = run_bundle(*_cli(dataset, tmp_path / "out", 1, **extra))
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "autoencoder" / "autoencoder_last.pt").exists()
