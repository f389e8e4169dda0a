# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage 2: latent diffusion UNet training with both schedules, scale_factor through resume,
resume after SIGKILL, DDP on CPU, and mismatches caught before training."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT, run_bundle
from stage_helpers import (  # noqa: F401
    cli,
    common_parser,
    one_thread,
    overrides,
    workflow,
    write_autoencoder,
    write_unet,
)

from scripts.core.errors import BundleInputError, find_input_error
from scripts.models.autoencoder import latent_space_sha256
from scripts.models.diffusion import (
    RFlowPrepareBatch,
    checkpoint_prediction_type,
    load_diffusion_unet,
    predicted_x0,
    training_prepare_batch,
)

CONFIG = "configs/train_diffusion.yaml"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    return write_autoencoder(tmp_path_factory.mktemp("weights") / "autoencoder.pt")


@pytest.fixture(scope="module")
def ddpm_run(tiny_phantoms, autoencoder, tmp_path_factory) -> dict:
    """Two epochs of DDPM training in-process; returns the output folder, initial weights and metrics."""
    output = tmp_path_factory.mktemp("diffusion_run")
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        run = workflow(
            CONFIG,
            **overrides(tiny_phantoms, output, max_epochs=2, num_val_samples=1, autoencoder_path=str(autoencoder)),
        )
        run.initialize()
        initial = {k: v.clone() for k, v in run.parser.get_parsed_content("diffusion_unet").state_dict().items()}
        run.run()
        metrics = dict(run.parser.get_parsed_content("validate#evaluator").state.metrics)
        run.finalize()
    finally:
        os.chdir(cwd)
    return {"output": output, "initial": initial, "metrics": metrics}


def test_ddpm_trains_validates_and_stores_scale_factor(ddpm_run, autoencoder):
    output = ddpm_run["output"]
    last = _load(output / "diffusion_unet" / "diffusion_unet_last.pt")
    manifest = json.loads((output / "latent_cache" / "manifest.json").read_text())
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 2  # 2 training cases, batch 2
    assert last["scale_factor"] == pytest.approx(manifest["scale_factor"]) and last["scale_factor"] > 0
    assert last["latent_shift"] is None  # center_latents is off by default (the resume test turns it on)
    assert last["noise_schedule"] == "ddpm" and last["latent_space_sha256"] == latent_space_sha256(_load(autoencoder))
    changed = [k for k, v in last["diffusion_unet"].items() if not torch.equal(v, ddpm_run["initial"][k])]
    # MONAI zero-initialises each residual branch's last convolution, which holds back the gradients of
    # the layers before it for the first steps: after 2 steps a good part, not all, has moved
    assert len(changed) > len(ddpm_run["initial"]) // 4 and any(k.startswith("out.") for k in changed), changed

    best = _load(output / "diffusion_unet" / "diffusion_unet_best.pt")
    metrics = ddpm_run["metrics"]
    assert best["best_metric"] == pytest.approx(min(best["best_metric"], metrics["val_x0_nmse"]))
    # x0 error of unit-variance latents; the high-noise rows are the harder part of it
    assert 0.0 < metrics["val_x0_nmse"] < 10.0 and metrics["val_x0_nmse_high_t"] > 0.0
    assert last["prediction_type"] == "v_prediction"
    assert len(last["latent_channel_std"]) == 4 and all(s > 0 for s in last["latent_channel_std"])
    # the sampled latents' spread is compared with the real latents' (0: the same)
    assert math.isfinite(metrics["val_sample_latent_std_error"]) and metrics["val_sample_latent_std_error"] >= 0.0
    # decoded samples: clipped to the [0, 1] range of preprocessed images, and not constant
    assert 0.0 <= metrics["val_sample_mean"] <= 1.0 and metrics["val_sample_std"] > 0.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"images": set(), "scalars": set()}
    for events in (output / "diffusion_unet" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert any(t.startswith("val_sample") for t in tags["images"]), tags
    assert {"train_loss", "val_x0_nmse", "val_x0_nmse_high_t", "val_sample_latent_std_error"} <= tags["scalars"]

    from scripts.tools.figures import save_training_curves

    curves = save_training_curves(
        {"ddpm": str(output / "diffusion_unet" / "tensorboard")},
        ["val_x0_nmse", "val_sample_latent_std_error", "not_logged"],
        str(output / "curves.png"),
    )
    assert Path(curves).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rflow_prepare_batch_targets_the_velocity():
    scheduler = common_parser().get_parsed_content("rflow_scheduler_def", instantiate=True)
    latents = torch.randn(3, 4, 8, 8, 8)
    images, target, _, kwargs = RFlowPrepareBatch(scheduler)({"image": latents}, torch.device("cpu"))
    torch.testing.assert_close(target, latents - kwargs["noise"])
    t = kwargs["timesteps"]
    assert t.shape == (3,) and t.is_floating_point() and bool(((t > 0) & (t < scheduler.num_train_timesteps)).all())
    # the interpolation the inferer applies moves towards the data along the target velocity
    noisy = scheduler.add_noise(latents, kwargs["noise"], t)
    fraction = (t / scheduler.num_train_timesteps).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy + fraction * target, latents, rtol=1e-4, atol=1e-5)


def test_rflow_schedule_trains_and_samples(tiny_phantoms, autoencoder, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    run = workflow(
        CONFIG,
        **overrides(
            tiny_phantoms,
            tmp_path,
            max_epochs=1,
            num_val_samples=1,
            noise_schedule="rflow",
            autoencoder_path=str(autoencoder),
        ),
    )
    run.initialize()
    assert type(run.parser.get_parsed_content("train#prepare_batch")).__name__ == "RFlowPrepareBatch"
    assert type(run.parser.get_parsed_content("sampling_scheduler")).__name__ == "RFlowScheduler"
    initial = {k: v.clone() for k, v in run.parser.get_parsed_content("diffusion_unet").state_dict().items()}
    run.run()
    metrics = run.parser.get_parsed_content("validate#evaluator").state.metrics
    last = _load(tmp_path / "diffusion_unet" / "diffusion_unet_last.pt")
    assert last["noise_schedule"] == "rflow" and last["epoch"] == 1
    assert any(not torch.equal(v, initial[k]) for k, v in last["diffusion_unet"].items())
    # an untrained velocity predicts ~0, so the implied clean latent is about the noisy one: x0 error ~ O(1)
    assert 0.05 < metrics["val_x0_nmse"] < 10.0
    assert math.isfinite(metrics["val_sample_mean"]) and metrics["val_sample_std"] > 0.0


def test_center_latents_trains_on_latents_centred_by_the_cache_channel_means(
    ddpm_run, tiny_phantoms, autoencoder, tmp_path, monkeypatch
):
    monkeypatch.chdir(BUNDLE_ROOT)
    output = tmp_path / "run"
    shutil.copytree(ddpm_run["output"] / "latent_cache", output / "latent_cache")  # a new run on the same cache
    settings = overrides(tiny_phantoms, output, max_epochs=1, num_val_samples=0, autoencoder_path=str(autoencoder))
    run = workflow(CONFIG, center_latents=True, **settings)
    run.initialize()
    manifest = json.loads((output / "latent_cache" / "manifest.json").read_text())
    shift = run.parser.get_parsed_content("latent_shift")
    assert shift == pytest.approx(manifest["latent_channel_mean"]) and max(abs(v) for v in shift) > 1e-3
    latents = torch.stack([torch.as_tensor(case["image"]) for case in run.parser.get_parsed_content("train#dataset")])
    assert latents.transpose(0, 1).flatten(1).mean(dim=1).abs().max() < 1e-5  # every channel averages 0
    run.run()
    assert _load(output / "diffusion_unet" / "diffusion_unet_last.pt")["latent_shift"] == shift


def test_resume_restores_latent_scaling_and_refuses_another_schedule(
    ddpm_run, tiny_phantoms, autoencoder, tmp_path, monkeypatch
):
    monkeypatch.chdir(BUNDLE_ROOT)
    output = tmp_path / "run"
    shutil.copytree(ddpm_run["output"], output)
    last_path = output / "diffusion_unet" / "diffusion_unet_last.pt"
    last = _load(last_path)
    # a checkpoint trained with another scale and centring than the cache's: resuming must keep the checkpoint's
    last["scale_factor"] = stored = 0.5 * last["scale_factor"]
    last["latent_shift"] = stored_shift = [0.25 * (c + 1) for c in range(4)]
    torch.save(last, last_path)

    run = workflow(
        CONFIG, **overrides(tiny_phantoms, output, max_epochs=3, num_val_samples=1, autoencoder_path=str(autoencoder))
    )
    run.initialize()
    assert not run.parser.get_parsed_content("latent_cache").built  # the copied cache is reused
    dataset = run.parser.get_parsed_content("train#dataset")
    cached = _load(Path(dataset.data[0]["cache_file"]))["latent"]
    shift = torch.tensor(stored_shift).view(-1, 1, 1, 1)
    torch.testing.assert_close(dataset[0]["image"], (cached - shift) * stored)
    run.run()
    resumed = _load(last_path)
    assert resumed["epoch"] == 3 and resumed["trainer"]["iteration"] == 3
    assert resumed["scale_factor"] == stored and resumed["latent_shift"] == stored_shift
    # the extended run still learns: its learning rate decays over the new max_epochs, not the old
    assert any(not torch.equal(v, last["diffusion_unet"][k]) for k, v in resumed["diffusion_unet"].items())

    other = workflow(
        CONFIG,
        **overrides(tiny_phantoms, output, max_epochs=4, noise_schedule="rflow", autoencoder_path=str(autoencoder)),
    )
    other.initialize()
    with pytest.raises(RuntimeError) as err:
        other.run()
    message = str(find_input_error(err.value))
    assert f"{last_path}: cannot resume, it was saved with noise_schedule 'ddpm' but this run has 'rflow'" in message
    assert _load(last_path)["epoch"] == 3

    epsilon = workflow(
        CONFIG,
        **overrides(tiny_phantoms, output, max_epochs=4, prediction_type="epsilon", autoencoder_path=str(autoencoder)),
    )
    epsilon.initialize()
    with pytest.raises(RuntimeError) as err:
        epsilon.run()
    assert "saved with prediction_type 'v_prediction' but this run has 'epsilon'" in str(find_input_error(err.value))
    # the averaged weights are what the checkpoint offers later stages; the optimized ones are kept to resume
    assert set(resumed) >= {"diffusion_unet", "diffusion_unet_online"}
    assert any(not torch.equal(v, resumed["diffusion_unet_online"][k]) for k, v in resumed["diffusion_unet"].items())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_training_target_and_implied_clean_latent_agree_for_each_prediction_type(prediction_type):
    """The prepared target is what the scheduler's sampling step expects, and a perfect prediction of it
    implies the true clean latent at every noise level, high ones included."""
    scheduler = common_parser(prediction_type=prediction_type).get_parsed_content(
        "ddpm_scheduler_def", instantiate=True
    )
    assert scheduler.prediction_type == prediction_type
    prepare = training_prepare_batch("ddpm", scheduler)
    latents = torch.randn(4, 4, 8, 8, 8)
    _, target, _, kwargs = prepare({"image": latents}, torch.device("cpu"))
    noise, t = kwargs["noise"], torch.tensor([0, 300, 900, 999])
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, kwargs["timesteps"])
    torch.testing.assert_close(target, expected)
    target = prepare.get_target(latents, noise, t)
    noisy = scheduler.add_noise(latents, noise, t)
    torch.testing.assert_close(predicted_x0(scheduler, noisy, target, t), latents, rtol=1e-3, atol=2e-3)
    # an error of 0.1 in the prediction at t = 999: epsilon amplifies it ~84x in the clean latent, v does not
    error = (predicted_x0(scheduler, noisy[3:], target[3:] + 0.1, t[3:]) - latents[3:]).abs().mean()
    assert (error > 5.0) if prediction_type == "epsilon" else (error < 0.11)


def test_rflow_implied_clean_latent():
    scheduler = common_parser().get_parsed_content("rflow_scheduler_def", instantiate=True)
    latents, noise = torch.randn(3, 4, 8, 8, 8), torch.randn(3, 4, 8, 8, 8)
    t = torch.tensor([10.0, 500.0, 990.0])
    noisy = scheduler.add_noise(latents, noise, t)
    torch.testing.assert_close(predicted_x0(scheduler, noisy, latents - noise, t), latents, rtol=1e-4, atol=1e-4)


def test_unet_of_another_prediction_type_is_refused_and_old_checkpoints_are_epsilon(autoencoder, tmp_path):
    unet = common_parser().get_parsed_content("diffusion_unet_def", instantiate=True)
    sha = _load(autoencoder)
    path = write_unet(tmp_path / "unet.pt", autoencoder, prediction_type="epsilon")
    with pytest.raises(
        BundleInputError,
        match="predicts 'epsilon', this run uses prediction_type 'v_prediction'; " "pass --prediction_type epsilon",
    ):
        load_diffusion_unet(unet, str(path), "ddpm", sha, "v_prediction")
    assert checkpoint_prediction_type(load_diffusion_unet(unet, str(path), "ddpm", sha, "epsilon")) == "epsilon"
    legacy = _load(path)
    del legacy["prediction_type"]
    assert checkpoint_prediction_type(legacy) == "epsilon"


@pytest.mark.slow
def test_resume_after_sigkill(tiny_phantoms, autoencoder, tmp_path):
    ckpt = tmp_path / "diffusion_unet" / "diffusion_unet_last.pt"
    args = cli(CONFIG, tiny_phantoms, tmp_path, max_epochs=8, num_val_samples=0, autoencoder_path=autoencoder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see stage_helpers.one_thread
    proc = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: a checkpoint exists, training goes on
    proc.wait()
    killed = _load(ckpt)
    assert 1 <= killed["epoch"] < 8, "the run finished before it could be killed"

    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed diffusion_unet from {ckpt} at epoch {killed['epoch']}" in result.stdout + result.stderr
    assert "latent cache: reusing" in result.stdout + result.stderr
    final = _load(ckpt)
    assert final["epoch"] == 8 and final["trainer"]["iteration"] == 8
    assert final["scale_factor"] == killed["scale_factor"]
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {8}  # Adam's counters survived


@pytest.mark.slow
def test_ddp_overlay_runs_two_gloo_processes(tiny_phantoms, autoencoder, tmp_path):
    configs = [CONFIG, "configs/multi_gpu.yaml"]
    args = cli(configs, tiny_phantoms, tmp_path, max_epochs=1, num_val_samples=1, autoencoder_path=autoencoder)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        *args,
    ]
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = _load(tmp_path / "diffusion_unet" / "diffusion_unet_last.pt")
    # each rank trains on its own shard: 2 cases / 2 ranks = 1 case, 1 iteration per epoch
    assert last["epoch"] == 1 and last["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in last["diffusion_unet"]), "weights saved with the DDP prefix"
    # rank 0 built the cache once; the other rank waited and reused it
    assert (result.stdout + result.stderr).count("cases encoded into") == 1
    assert last["scale_factor"] == json.loads((tmp_path / "latent_cache" / "manifest.json").read_text())["scale_factor"]


@pytest.mark.parametrize("breakage", ["autoencoder_mismatch", "missing_autoencoder", "unknown_schedule"])
def test_mismatch_is_one_clear_error_before_training(breakage, tiny_phantoms, autoencoder, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    settings = overrides(tiny_phantoms, tmp_path / "out", max_epochs=1, autoencoder_path=str(autoencoder))
    if breakage == "autoencoder_mismatch":  # weights of an autoencoder with 8 latent channels, not 4
        torch.manual_seed(0)
        other = common_parser(**{"autoencoder_def#latent_channels": 8}).get_parsed_content("autoencoder_def")
        torch.save({"autoencoder": other.state_dict()}, tmp_path / "other.pt")
        settings["autoencoder_path"] = str(tmp_path / "other.pt")
        expected = f"{tmp_path / 'other.pt'}: autoencoder weights does not fit the configured network"
    elif breakage == "missing_autoencoder":
        settings["autoencoder_path"] = str(tmp_path / "nope.pt")
        expected = (
            f"{tmp_path / 'nope.pt'}: autoencoder weights not found; train them with configs/train_autoencoder.yaml"
        )
    else:
        settings["noise_schedule"] = "ddim"
        expected = (
            "config 'noise_schedule': unknown schedule 'ddim'; use --noise_schedule ddpm or --noise_schedule rflow"
        )
    run = workflow(CONFIG, **settings)
    with pytest.raises(RuntimeError) as err:
        run.initialize()
    error = find_input_error(err.value)
    assert error is not None and expected in str(error) and "\n" not in str(error)
    assert not (tmp_path / "out").exists(), "something was written before the error"


@pytest.mark.slow
def test_cli_error_is_one_line(tiny_phantoms, autoencoder, tmp_path):
    result = run_bundle(*cli(CONFIG, tiny_phantoms, tmp_path, noise_schedule="ddim", autoencoder_path=autoencoder))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "config 'noise_schedule': unknown schedule 'ddim'" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "setting,value,expected",
    [
        ("ema_decay", 1.0, "config 'ema_decay': expected a number >= 0.001 and <= 0.99999, got 1.0"),
        ("batch_size", "two", "config 'batch_size': expected an integer >= 1, got 'two'"),
        ("prediction_type", "sample", "config 'prediction_type': expected one of v_prediction, epsilon, got 'sample'"),
    ],
)
def test_bad_training_settings_stop_before_any_work(
    setting, value, expected, tiny_phantoms, autoencoder, tmp_path, monkeypatch
):
    monkeypatch.chdir(BUNDLE_ROOT)
    run = workflow(CONFIG, **overrides(tiny_phantoms, tmp_path, autoencoder_path=str(autoencoder), **{setting: value}))
    with pytest.raises(Exception) as caught:
        run.initialize()
    assert expected in str(find_input_error(caught.value))
    assert not (tmp_path / "latent_cache").exists()  # nothing encoded


def test_the_average_starts_from_the_fine_tuning_weights_whatever_is_resolved_first(
    autoencoder, tiny_phantoms, tmp_path
):
    """The EMA copies the UNet when it is built: it declares (_requires_) that the starting weights load first,
    so asking for the average alone, before `initialize`, still gives the fine-tuning start, not random weights."""
    os.chdir(BUNDLE_ROOT)
    start = write_unet(tmp_path / "unet.pt", autoencoder, seed=5)
    run = workflow(CONFIG, **overrides(tiny_phantoms, tmp_path / "out", init_diffusion_unet_path=str(start)))
    average = run.parser.get_parsed_content("diffusion_unet_ema").state_dict()
    saved = torch.load(start, weights_only=True)["diffusion_unet"]
    assert all(torch.equal(average[k], saved[k]) for k in saved)


def test_fine_tuning_starts_from_given_weights_also_on_another_autoencoder(
    tiny_phantoms, autoencoder, tmp_path, monkeypatch
):
    """--init_diffusion_unet_path: the UNet starts from those weights, even when they were trained on another
    autoencoder's latents (fine-tuning after a new stage 1); another prediction type is still refused."""
    monkeypatch.chdir(BUNDLE_ROOT)
    other_autoencoder = write_autoencoder(tmp_path / "other_autoencoder.pt", seed=3)
    start = write_unet(tmp_path / "unet.pt", other_autoencoder, seed=5)
    run = workflow(
        CONFIG,
        **overrides(
            tiny_phantoms, tmp_path / "out", autoencoder_path=str(autoencoder), init_diffusion_unet_path=str(start)
        ),
    )
    run.initialize()
    loaded = run.parser.get_parsed_content("diffusion_unet").state_dict()
    saved = torch.load(start, weights_only=True)["diffusion_unet"]
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    epsilon = write_unet(tmp_path / "epsilon.pt", autoencoder, seed=5, prediction_type="epsilon")
    refused = workflow(
        CONFIG,
        **overrides(
            tiny_phantoms, tmp_path / "out2", autoencoder_path=str(autoencoder), init_diffusion_unet_path=str(epsilon)
        ),
    )
    with pytest.raises(Exception) as caught:
        refused.initialize()
    assert "predicts 'epsilon', this run uses prediction_type 'v_prediction'" in str(find_input_error(caught.value))
