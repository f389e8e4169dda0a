# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Training speed of every stage at the demo grid, and what the latent cache buys stage 2.

Each stage's trainer is the one its training config builds (``configs/train_autoencoder.yaml``,
``train_diffusion.yaml``, ``train_controlnet.yaml`` through ``monai.bundle.ConfigParser``), with
its networks, losses, optimizer, batch preparation and inferer; only the handlers are dropped
(no validation, checkpoints or logs inside the timed epochs). Each trainer runs two epochs: the
first warms up, the second is reported (``seconds_per_epoch`` includes data loading,
``median_iteration_seconds`` is the training step alone).

Stage 2 runs twice:

* ``diffusion_unet_latent_cache``: as configured, from latents encoded once
  (``scripts.data.latent_cache``); the one-off cost of building the cache is reported beside it;
* ``diffusion_unet_encode_on_the_fly``: the same trainer fed preprocessed images (kept in memory
  by MONAI's ``CacheDataset``, as stage 1 does), each batch encoded by the frozen autoencoder
  inside the step (:class:`EncodingPrepareBatch`), i.e. training without the latent cache;
* ``diffusion_unet_load_and_encode_on_the_fly``: the same, the images read and preprocessed anew
  every epoch (MONAI's ``Dataset``), as a dataset too large for memory would be.

The stage-1 trainer runs with the adversarial term on from the first epoch (its steady state).
Stage 3 starts from a seeded random stage-2 UNet (speed does not depend on the weights).

    python benchmarks/bench_training.py [--quick] [--max-cases N] [--dataset-dir D]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from ignite.engine import Events
from monai.engines import PrepareBatch

from benchmarks.common import (
    MODELS,
    RANDOM_WEIGHTS_NOTE,
    BenchOptions,
    Stopwatch,
    fmt,
    grid_overrides,
    in_bundle_root,
    markdown_table,
    parse_configs,
    write_seeded_checkpoint,
)
from scripts.models.autoencoder import latent_space_sha256

__all__ = ["TARGET_CACHE_SPEEDUP", "EncodingPrepareBatch", "time_trainer", "run", "markdown"]

#: The latent cache should make a stage-2 epoch at least this many times faster.
TARGET_CACHE_SPEEDUP = 5.0


class EncodingPrepareBatch(PrepareBatch):
    """Stage-2 batches without the latent cache: encode the image batch, then the schedule's preparation.

    The frozen autoencoder's latent MEAN (``TiledAutoencoder.encode``) is scaled by ``scale_factor``,
    as ``scripts.data.latent_cache.LoadLatentCased`` does for cached latents, and handed to ``diffusion``
    (noise, timesteps, target), so the training step is otherwise identical.
    """

    def __init__(self, encoder: Any, scale_factor: float, diffusion: PrepareBatch, image_key: str = "image") -> None:
        self.encoder = encoder
        self.scale_factor = float(scale_factor)
        self.diffusion = diffusion
        self.image_key = image_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking)
        batch = dict(batchdata)
        batch[self.image_key] = self.encoder.encode(image).to(image.device) * self.scale_factor
        return self.diffusion(batch, device, non_blocking, **kwargs)


def time_trainer(trainer: Any, device: torch.device) -> dict[str, Any]:
    """Run ``trainer`` (``max_epochs`` 2) and time its epochs and iterations; the last epoch is reported."""
    epochs: list[float] = []
    iterations: list[list[float]] = []
    clock: dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_start(_: Any) -> None:
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        clock["epoch"] = time.perf_counter()
        iterations.append([])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(_: Any) -> None:
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        epochs.append(time.perf_counter() - clock["epoch"])

    @trainer.on(Events.ITERATION_STARTED)
    def _iteration_start(_: Any) -> None:
        clock["iteration"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iteration_end(_: Any) -> None:
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        iterations[-1].append(time.perf_counter() - clock["iteration"])

    trainer.run()
    last, steps = epochs[-1], iterations[-1]
    batch_size = trainer.data_loader.batch_size
    return {
        "seconds_per_epoch": last,
        "iterations_per_epoch": len(steps),
        "batch_size": batch_size,
        "cases_per_epoch": len(trainer.data_loader.dataset),
        "iterations_per_second": len(steps) / last,
        "seconds_per_iteration": last / len(steps),
        "median_iteration_seconds": statistics.median(steps),
        "warmup_epoch_seconds": epochs[0],
        "epochs_run": len(epochs),
    }


def training_datalist(options: BenchOptions) -> tuple[Path, Path, dict[str, int], str]:
    """A datalist for the suite (absolute paths): the dataset's, cut to ``max_cases`` training cases.

    Without a dataset, phantoms are generated into the work folder first (not timed).
    """
    root = Path(options.dataset_dir)
    note = str(root)
    if not (root / "datalist.json").is_file():
        from scripts.tools.phantom import write_phantom_dataset

        root = options.work_dir / "phantoms"
        write_phantom_dataset(str(root), num_cases=8 if options.quick else 40, seed=0)
        note = f"generated phantoms ({options.dataset_dir} has no datalist.json)"
    full = json.loads((root / "datalist.json").read_text())
    max_cases = options.max_cases or (4 if options.quick else None)
    training = full["training"][:max_cases] if max_cases else full["training"]
    validation = full["validation"][: max(1, len(training) // 4)]
    absolute = {
        section: [{k: str((root / v).resolve()) for k, v in item.items()} for item in items]
        for section, items in (("training", training), ("validation", validation), ("test", []))
    }
    path = options.work_dir / "training_datalist.json"
    path.write_text(json.dumps(absolute))
    return root, path, {"training": len(training), "validation": len(validation)}, note


def _stage_parser(config: str, options: BenchOptions, base: dict[str, Any], **extra: Any) -> Any:
    """A training config with the suite's overrides; handlers dropped so nothing but training runs."""
    return parse_configs([config], {**base, "train#handlers": [], **extra})


def run(options: BenchOptions) -> dict[str, Any]:
    """Iterations per second of every stage, and stage 2 with vs without the latent cache."""
    device = options.device
    with in_bundle_root():
        dataset_dir, datalist, counts, dataset_note = training_datalist(options)
        output = options.work_dir / "training"
        base = {
            "dataset_dir": str(dataset_dir),
            "datalist": str(datalist),
            "output_dir": str(output),
            "device": f"$torch.device({str(device)!r})",
            "max_epochs": 2,
            "num_workers": 0,
            **grid_overrides(options, "demo"),
        }
        autoencoder_path = MODELS / "autoencoder.pt"
        if not autoencoder_path.is_file():
            autoencoder_path = write_seeded_checkpoint(
                parse_configs(["configs/common.yaml"], base),
                "autoencoder_def",
                "autoencoder",
                options.work_dir / "autoencoder.pt",
                seed=0,
            )
        base["autoencoder_path"] = str(autoencoder_path)
        stages: dict[str, Any] = {}

        # stage 1: the VAE-GAN step, adversarial term on
        spatial = parse_configs(["configs/common.yaml"], base).get_parsed_content("spatial_size")
        configured_patch = parse_configs(["configs/train_autoencoder.yaml"]).get_parsed_content("patch_size")
        patch = [min(p, s) for p, s in zip(configured_patch, spatial, strict=True)]
        parser = _stage_parser(
            "configs/train_autoencoder.yaml", options, base, adversarial_warmup_epochs=0, patch_size=patch
        )
        parser.get_parsed_content("train#dataset")  # preprocessing cached in memory before the clock starts
        stages["autoencoder"] = {
            **time_trainer(parser.get_parsed_content("train#trainer"), device),
            "patch_size": patch,
        }

        # stage 2 with the latent cache, as configured
        parser = _stage_parser("configs/train_diffusion.yaml", options, base)
        with Stopwatch(device) as build:
            cache = parser.get_parsed_content("latent_cache")
        parser.get_parsed_content("train#dataset")
        cached = time_trainer(parser.get_parsed_content("train#trainer"), device)
        cached["cache_build_seconds"] = build.seconds
        cached["cache_cases"] = counts["training"] + counts["validation"]
        stages["diffusion_unet_latent_cache"] = cached
        scale_factor = cache.scale_factor

        # stage 2 without the latent cache: every batch encoded inside the step, the images either kept
        # in memory after preprocessing (CacheDataset, as stage 1 does) or loaded and preprocessed each time
        for name, dataset in (
            (
                "diffusion_unet_encode_on_the_fly",
                {
                    "_target_": "CacheDataset",
                    "data": "@train#datalist",
                    "transform": "@pair_preprocessing",
                    "cache_rate": 1.0,
                    "num_workers": 0,
                },
            ),
            (
                "diffusion_unet_load_and_encode_on_the_fly",
                {"_target_": "Dataset", "data": "@train#datalist", "transform": "@pair_preprocessing"},
            ),
        ):
            parser = _stage_parser(
                "configs/train_diffusion.yaml",
                options,
                base,
                scale_factor=scale_factor,
                **{
                    "train#dataset": dataset,
                    "train#prepare_batch": {
                        "_target_": "benchmarks.bench_training.EncodingPrepareBatch",
                        "encoder": "@tiled_autoencoder",
                        "scale_factor": "@scale_factor",
                        "diffusion": "$scripts.models.diffusion.training_prepare_batch(@noise_schedule, @noise_scheduler)",
                    },
                },
            )
            parser.get_parsed_content("load_autoencoder")  # frozen weights into the encoder the batches use
            with Stopwatch(device) as preprocess:
                parser.get_parsed_content("train#dataset")
            stages[name] = {
                **time_trainer(parser.get_parsed_content("train#trainer"), device),
                "dataset_setup_seconds": preprocess.seconds,
            }

        # stage 3: the ControlNet beside a frozen (seeded random) stage-2 UNet
        unet_path = write_seeded_checkpoint(
            parse_configs(["configs/common.yaml"], base),
            "diffusion_unet_def",
            "diffusion_unet",
            options.work_dir / "unet.pt",
            seed=1,
            scale_factor=scale_factor,
            noise_schedule=str(parser.get_parsed_content("noise_schedule")),
            prediction_type=str(parser.get_parsed_content("prediction_type")),
            latent_space_sha256=latent_space_sha256(torch.load(autoencoder_path, weights_only=True)),
        )
        parser = _stage_parser("configs/train_controlnet.yaml", options, base, diffusion_unet_path=str(unet_path))
        parser.get_parsed_content("train#dataset")
        stages["controlnet"] = time_trainer(parser.get_parsed_content("train#trainer"), device)

    cached = stages["diffusion_unet_latent_cache"]
    comparisons = {}
    for name in ("diffusion_unet_encode_on_the_fly", "diffusion_unet_load_and_encode_on_the_fly"):
        other = stages[name]
        saved = other["seconds_per_epoch"] - cached["seconds_per_epoch"]
        comparisons[f"vs_{name.removeprefix('diffusion_unet_')}"] = {
            "epoch_speedup": other["seconds_per_epoch"] / cached["seconds_per_epoch"],
            "step_speedup": other["median_iteration_seconds"] / cached["median_iteration_seconds"],
            "meets_target": other["seconds_per_epoch"] / cached["seconds_per_epoch"] >= TARGET_CACHE_SPEEDUP,
            "break_even_epochs": cached["cache_build_seconds"] / saved if saved > 0 else None,
        }
    return {
        "grid": [int(s) for s in spatial],
        "dataset": dataset_note,
        "cases": counts,
        "weights": f"{'models/autoencoder.pt' if autoencoder_path.parent == MODELS else RANDOM_WEIGHTS_NOTE} for the frozen "
        "autoencoder; other networks start from their initialisation (speed does not depend on the weights)",
        "stages": stages,
        "latent_cache": {
            "target_epoch_speedup": TARGET_CACHE_SPEEDUP,
            "cache_build_seconds": cached["cache_build_seconds"],
            **comparisons,
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The suite's table for ``summary.md``."""
    rows = []
    for name, s in result["stages"].items():
        rows.append(
            [
                name,
                s["batch_size"],
                s["iterations_per_epoch"],
                s["median_iteration_seconds"],
                s["iterations_per_second"],
                s["seconds_per_epoch"],
            ]
        )
    c = result["latent_cache"]
    lines = [
        "## Training (demo grid)",
        "",
        f"Grid {'x'.join(map(str, result['grid']))}; {result['cases']['training']} training cases "
        f"({result['dataset']}); {result['weights']}.",
        "",
        markdown_table(
            ["stage", "batch", "iterations/epoch", "s/iteration (median step)", "iterations/s (epoch)", "s/epoch"], rows
        ),
        "",
        f"Latent cache (built once in {fmt(c['cache_build_seconds'])} s) vs encoding every batch in the step "
        f"(target {fmt(c['target_epoch_speedup'])}x per epoch):",
        "",
    ]
    for name, label in (
        ("vs_encode_on_the_fly", "preprocessed images kept in memory"),
        ("vs_load_and_encode_on_the_fly", "images loaded and preprocessed every epoch"),
    ):
        v = c[name]
        lines.append(
            f"- {label}: **{fmt(v['epoch_speedup'])}x** per epoch ({fmt(v['step_speedup'])}x per step; "
            f"{'met' if v['meets_target'] else 'NOT met'}; cache paid back after {fmt(v['break_even_epochs'])} epochs)"
        )
    return "\n".join(lines + [""])


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.run_all import main as run_all_main

    sys.exit(run_all_main(["--suites", "training", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
