# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage 3: ControlNet started from the UNet, UNet frozen, full-resolution one-hot conditioning,
class-weighted loss, mask-fidelity validation, and mismatches caught before training."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLE_ROOT, COMMON
from monai.bundle import ConfigParser
from stage_helpers import common_parser, one_thread, overrides, workflow, write_autoencoder, write_unet  # noqa: F401

from scripts.core.checkpoints import weights_sha256
from scripts.core.errors import find_input_error
from scripts.data.labels import class_weight_table
from scripts.evaluation.mask_fidelity import ClassIntensityMeans, MaskContrast
from scripts.generation.sampler import LatentDiffusionSampler
from scripts.models.controlnet import (
    CONTROLNET_ONLY_PREFIXES,
    ControlNetPrepareBatch,
    ControlNetTrainingInferer,
    WeightedMSELoss,
    WeightedTarget,
    init_controlnet_from_unet,
)
from scripts.models.diffusion import training_prepare_batch

CONFIG = "configs/train_controlnet.yaml"
WEIGHTS = {"hcc": 4, "portal_vein": 2, "hepatic_vein": 2}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A seeded random autoencoder and a UNet checkpoint saved as stage 2 saves it, for that autoencoder."""
    folder = tmp_path_factory.mktemp("weights")
    autoencoder = write_autoencoder(folder / "autoencoder.pt")
    unet = write_unet(folder / "diffusion_unet.pt", autoencoder, latent_shift=LATENT_SHIFT)
    return {"autoencoder": autoencoder, "unet": unet}


def _settings(tiny_phantoms: Path, output: Path, weights: dict[str, Path], **extra) -> dict:
    return overrides(
        tiny_phantoms,
        output,
        autoencoder_path=str(weights["autoencoder"]),
        diffusion_unet_path=str(weights["unet"]),
        **extra,
    )


LATENT_SHIFT = [0.3, -0.2, 0.1, 0.0]  # the UNet was trained on latents centred by these


@pytest.fixture(scope="module")
def controlnet_run(tiny_phantoms, weights, tmp_path_factory) -> dict:
    """Two epochs with class loss weights, in-process; keeps what the tests compare."""
    output = tmp_path_factory.mktemp("controlnet_run")
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        run = workflow(CONFIG, **_settings(tiny_phantoms, output, weights, max_epochs=2, class_loss_weights=WEIGHTS))
        run.initialize()
        parse = run.parser.get_parsed_content
        unet, controlnet = parse("diffusion_unet"), parse("controlnet")
        started = {k: v.clone() for k, v in controlnet.state_dict().items()}
        dataset = parse("train#dataset")
        first = {"latent": dataset[0]["image"], "cached": _load(dataset.data[0]["cache_file"])["latent"]}
        run.run()
        result = {
            "output": output,
            "first": first,
            "started": started,
            "unet_after": {k: v.clone() for k, v in unet.state_dict().items()},
            "unet_trainable": [n for n, p in unet.named_parameters() if p.requires_grad],
            "unet_training_mode": unet.training,
            "optimized": sum(p.numel() for g in parse("optimizer").param_groups for p in g["params"]),
            "controlnet_size": sum(p.numel() for p in controlnet.parameters()),
            "metrics": dict(parse("validate#evaluator").state.metrics),
        }
        run.finalize()
    finally:
        os.chdir(cwd)
    return result


def test_controlnet_starts_from_the_unet_weights(controlnet_run, weights):
    unet = _load(weights["unet"])["diffusion_unet"]
    started = controlnet_run["started"]
    shared = [k for k in started if k in unet]
    own = [k for k in started if k not in unet]
    assert len(shared) > len(own) and all(torch.equal(started[k], unet[k]) for k in shared)
    assert own and all(k.startswith(CONTROLNET_ONLY_PREFIXES) for k in own)
    # the ControlNet's output convolutions start at zero: at first it leaves the UNet unchanged
    zero = [k for k in own if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))]
    assert zero and all(not started[k].any() for k in zero)


def test_unet_stays_frozen_and_unchanged_while_the_controlnet_trains(controlnet_run, weights):
    unet = _load(weights["unet"])["diffusion_unet"]
    after = controlnet_run["unet_after"]
    assert after.keys() == unet.keys() and all(torch.equal(after[k], unet[k]) for k in unet)
    assert controlnet_run["unet_trainable"] == [] and controlnet_run["unet_training_mode"] is False
    assert controlnet_run["optimized"] == controlnet_run["controlnet_size"]  # the optimizer holds the ControlNet only

    last = _load(controlnet_run["output"] / "controlnet" / "controlnet_last.pt")
    assert last["epoch"] == 2 and last["trainer"]["iteration"] == 2
    changed = [k for k, v in last["controlnet"].items() if not torch.equal(v, controlnet_run["started"][k])]
    assert any(k.startswith("controlnet_down_blocks.") for k in changed), "the zero convolutions never moved"
    # what inference needs travels with the ControlNet: the UNet's scale_factor and schedule, and identities
    assert last["scale_factor"] == _load(weights["unet"])["scale_factor"] and last["noise_schedule"] == "ddpm"
    assert last["latent_shift"] == LATENT_SHIFT
    # and the ControlNet trained on the latents the UNet saw: centred by its shift, then scaled
    shift = torch.tensor(LATENT_SHIFT).view(-1, 1, 1, 1)
    expected = (controlnet_run["first"]["cached"] - shift) * last["scale_factor"]
    torch.testing.assert_close(torch.as_tensor(controlnet_run["first"]["latent"]), expected)
    assert last["diffusion_unet_sha256"] == weights_sha256(_load(weights["unet"]), "diffusion_unet")
    assert last["labels"] == common_parser()["labels"]


def test_validation_reports_mask_fidelity(controlnet_run):
    metrics = controlnet_run["metrics"]
    assert math.isfinite(metrics["val_mask_contrast"])
    assert metrics["val_mask_contrast"] == pytest.approx(metrics["val_contrast"])
    assert 0.0 <= metrics["val_mean_liver"] <= 1.0 and 0.0 <= metrics["val_mean_portal_vein"] <= 1.0
    # the same contrast in the real validation images: the phantom's HBP liver is brighter than its vessels
    assert metrics["val_real_contrast"] > 0.05

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"images": set(), "scalars": set()}
    for events in (controlnet_run["output"] / "controlnet" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert any(t.startswith("output") for t in tags["images"]) and any(t.startswith("input_1") for t in tags["images"])
    assert {"train_loss", "val_mask_contrast", "val_mean_liver", "val_real_contrast"} <= tags["scalars"]


def test_mask_fidelity_pools_voxels_per_class(contract):
    labels = contract.labels
    first = _toy_label()[0]
    second = first.clone()
    second[second == 4] = 1  # a case without HCC: the pooled means still cover every class
    levels = torch.tensor([0.0, 0.9, 0.3, 0.2, 0.1])  # background, liver, portal vein, hepatic vein, HCC
    images = [levels[first.long()], levels[second.long()] + 0.05]
    means, key = ClassIntensityMeans(labels, reference=([0, 8, 0.5, 0.5, 0.5], [4, 8, 1, 1, 1])), MaskContrast(labels)
    for metric in (means, key):
        metric.reset()
        for image, label in zip(images, (first, second), strict=True):
            metric.update(([image], [label]))
    result = means.compute()
    liver = [(first == 1).sum(), (second == 1).sum()]
    expected_liver = (0.9 * liver[0] + 0.95 * liver[1]) / (liver[0] + liver[1])
    assert result["val_mean_liver"] == pytest.approx(float(expected_liver))
    assert result["val_mean_hcc"] == pytest.approx(0.1) and result["val_mean_hepatic_vein"] == pytest.approx(0.225)
    dark = [((first >= 2) & (first <= 4)), ((second >= 2) & (second <= 4))]
    dark_mean = (images[0][dark[0]].sum() + images[1][dark[1]].sum()) / (dark[0].sum() + dark[1].sum())
    assert key.compute() == pytest.approx(result["val_contrast"]) == pytest.approx(float(expected_liver - dark_mean))
    assert result["val_real_contrast"] == pytest.approx(1.0 - 0.5)  # from the reference sums and counts
    assert math.isnan(ClassIntensityMeans(labels).compute()["val_mean_liver"])  # no voxels yet: NaN, not 0


def _toy_label() -> torch.Tensor:
    """(1, 1, 32, 32, 32) liver block with a one-voxel hepatic-vein line and a small HCC."""
    label = torch.zeros(1, 1, 32, 32, 32, dtype=torch.uint8)
    label[0, 0, 4:28, 4:28, 4:28] = 1
    label[0, 0, 6:26, 17, 13] = 3  # one voxel thick, off the 4-voxel grid of a nearest resize
    label[0, 0, 9:13, 9:13, 9:13] = 4
    return label


def test_prepare_batch_conditions_at_image_resolution_and_weights_small_classes(contract):
    label = _toy_label()
    latents = torch.randn(1, 4, 8, 8, 8)
    scheduler = common_parser().get_parsed_content("ddpm_scheduler_def", instantiate=True)
    table = class_weight_table(contract.labels, WEIGHTS)
    prepare = ControlNetPrepareBatch(training_prepare_batch("ddpm", scheduler), contract, table)
    _, target, _, kwargs = prepare({"image": latents, "label": label}, torch.device("cpu"))

    assert kwargs["cn_cond"].shape == (1, contract.num_classes, 32, 32, 32)  # one-hot, full resolution
    assert torch.equal(kwargs["cn_cond"].argmax(1, keepdim=True), label.long())
    assert isinstance(target, WeightedTarget) and target.weight.shape == (1, 1, 8, 8, 8)
    vein_footprint = F.max_pool3d((label == 3).float(), 4) > 0
    assert vein_footprint.any() and bool((target.weight[vein_footprint] >= 2).all())
    assert bool((target.weight[F.max_pool3d((label == 4).float(), 4) > 0] == 4).all())
    # a nearest resize of the label map would have dropped the thin vein from the weights altogether
    assert not (F.interpolate(label.float(), size=(8, 8, 8), mode="nearest") == 3).any()

    loss = WeightedMSELoss()
    prediction = torch.randn_like(latents)
    expected = ((prediction - target.target) ** 2 * target.weight).mean()
    torch.testing.assert_close(loss(prediction, target), expected)
    torch.testing.assert_close(loss(prediction, target.target), F.mse_loss(prediction, target.target))
    ones = class_weight_table(contract.labels, {})
    uniform = ControlNetPrepareBatch(training_prepare_batch("ddpm", scheduler), contract, ones)
    assert uniform({"image": latents, "label": label}, torch.device("cpu"))[1].weight is None


def test_controlnet_sees_the_full_resolution_mask_and_steers_the_unet(weights, contract):
    parser = common_parser()
    unet = parser.get_parsed_content("diffusion_unet_def", instantiate=True).eval()
    unet.load_state_dict(_load(weights["unet"])["diffusion_unet"])
    controlnet = parser.get_parsed_content("controlnet_def", instantiate=True).eval()
    init_controlnet_from_unet(controlnet, unet.state_dict(), str(weights["unet"]))
    label = _toy_label()

    seen = []
    hook = controlnet.controlnet_cond_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    inferer = ControlNetTrainingInferer(parser.get_parsed_content("ddpm_scheduler_def", instantiate=True), unet)
    latents = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        inferer(latents, controlnet, torch.randn_like(latents), torch.tensor([500]), contract.one_hot(label).float())
    hook.remove()
    assert seen == [torch.Size([1, contract.num_classes, 32, 32, 32])], "the mask was resized before the ControlNet"

    def sample(net, mask):
        scheduler = parser.get_parsed_content("ddim_scheduler_def", instantiate=True)
        sampler = LatentDiffusionSampler(
            unet,
            scheduler,
            decoder=None,
            scale_factor=1.0,
            num_inference_steps=2,
            latent_channels=4,
            compression=4,
            controlnet=net,
            contract=contract,
        )
        return sampler.sample_latents([7], mask)

    unguided = LatentDiffusionSampler(
        unet,
        parser.get_parsed_content("ddim_scheduler_def", instantiate=True),
        None,
        1.0,
        2,
        4,
        4,
        latent_size=(8, 8, 8),
    ).sample_latents([7])
    controlnet.train()  # as during training: the sampler runs it in eval mode and gives it back in train mode
    torch.testing.assert_close(sample(controlnet, label), unguided)  # zero convolutions: no guidance yet
    assert controlnet.training and not unet.training
    steered = copy.deepcopy(controlnet)  # as if trained: its zero-initialised layers have moved
    with torch.no_grad():
        for p in steered.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    other = label.clone()
    other[other == 4] = 1
    assert not torch.allclose(sample(steered, label), unguided)
    assert not torch.allclose(sample(steered, label), sample(steered, other)), "the sample ignores the mask"


def _controlnet_def(**changes) -> dict:
    definition = copy.deepcopy(ConfigParser.load_config_file(str(COMMON))["controlnet_def"])
    definition.update(changes)
    return definition


@pytest.mark.parametrize(
    "breakage",
    [
        "unet_mismatch",
        "missing_unet",
        "schedule_mismatch",
        "other_autoencoder",
        "controlnet_mismatch",
        "conditioning_channels",
        "unknown_weight_class",
    ],
)
def test_mismatch_is_one_clear_error_before_training(breakage, tiny_phantoms, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    settings = _settings(tiny_phantoms, tmp_path / "out", weights, max_epochs=1)
    unet_path = str(weights["unet"])
    if breakage == "unet_mismatch":  # weights of a narrower UNet
        torch.manual_seed(0)
        other = common_parser(**{"diffusion_unet_def#channels": [16, 32, 64]}).get_parsed_content("diffusion_unet_def")
        torch.save(
            {
                "diffusion_unet": other.state_dict(),
                **{k: v for k, v in _load(weights["unet"]).items() if k != "diffusion_unet"},
            },
            tmp_path / "narrow.pt",
        )
        settings["diffusion_unet_path"] = unet_path = str(tmp_path / "narrow.pt")
        expected = f"{unet_path}: diffusion UNet weights does not fit the configured network"
    elif breakage == "missing_unet":
        settings["diffusion_unet_path"] = unet_path = str(tmp_path / "nope.pt")
        expected = f"{unet_path}: diffusion UNet weights not found; train them with configs/train_diffusion.yaml"
    elif breakage == "schedule_mismatch":
        settings["noise_schedule"] = "rflow"
        expected = f"{unet_path}: diffusion UNet was trained with noise_schedule 'ddpm', this run uses 'rflow'"
    elif breakage == "other_autoencoder":  # the UNet was trained on the latents of other weights
        settings["autoencoder_path"] = str(write_autoencoder(tmp_path / "retrained.pt", seed=1))
        expected = f"{unet_path}: diffusion UNet was trained on the latents of another autoencoder's encoder"
    elif breakage == "controlnet_mismatch":  # a ControlNet that does not mirror the UNet
        settings["controlnet_def"] = _controlnet_def(channels=[16, 32, 64])
        expected = f"{unet_path}: diffusion UNet weights do not fit the configured ControlNet"
    elif breakage == "conditioning_channels":  # one-hot map of 5 classes into a 3-channel embedding
        settings["controlnet_def"] = _controlnet_def(conditioning_embedding_in_channels=3)
        expected = "'controlnet_def#conditioning_embedding_in_channels' is 3 but the label contract has 5 classes"
    else:
        settings["class_loss_weights"] = {"tumour": 4}
        expected = "config 'class_loss_weights': unknown class 'tumour'"
    run = workflow(CONFIG, **settings)
    with pytest.raises(RuntimeError) as err:
        run.initialize()
    error = find_input_error(err.value)
    assert error is not None and expected in str(error) and "\n" not in str(error), str(err.value)[-1500:]
    assert not (tmp_path / "out").exists(), "something was written before the error"


def test_resuming_with_another_label_set_is_refused(tiny_phantoms, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    last = tmp_path / "controlnet" / "controlnet_last.pt"
    last.parent.mkdir(parents=True)
    # a checkpoint left by a run with liver and tumour only: its ControlNet takes 3 one-hot channels
    torch.save({"labels": {"background": 0, "liver": 1, "hcc": 2}, "noise_schedule": "ddpm"}, last)
    run = workflow(CONFIG, **_settings(tiny_phantoms, tmp_path, weights, max_epochs=1))
    run.initialize()
    with pytest.raises(RuntimeError) as err:
        run.run()
    assert f"{last}: cannot resume, it was saved with labels" in str(find_input_error(err.value))


def test_fine_tuning_starts_from_given_controlnet_weights(tiny_phantoms, weights, tmp_path, monkeypatch):
    """--init_controlnet_path: the ControlNet starts from those weights, not from the UNet's copy."""
    monkeypatch.chdir(BUNDLE_ROOT)
    torch.manual_seed(7)
    start = tmp_path / "controlnet_start.pt"
    definition = common_parser(**{"spatial_size": [32, 32, 32]}).get_parsed_content("controlnet_def")
    torch.save({"controlnet": definition.state_dict()}, start)
    run = workflow(CONFIG, **_settings(tiny_phantoms, tmp_path / "out", weights, init_controlnet_path=str(start)))
    run.initialize()
    loaded = run.parser.get_parsed_content("controlnet").state_dict()
    saved = torch.load(start, weights_only=True)["controlnet"]
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    default = workflow(CONFIG, **_settings(tiny_phantoms, tmp_path / "out2", weights))
    default.initialize()
    copied = default.parser.get_parsed_content("controlnet").state_dict()
    unet = torch.load(weights["unet"], weights_only=True)["diffusion_unet"]
    shared = [k for k in unet if k in copied]
    assert shared and all(torch.equal(copied[k], unet[k]) for k in shared)


def test_the_shipped_controlnet_accepts_its_unet_in_another_precision_only():
    """The shipped float16 UNet converted to float32 is the same weights; changed values are not."""
    from scripts.models.controlnet import load_controlnet

    parser = ConfigParser()
    parser.read_config(str(COMMON))
    parser["device"] = "$torch.device('cpu')"
    controlnet = parser.get_parsed_content("controlnet_def", instantiate=True)
    shipped = torch.load(BUNDLE_ROOT / "models" / "diffusion_unet.pt", weights_only=True)
    labels = parser.get_parsed_content("labels")
    as_float32 = {**shipped, "diffusion_unet": {k: v.float() for k, v in shipped["diffusion_unet"].items()}}
    load_controlnet(controlnet, str(BUNDLE_ROOT / "models" / "controlnet.pt"), as_float32, "unet32.pt", labels)
    changed = {**as_float32, "diffusion_unet": {k: v + 1e-3 for k, v in as_float32["diffusion_unet"].items()}}
    with pytest.raises(ValueError, match="ControlNet was trained beside other diffusion UNet weights than changed.pt"):
        load_controlnet(controlnet, str(BUNDLE_ROOT / "models" / "controlnet.pt"), changed, "changed.pt", labels)
