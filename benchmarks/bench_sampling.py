# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Sampling speed (and quality) of DDPM-1000, DDIM-50 and rectified flow at 30 steps.

What is timed is the bundle's guided sampler, ``scripts.generation.sampler.LatentDiffusionSampler`` with the
ControlNet, built from the configs (``configs/inference.yaml``, plus ``configs/hires.yaml`` for
the paper-scale grid) and fed the demo masks brought onto the model grid exactly as inference does
(``scripts.generation.inference.MaskToImage``). Per volume it reports

* ``seconds_per_step``: median time of one reverse step (ControlNet + UNet + scheduler);
* ``overhead_seconds_per_volume``: everything before the first step (one-hot map, the conditioning
  embedding computed once, starting noise, timesteps);
* ``sampling_seconds_per_volume`` and ``decode_seconds_per_volume`` (the tiled autoencoder);
* ``seconds_per_volume``: their sum, the number the speed ratios compare.

Where a setting is not run in full (DDPM-1000 in quick mode, every setting at the hires grid on a
CPU) only the first ``measured_steps`` steps are timed and the volume time is
``overhead + steps * seconds_per_step + decode``, flagged ``"extrapolated": true``: the cost of a
step does not depend on which step it is. With trained weights (``models/diffusion_unet.pt`` and
``models/controlnet.pt``) each fully sampled setting is also scored on its own outputs
(``benchmarks/quality.py``); with seeded random weights speed is still exact, quality is ``null``.

The ``speedups`` block measures, before/after, the choices that matter for speed: the
conditioning embedding computed once per volume rather than per step, ``torch.inference_mode``,
1 vs 2 CPU threads, several masks per batch, the cost of autoguidance's second UNet, and
(``--cuda-experimental``, CUDA only, untested here) channels-last-3d memory and ``torch.compile``.

    python benchmarks/bench_sampling.py [--quick] [--no-hires] [--threads N]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import ControlNetDiffusionInferer
from monai.networks.utils import eval_mode
from tqdm import tqdm

import scripts.generation.sampler as sampler_module
from benchmarks.common import (
    DEMO_MASKS,
    MODELS,
    RANDOM_WEIGHTS_NOTE,
    BenchOptions,
    Stopwatch,
    config_files,
    fmt,
    grid_overrides,
    in_bundle_root,
    markdown_table,
    parse_configs,
    seeded_network,
    sync,
    torch_threads,
    trained_weights,
)
from benchmarks.quality import quality_report
from scripts.generation.autoguidance import load_guide_unet
from scripts.generation.inference import MaskToImage, output_seed
from scripts.generation.mask_sources import find_masks
from scripts.generation.sampler import LatentDiffusionSampler, set_sampling_timesteps
from scripts.generation.weights import SAMPLER_SCHEDULES
from scripts.models.autoencoder import load_autoencoder_weights
from scripts.models.controlnet import load_controlnet
from scripts.models.diffusion import freeze, load_diffusion_unet

__all__ = [
    "SamplerSetting",
    "SETTINGS",
    "StepClock",
    "limit_steps",
    "default_conv3d",
    "Pipeline",
    "build_pipeline",
    "run",
    "markdown",
]

#: The claim this suite checks: rectified flow at 30 steps vs DDPM at 1000 steps, per volume.
TARGET_RFLOW_SPEEDUP = 25.0


@dataclass(frozen=True)
class SamplerSetting:
    """A sampler and its number of reverse steps."""

    name: str
    sampler: str
    steps: int


SETTINGS = (
    SamplerSetting("ddpm_1000", "ddpm", 1000),
    SamplerSetting("ddim_50", "ddim", 50),
    SamplerSetting("rflow_30", "rflow", 30),
)


class StepClock:
    """Timestamps at the start of every reverse step.

    Each step of MONAI's guided sampling loop calls the ControlNet first, so a forward pre-hook on
    it marks step boundaries; ``step_seconds`` are the gaps between them (the last one ends when the
    loop returns) and ``overhead_seconds`` is what came before the first step.
    """

    def __init__(self, controlnet: torch.nn.Module, device: torch.device) -> None:
        self.controlnet = controlnet
        self.device = device
        self.stamps: list[float] = []

    def _mark(self, *_: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def __enter__(self) -> StepClock:
        self._handle = self.controlnet.register_forward_pre_hook(self._mark)
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.end = time.perf_counter()
        self._handle.remove()

    @property
    def step_seconds(self) -> list[float]:
        ends = self.stamps[1:] + [self.end]
        return [b - a for a, b in zip(self.stamps, ends, strict=False)]

    @property
    def overhead_seconds(self) -> float:
        return (self.stamps[0] if self.stamps else self.end) - self.start

    @property
    def total_seconds(self) -> float:
        return self.end - self.start


@contextlib.contextmanager
def limit_steps(scheduler: Any, max_steps: int | None) -> Iterator[None]:
    """Keep only the first ``max_steps`` timesteps each time the sampler sets the schedule.

    The schedule itself (spacing, rectified flow's shift) is computed for the full step count; only
    the loop is cut short, so each timed step costs what it costs in a full run.
    """
    if max_steps is None:
        yield
        return
    original = scheduler.set_timesteps

    def truncated(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[:max_steps]

    scheduler.set_timesteps = truncated  # an instance attribute shadows the method
    try:
        yield
    finally:
        vars(scheduler).pop("set_timesteps", None)  # MONAI schedulers are Modules that skip Module.__init__


@contextlib.contextmanager
def default_conv3d() -> Iterator[None]:
    """Sampling with PyTorch's default CPU 3D convolution kernels: the sampler's oneDNN switch
    (``scripts.generation.sampler.onednn_conv3d``) turned off, the "before" of the ``onednn_conv3d`` study.

    For one volume PyTorch picks oneDNN only when ``N * C * D * H > 20480`` (a rule written for 2D
    images that ignores the last axis), so every layer on the demo latent grid runs the slower
    ``slow_conv3d`` unless the sampler switches it.
    """
    original = sampler_module.onednn_conv3d
    sampler_module.onednn_conv3d = lambda *networks: contextlib.nullcontext()
    try:
        yield
    finally:
        sampler_module.onednn_conv3d = original


@dataclass
class Pipeline:
    """The guided sampling pipeline of one grid, built from the bundle configs."""

    grid: str
    device: torch.device
    parser: Any
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    guide_unet: torch.nn.Module  # autoguidance UNet: timed in the speed-ups block only
    decoder: Any  # scripts.networks.tiled_autoencoder.TiledAutoencoder, or None: decoding not timed here
    contract: Any
    labels: dict[str, int]
    spacing: list[float]
    spatial_size: list[int]
    scale_factor: float
    weights: str
    trained_schedule: str | None  # noise schedule of trained weights; None for random ones

    def sampler(
        self, setting: SamplerSetting, unet: torch.nn.Module | None = None, autoguidance_weight: float = 1.0
    ) -> LatentDiffusionSampler:
        """A fresh guided sampler (its own scheduler) for ``setting``; autoguidance off unless a weight is given."""
        scheduler = self.parser.get_parsed_content(f"{setting.sampler}_scheduler_def", lazy=False)
        return LatentDiffusionSampler(
            unet=self.unet if unet is None else unet,
            scheduler=scheduler,
            decoder=self.decoder,
            scale_factor=self.scale_factor,
            num_inference_steps=setting.steps,
            latent_channels=int(self.parser.get_parsed_content("latent_channels")),
            compression=int(self.parser.get_parsed_content("autoencoder_compression")),
            controlnet=self.controlnet,
            contract=self.contract,
            guide_unet=self.guide_unet,
            autoguidance_weight=autoguidance_weight,
        )

    def masks(self, count: int) -> list[tuple[str, torch.Tensor, int]]:
        """``(name, label (1, 1, *spatial_size) on the device, seed)`` of the first ``count`` demo masks.

        Brought onto the model grid by ``MaskToImage``'s own transforms; the seed is the one
        inference gives the mask at ``--seed 0``.
        """
        to_grid = MaskToImage(
            sampler=None, contract=self.contract, spacing=self.spacing, spatial_size=self.spatial_size
        )
        found = []
        for item in find_masks(mask_dir=str(DEMO_MASKS))[:count]:
            label, nifti = to_grid.read(item["label"])
            on_mask_grid = MetaTensor(
                torch.as_tensor(label[None].astype(np.float32)), affine=torch.as_tensor(nifti.affine)
            )
            on_model_grid = to_grid.to_model_grid(on_mask_grid).as_tensor()
            found.append((item["name"], on_model_grid[None].to(self.device), output_seed(0, item["name"], 0)))
        return found


def build_pipeline(options: BenchOptions, grid: str) -> Pipeline:
    """Networks from the configs; the demo weights in models/ when present, else seeded random weights.

    Decoding is part of the pipeline on the demo grid and on CUDA; a paper-scale decode on a CPU is
    left to the decode suite (``bench_decode.py``).
    """
    device = options.device
    trained = trained_weights(options.weights_dir) if grid == "demo" else None
    # decode as the main job does: with the label-guided autoencoder when one is there
    label_guided = trained is not None and "label_guided_autoencoder" in trained
    overrides = {
        "device": f"$torch.device({str(device)!r})",
        "label_guided_decoder": label_guided,
        # decoded on the model grid: the main job's refining decode (2x finer) is timed by bench_inference.py
        "decoder_upsampling": 0,
        **grid_overrides(options, grid),
    }
    if trained is not None:  # the file of that decoder (the config's default is the refining one)
        overrides["autoencoder_path"] = str(trained["label_guided_autoencoder" if label_guided else "autoencoder"])
    if trained is None:
        # seeded random networks have no checkpoint for inference.yaml to read the schedule from: sample with
        # the schedule and prediction type that configs/common.yaml trains with
        common = parse_configs(config_files("configs/common.yaml", grid), overrides)
        overrides.update({key: str(common.get_parsed_content(key)) for key in ("noise_schedule", "prediction_type")})
    parser = parse_configs(config_files("configs/inference.yaml", grid), overrides)
    unet = freeze(seeded_network(parser, "diffusion_unet_def", seed=0).to(device))
    controlnet = freeze(seeded_network(parser, "controlnet_def", seed=1).to(device))
    guide_unet = freeze(seeded_network(parser, "diffusion_unet_def", seed=3).to(device))
    decoder = None
    if grid == "demo" or device.type == "cuda":
        torch.manual_seed(2)
        decoder = parser.get_parsed_content("tiled_autoencoder_def", lazy=False)
    labels = {str(k): int(v) for k, v in parser.get_parsed_content("labels").items()}
    scale_factor, schedule, weights = 1.0, None, RANDOM_WEIGHTS_NOTE
    if trained is not None:
        autoencoder = load_autoencoder_weights(
            decoder.autoencoder, str(trained["label_guided_autoencoder" if label_guided else "autoencoder"])
        )
        unet_checkpoint = load_diffusion_unet(unet, str(trained["diffusion_unet"]), None, autoencoder)
        load_controlnet(controlnet, str(trained["controlnet"]), unet_checkpoint, str(trained["diffusion_unet"]), labels)
        if "diffusion_unet_guide" in trained:
            load_guide_unet(guide_unet, str(trained["diffusion_unet_guide"]), unet_checkpoint, autoencoder)
        scale_factor, schedule = float(unet_checkpoint["scale_factor"]), str(unet_checkpoint["noise_schedule"])
        weights = f"trained demo weights from {options.weights_dir} (noise_schedule {schedule})"
    elif grid == "demo" and decoder is not None and (MODELS / "autoencoder.pt").is_file():
        # the demo autoencoder is shipped first: decode with it even while the later stages are untrained
        load_autoencoder_weights(decoder.autoencoder, str(MODELS / "autoencoder.pt"))
        weights = f"{RANDOM_WEIGHTS_NOTE} (UNet, ControlNet); trained autoencoder from models/"
    return Pipeline(
        grid=grid,
        device=device,
        parser=parser,
        unet=unet,
        controlnet=controlnet,
        guide_unet=guide_unet,
        decoder=decoder,
        contract=parser.get_parsed_content("label_contract"),
        labels=labels,
        spacing=[float(s) for s in parser.get_parsed_content("spacing")],
        spatial_size=[int(s) for s in parser.get_parsed_content("spatial_size")],
        scale_factor=scale_factor,
        weights=weights,
        trained_schedule=schedule,
    )


def time_volume(
    sampler: LatentDiffusionSampler,
    label: torch.Tensor,
    seeds: Sequence[int],
    max_steps: int | None = None,
    decode: bool = True,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Sample (and decode) one batch, timing every step; returns the timings and the images."""
    device = label.device
    torch.manual_seed(int(seeds[0]))  # DDPM's stochastic steps draw from the global generator
    clock = StepClock(sampler.controlnet, device)
    with context(), limit_steps(sampler.scheduler, max_steps), clock:
        latents = sampler.sample_latents(list(seeds), label)
    images, decode_seconds = None, None
    if decode and sampler.decoder is not None:
        with context(), Stopwatch(device) as watch:
            images = sampler.decode(latents, label)
        decode_seconds = watch.seconds
    return {
        "step_seconds": clock.step_seconds,
        "overhead_seconds": clock.overhead_seconds,
        "sampling_seconds": clock.total_seconds,
        "decode_seconds": decode_seconds,
        "images": images,
    }


def quality_reason(pipe: Pipeline, setting: SamplerSetting, extrapolated: bool) -> str | None:
    """Why a setting gets no quality numbers (None: it gets them)."""
    if extrapolated:
        return "timing extrapolated from the first steps: no finished images to score"
    if pipe.trained_schedule is None:
        return "seeded random weights (no trained diffusion_unet.pt and controlnet.pt): quality needs trained weights"
    if SAMPLER_SCHEDULES[setting.sampler] != pipe.trained_schedule:
        return (
            f"weights trained with noise_schedule {pipe.trained_schedule!r}: sampler {setting.sampler!r} does not apply"
        )
    if pipe.decoder is None:
        return "images not decoded on this device"
    return None


def time_setting(
    pipe: Pipeline,
    setting: SamplerSetting,
    masks: Sequence[tuple[str, torch.Tensor, int]],
    max_steps: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Every mask sampled with ``setting`` (the first ``max_steps`` steps when set); timings and quality."""
    extrapolated = max_steps is not None and max_steps < setting.steps
    measured = min(setting.steps, max_steps) if max_steps is not None else setting.steps
    sampler = pipe.sampler(setting)
    runs, images, labels = [], [], []
    for _name, label, seed in tqdm(masks, desc=f"{pipe.grid} {setting.name}", unit="volume", disable=not progress):
        run = time_volume(sampler, label, [seed], max_steps=max_steps if extrapolated else None)
        runs.append(run)
        if run["images"] is not None and not extrapolated:
            images.append(run["images"][0])
            labels.append(label[0])
    step = statistics.median(s for r in runs for s in r["step_seconds"])
    overhead = statistics.mean(r["overhead_seconds"] for r in runs)
    sampling = overhead + setting.steps * step if extrapolated else statistics.mean(r["sampling_seconds"] for r in runs)
    decodes = [r["decode_seconds"] for r in runs if r["decode_seconds"] is not None]
    decode = statistics.mean(decodes) if decodes else None
    result = {
        "setting": setting.name,
        "sampler": setting.sampler,
        "num_inference_steps": setting.steps,
        "measured_steps": measured,
        "extrapolated": extrapolated,
        "num_volumes": len(runs),
        "masks": [name for name, _, _ in masks],
        "seconds_per_step": step,
        "overhead_seconds_per_volume": overhead,
        "sampling_seconds_per_volume": sampling,
        "decode_seconds_per_volume": decode,
        "includes_decode": decode is not None,
        "seconds_per_volume": sampling + (decode or 0.0),
    }
    result.update(quality_report(images, labels, pipe.labels, quality_reason(pipe, setting, extrapolated)))
    return result


def speed_ratios(settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-volume speed-ups between the settings of one grid, measured in the same run."""
    ratios: dict[str, Any] = {}
    pairs = [("rflow_30", "ddpm_1000"), ("ddim_50", "ddpm_1000"), ("rflow_30", "ddim_50")]
    for fast, slow in pairs:
        if fast in settings and slow in settings:
            a, b = settings[fast], settings[slow]
            ratios[f"{fast}_vs_{slow}_per_volume"] = b["seconds_per_volume"] / a["seconds_per_volume"]
            ratios[f"{fast}_vs_{slow}_sampling_only"] = (
                b["sampling_seconds_per_volume"] / a["sampling_seconds_per_volume"]
            )
            ratios[f"{fast}_vs_{slow}_extrapolated"] = bool(a["extrapolated"] or b["extrapolated"])
    if "rflow_30_vs_ddpm_1000_per_volume" in ratios:
        ratios["target_rflow_30_vs_ddpm_1000"] = TARGET_RFLOW_SPEEDUP
        ratios["meets_target"] = ratios["rflow_30_vs_ddpm_1000_per_volume"] >= TARGET_RFLOW_SPEEDUP
    return ratios


# ---------------------------------------------------------------------- speed-ups, before/after
def _median_step(runs: Sequence[dict[str, Any]]) -> float:
    return statistics.median(s for r in runs for s in r["step_seconds"])


def _fastest_step(runs: Sequence[dict[str, Any]]) -> float:
    return min(s for r in runs for s in r["step_seconds"])


def _per_step_embedding_run(
    sampler: LatentDiffusionSampler, label: torch.Tensor, seed: int, steps: int
) -> dict[str, Any]:
    """The guided loop without ``conditioning_embedded_once``: MONAI's ControlNet embeds the mask at every step."""
    device = label.device
    condition = sampler.contract.one_hot(label).float()
    latent_size = [s // sampler.compression for s in label.shape[2:]]
    clock = StepClock(sampler.controlnet, device)
    with limit_steps(sampler.scheduler, steps), clock:
        noise = sampler.noise([seed], latent_size, device)
        set_sampling_timesteps(sampler.scheduler, sampler.num_inference_steps, latent_size)
        with eval_mode(sampler.unet, sampler.controlnet), torch.no_grad():
            ControlNetDiffusionInferer(sampler.scheduler).sample(
                noise, sampler.unet, sampler.controlnet, condition, sampler.scheduler, verbose=False
            )
    return {"step_seconds": clock.step_seconds, "overhead_seconds": clock.overhead_seconds}


def _before_after(before: Callable[[], dict], after: Callable[[], dict], repeats: int, what: str) -> dict[str, Any]:
    """Run ``before`` and ``after`` alternately ``repeats`` times, so drifting load from other jobs hits both.

    Reports median step times (what a run sees) and the fastest step of each (the least disturbed
    by other processes on a shared machine).
    """
    runs_before, runs_after = [], []
    for _ in range(repeats):
        runs_before.append(before())
        runs_after.append(after())
    b, a = _median_step(runs_before), _median_step(runs_after)
    b_min, a_min = _fastest_step(runs_before), _fastest_step(runs_after)
    result = {
        "change": what,
        "seconds_per_step_before": b,
        "seconds_per_step_after": a,
        "speedup": b / a,
        "fastest_step_seconds_before": b_min,
        "fastest_step_seconds_after": a_min,
        "speedup_fastest_steps": b_min / a_min,
    }
    if all(r.get("decode_seconds") is not None for r in runs_before + runs_after):
        result["decode_seconds_before"] = statistics.median(r["decode_seconds"] for r in runs_before)
        result["decode_seconds_after"] = statistics.median(r["decode_seconds"] for r in runs_after)
        for name, runs in (("before", runs_before), ("after", runs_after)):
            result[f"seconds_per_volume_{name}"] = statistics.median(
                r["sampling_seconds"] + r["decode_seconds"] for r in runs
            )
    return result


def speedups(pipe: Pipeline, options: BenchOptions, masks: Sequence[tuple[str, torch.Tensor, int]]) -> dict[str, Any]:
    """Before/after timings of the speed choices on the demo grid (rectified flow's schedule, first steps)."""
    steps = 8 if options.quick else 30
    repeats = 1 if options.quick else 3
    setting = SamplerSetting("rflow_30", "rflow", 30)
    sampler = pipe.sampler(setting)
    _, label, seed = masks[0]
    out: dict[str, Any] = {"measured_steps": steps, "repeats": repeats, "setting": setting.name}
    bar = tqdm(total=7, desc="speed-ups", unit="study", disable=not options.progress)

    def guided(context: Callable[[], Any] = contextlib.nullcontext, decode: bool = False) -> Callable[[], dict]:
        return lambda: time_volume(sampler, label, [seed], max_steps=steps, decode=decode, context=context)

    out["conditioning_embedded_once"] = _before_after(
        lambda: _per_step_embedding_run(sampler, label, seed, steps),
        guided(),
        repeats,
        "ControlNet conditioning embedding computed once per volume instead of at every step (scripts/generation/sampler.py)",
    )
    bar.update()
    out["inference_mode"] = _before_after(
        guided(),
        guided(torch.inference_mode),
        repeats,
        "torch.inference_mode around sampling (the sampler itself uses torch.no_grad)",
    )
    bar.update()
    autoguided = pipe.sampler(setting, autoguidance_weight=float(pipe.parser.get_parsed_content("autoguidance_weight")))
    out["autoguidance"] = _before_after(
        guided(),
        lambda: time_volume(autoguided, label, [seed], max_steps=steps, decode=False),
        repeats,
        "autoguidance: the guide UNet evaluated beside the UNet at every step (scripts/generation/autoguidance.py, "
        "on by default): a cost, not a speed-up",
    )
    bar.update()
    if options.device.type == "cpu":
        out["onednn_conv3d"] = _before_after(
            guided(default_conv3d, decode=True),
            guided(decode=True),
            repeats,
            "3D convolutions of one volume on oneDNN instead of PyTorch's slow_conv3d "
            "(scripts.generation.sampler.onednn_conv3d, on by default)",
        )
    else:
        out["onednn_conv3d"] = {"skipped": "CPU only"}
    bar.update()
    if options.device.type == "cpu":
        threads = {}
        for n in sorted({1, min(2, os.cpu_count() or 1)}):
            with torch_threads(n):
                runs = [guided()() for _ in range(repeats)]
                threads[f"threads_{n}"] = {
                    "seconds_per_step": _median_step(runs),
                    "fastest_step_seconds": _fastest_step(runs),
                }
        if "threads_2" in threads:
            threads["speedup_2_vs_1"] = (
                threads["threads_1"]["seconds_per_step"] / threads["threads_2"]["seconds_per_step"]
            )
        threads["note"] = "shares the cores with whatever else runs (see environment.load_average_1_5_15_min)"
        out["cpu_threads"] = threads
    else:
        out["cpu_threads"] = {"skipped": "CPU only"}
    bar.update()
    out["batch_sampling"] = _batch_study(pipe, sampler, masks, steps)
    bar.update()
    out["cuda_experimental"] = _cuda_experimental(pipe, options, setting, label, seed, steps)
    bar.update()
    bar.close()
    return out


def _batch_study(
    pipe: Pipeline, sampler: LatentDiffusionSampler, masks: Sequence[tuple[str, torch.Tensor, int]], steps: int
) -> dict[str, Any]:
    """Seconds per volume (first ``steps`` steps + decode): the masks one at a time vs all in one batch."""
    if len(masks) < 2:
        return {"skipped": "needs at least two masks (--num-masks)"}
    one_by_one = [time_volume(sampler, label, [seed], max_steps=steps) for _, label, seed in masks]
    batch = time_volume(sampler, torch.cat([m[1] for m in masks]), [m[2] for m in masks], max_steps=steps)
    n = len(masks)
    single = sum(r["sampling_seconds"] + (r["decode_seconds"] or 0.0) for r in one_by_one) / n
    batched = (batch["sampling_seconds"] + (batch["decode_seconds"] or 0.0)) / n
    return {
        "batch_size": n,
        "measured_steps": steps,
        "seconds_per_volume_one_by_one": single,
        "seconds_per_volume_batched": batched,
        "speedup": single / batched,
    }


def _cuda_experimental(
    pipe: Pipeline, options: BenchOptions, setting: SamplerSetting, label: torch.Tensor, seed: int, steps: int
) -> dict[str, Any]:
    """channels-last-3d and ``torch.compile`` of the UNet: CUDA only, behind ``--cuda-experimental``.

    UNTESTED: written on a CPU-only machine; these paths have never run. They leave the networks
    as they found them (memory format restored, the compiled wrapper dropped).
    """
    if pipe.device.type != "cuda":
        return {"skipped": "CUDA only: not run on a CPU device"}
    if not options.cuda_experimental:
        return {"skipped": "pass --cuda-experimental to time channels-last-3d and torch.compile (untested code path)"}
    result: dict[str, Any] = {"untested_code_path": True}
    baseline = _median_step([time_volume(pipe.sampler(setting), label, [seed], max_steps=steps, decode=False)])
    result["seconds_per_step_baseline"] = baseline
    try:
        for net in (pipe.unet, pipe.controlnet):
            net.to(memory_format=torch.channels_last_3d)
        step = _median_step([time_volume(pipe.sampler(setting), label, [seed], max_steps=steps, decode=False)])
        result["channels_last_3d"] = {"seconds_per_step": step, "speedup": baseline / step}
    except Exception as e:  # report and go on: an experimental path must not sink the run
        result["channels_last_3d"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        for net in (pipe.unet, pipe.controlnet):
            net.to(memory_format=torch.contiguous_format)
    try:
        compiled = torch.compile(pipe.unet)
        with Stopwatch(pipe.device) as warm:  # the first call compiles
            time_volume(pipe.sampler(setting, unet=compiled), label, [seed], max_steps=2, decode=False)
        step = _median_step(
            [time_volume(pipe.sampler(setting, unet=compiled), label, [seed], max_steps=steps, decode=False)]
        )
        result["torch_compile"] = {
            "seconds_per_step": step,
            "speedup": baseline / step,
            "compile_seconds": warm.seconds,
        }
    except Exception as e:
        result["torch_compile"] = {"error": f"{type(e).__name__}: {e}"}
    return result


# ---------------------------------------------------------------------- the suite
def grid_plan(options: BenchOptions, grid: str) -> dict[str, Any] | None:
    """How much of each setting to run on a grid: ``{"max_steps": {setting: int | None}, "num_masks": {...}}``.

    None: the grid is skipped (the reason is reported).
    """
    cuda = options.device.type == "cuda"
    if grid == "demo":
        masks = options.num_masks or (1 if options.quick else 4)
        return {
            "max_steps": {"ddpm_1000": 20 if options.quick else None, "ddim_50": None, "rflow_30": None},
            "num_masks": {"ddpm_1000": 1, "ddim_50": masks, "rflow_30": masks},
        }
    if options.quick and not cuda:
        return None
    cap = (10 if options.quick else None) if cuda else 2
    return {"max_steps": {s.name: cap for s in SETTINGS}, "num_masks": {s.name: 1 for s in SETTINGS}}


def run_grid(options: BenchOptions, grid: str) -> dict[str, Any]:
    """Every sampler setting on one grid, plus the speed-ups on the demo grid."""
    plan = grid_plan(options, grid)
    if plan is None:
        return {"skipped": "quick mode on a CPU: a paper-scale step takes ~20-30 s here; run without --quick"}
    pipe = build_pipeline(options, grid)
    masks = pipe.masks(max(plan["num_masks"].values()))
    # warm-up: first calls allocate and pick kernels; not part of any figure
    time_volume(pipe.sampler(SETTINGS[-1]), masks[0][1], [masks[0][2]], max_steps=1, decode=grid == "demo")
    settings = {}
    for setting in SETTINGS:
        settings[setting.name] = time_setting(
            pipe, setting, masks[: plan["num_masks"][setting.name]], plan["max_steps"][setting.name], options.progress
        )
    result = {
        "grid": grid,
        "spatial_size": pipe.spatial_size,
        "latent_size": [s // int(pipe.parser.get_parsed_content("autoencoder_compression")) for s in pipe.spatial_size],
        "spacing_mm": pipe.spacing,
        "weights": pipe.weights,
        "settings": settings,
        "ratios": speed_ratios(settings),
    }
    if grid == "demo":
        result["speedups"] = speedups(pipe, options, pipe.masks(2 if options.quick else 4))
    return result


def run(options: BenchOptions) -> dict[str, Any]:
    """The sampling suite: the demo grid, and the paper-scale grid when ``options.hires``."""
    grids = ["demo"] + (["hires"] if options.hires else [])
    with in_bundle_root(), torch_threads(options.threads):
        return {"grids": {grid: run_grid(options, grid) for grid in grids}}


def markdown(result: dict[str, Any]) -> str:
    """The suite's tables for ``summary.md``."""
    lines = ["## Sampling", ""]
    for grid, r in result["grids"].items():
        if "skipped" in r:
            lines += [f"**{grid} grid**: skipped ({r['skipped']}).", ""]
            continue
        size = "x".join(str(s) for s in r["spatial_size"])
        lines += [
            f"**{grid} grid** ({size} image, {'x'.join(str(s) for s in r['latent_size'])} latent; {r['weights']})",
            "",
        ]
        rows, reasons = [], []
        for s in r["settings"].values():
            quality = s["quality"] or {}
            contrast = quality.get("mask_fidelity", {}).get("contrast") if quality else None
            fid = (quality.get("fid") or {}).get("fid_2_5d") if quality else None
            if s["quality_reason"]:
                reasons.append(f"{s['setting']}: {s['quality_reason']}")
            rows.append(
                [
                    s["setting"],
                    f"{s['measured_steps']}/{s['num_inference_steps']}",
                    s["seconds_per_step"],
                    s["sampling_seconds_per_volume"],
                    s["decode_seconds_per_volume"],
                    s["seconds_per_volume"],
                    s["extrapolated"],
                    s["num_volumes"],
                    contrast if contrast is not None else "n/a",
                    fid if fid is not None else "n/a",
                ]
            )
        lines += [
            markdown_table(
                [
                    "setting",
                    "steps timed",
                    "s/step",
                    "sampling s/volume",
                    "decode s/volume",
                    "s/volume",
                    "extrapolated",
                    "volumes",
                    "mask contrast (liver - vessels/HCC)",
                    "FID 2.5D (offline extractor)",
                ],
                rows,
            ),
            "",
        ]
        halves = [((s["quality"] or {}).get("fid") or {}).get("real_halves_fid_2_5d") for s in r["settings"].values()]
        if any(h is not None for h in halves):
            lines += [
                "FID 2.5D against the real test split of the phantoms "
                f"(between two halves of it: {fmt(next(h for h in halves if h is not None))}); the extractor is the "
                "shipped stage-1 encoder: these FIDs rank settings, they are not comparable with published ones.",
                "",
            ]
        if reasons:
            lines += ["Quality notes: " + "; ".join(reasons) + ".", ""]
        ratios = r["ratios"]
        if "rflow_30_vs_ddpm_1000_per_volume" in ratios:
            lines += [
                f"rflow-30 vs DDPM-1000: **{fmt(ratios['rflow_30_vs_ddpm_1000_per_volume'])}x** faster per volume "
                f"({fmt(ratios['rflow_30_vs_ddpm_1000_sampling_only'])}x sampling only; "
                f"target {fmt(ratios['target_rflow_30_vs_ddpm_1000'])}x, "
                f"{'met' if ratios['meets_target'] else 'NOT met'}; "
                f"{'extrapolated' if ratios['rflow_30_vs_ddpm_1000_extrapolated'] else 'measured'}). "
                f"DDIM-50 vs DDPM-1000: {fmt(ratios.get('ddim_50_vs_ddpm_1000_per_volume'))}x.",
                "",
            ]
        if "speedups" in r:
            sp = r["speedups"]
            rows = []
            for key in ("conditioning_embedded_once", "inference_mode", "onednn_conv3d", "autoguidance"):
                v = sp[key]
                if "skipped" in v:
                    continue
                rows.append(
                    [
                        key,
                        v["seconds_per_step_before"],
                        v["seconds_per_step_after"],
                        v["speedup"],
                        v["speedup_fastest_steps"],
                    ]
                )
            th = sp["cpu_threads"]
            if "threads_2" in th:
                rows.append(
                    [
                        "2 vs 1 CPU threads",
                        th["threads_1"]["seconds_per_step"],
                        th["threads_2"]["seconds_per_step"],
                        th["speedup_2_vs_1"],
                        th["threads_1"]["fastest_step_seconds"] / th["threads_2"]["fastest_step_seconds"],
                    ]
                )
            lines += [
                f"Speed-ups (demo grid, first {sp['measured_steps']} rflow steps x {sp['repeats']} alternating runs; "
                "median s/step; last column from the fastest step of each, the least disturbed by other jobs):",
                "",
                markdown_table(["change", "before", "after", "speed-up", "speed-up (fastest steps)"], rows),
                "",
            ]
            one = sp["onednn_conv3d"]
            if "seconds_per_volume_after" in one:
                lines += [
                    f"oneDNN 3D convolutions per volume (first {sp['measured_steps']} steps + decode): "
                    f"{fmt(one['seconds_per_volume_before'])} -> {fmt(one['seconds_per_volume_after'])} s "
                    f"(decode {fmt(one['decode_seconds_before'])} -> {fmt(one['decode_seconds_after'])} s).",
                    "",
                ]
            b = sp["batch_sampling"]
            if "speedup" in b:
                lines += [
                    f"Batch of {b['batch_size']} masks: {fmt(b['seconds_per_volume_one_by_one'])} -> "
                    f"{fmt(b['seconds_per_volume_batched'])} s/volume "
                    f"({fmt(b['speedup'])}x; first {b['measured_steps']} steps + decode).",
                    "",
                ]
            lines += [
                f"CUDA channels-last-3d / torch.compile: {sp['cuda_experimental'].get('skipped', 'see sampling.json')}.",
                "",
            ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.run_all import main as run_all_main

    sys.exit(run_all_main(["--suites", "sampling", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
