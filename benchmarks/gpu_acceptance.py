# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""GPU acceptance: every CUDA path of the bundle run and measured on one GPU, in one command.

    python benchmarks/gpu_acceptance.py                 # on a CUDA machine: under 10 minutes on one GPU
    python benchmarks/gpu_acceptance.py --dry-run       # anywhere: checks every config the checks use
    python benchmarks/gpu_acceptance.py --device cpu --only training_hires,sampling_hires   # paper scale on a CPU

It prints one table and writes ``benchmarks/results/gpu_acceptance.json`` (``--output``). Checks:

* ``main_job``: the README's main job (the four demo masks, shipped weights) as a subprocess.
* ``sampling_hires``: the ``configs/hires.yaml`` grid (256 x 256 x 128 image, 64 x 64 x 32 latent,
  seeded random networks) sampled with each sampler: seconds per step and per volume (decode
  included on CUDA), peak memory. DDPM's 1000 steps are extrapolated from the first steps.
* ``training_demo`` / ``training_hires``: one training iteration of each stage (autoencoder,
  diffusion UNet, ControlNet) with the stage's own config, mixed precision on CUDA; on CUDA one
  warm-up epoch first, the second epoch's single iteration is reported with the peak memory of both.
* ``multi_gpu``: ``torchrun --nproc_per_node=1`` of ``configs/multi_gpu.yaml`` on each stage (NCCL on
  CUDA), one epoch with validation.
* ``decode_hires``: whole against tiled decode at the hires grid (``bench_decode.py``'s workers).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the rise of the process's peak
resident memory on a CPU. Nothing is downloaded: the phantoms are generated, missing weights are
seeded random ones (speed and memory do not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    BUNDLE_ROOT,
    MODELS,
    RANDOM_WEIGHTS_NOTE,
    BenchOptions,
    config_files,
    current_rss_bytes,
    environment,
    fmt,
    in_bundle_root,
    markdown_table,
    parse_configs,
    peak_rss_bytes,
    reset_peak_rss,
    write_json_atomic,
    write_seeded_checkpoint,
)
from scripts.core.settings import layered_config_files
from scripts.models.autoencoder import latent_space_sha256

__all__ = ["CHECKS", "STAGES", "SAMPLERS", "plan", "dry_run", "run", "table", "main"]

CHECKS = ("main_job", "sampling_hires", "training_demo", "training_hires", "multi_gpu", "decode_hires")
STAGES = {"autoencoder": "train_autoencoder", "diffusion_unet": "train_diffusion", "controlnet": "train_controlnet"}
#: sampler -> (steps per volume, steps timed on CUDA); a CPU times one step of each
SAMPLERS = {"ddpm": (1000, 20), "ddim": (35, 35), "rflow": (30, 30)}
MAIN_JOB = ["configs/common.yaml", "configs/inference.yaml"]
MULTI_GPU = "configs/multi_gpu.yaml"
RESULTS = BUNDLE_ROOT / "benchmarks" / "results" / "gpu_acceptance.json"


# ---------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory over a block: ``max_memory_allocated`` on CUDA, the peak resident-memory rise on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._before = current_rss_bytes() if reset_peak_rss() else peak_rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = int(peak_rss_bytes() - (self._before or 0))


def _gib(value: int | None) -> float | None:
    return None if value is None else value / 2**30


# ---------------------------------------------------------------------- what each check runs
def _grid_files(task: str, grid: str) -> list[str]:
    return layered_config_files(*config_files(f"configs/{task}.yaml", grid))


def plan() -> dict[str, list[list[str]]]:
    """The layered config files each check builds its workflows from."""
    return {
        "main_job": [layered_config_files(*MAIN_JOB[1:])],
        "sampling_hires": [_grid_files("inference", "hires")],
        "training_demo": [_grid_files(task, "demo") for task in STAGES.values()],
        "training_hires": [_grid_files(task, "hires") for task in STAGES.values()],
        "multi_gpu": [layered_config_files(f"configs/{task}.yaml", MULTI_GPU) for task in STAGES.values()],
        "decode_hires": [_grid_files("common", "hires")],
    }


def dry_run(checks: Sequence[str]) -> list[dict[str, Any]]:
    """Layer, parse and resolve every config a check would use (nothing instantiated, no device)."""
    from monai.bundle import ConfigParser

    rows = []
    with in_bundle_root():
        for check in checks:
            for files in plan()[check]:
                parser = ConfigParser()
                parser.read_config(files)
                parser.parse()
                for key in parser.get():
                    parser.get_parsed_content(key, instantiate=False, eval_expr=False)
                rows.append({"check": check, "what": " + ".join(Path(f).name for f in files), "status": "configs ok"})
            if check == "main_job":
                missing = [p.name for p in (MODELS / "controlnet.pt", MODELS / "diffusion_unet.pt") if not p.is_file()]
                if missing:
                    raise FileNotFoundError(
                        f"main_job needs the shipped weights: {', '.join(missing)} missing in models/"
                    )
    return rows


# ---------------------------------------------------------------------- the checks
def _row(check: str, what: str, status: str, **figures: Any) -> dict[str, Any]:
    return {"check": check, "what": what, "status": status, **figures}


def check_main_job(options: BenchOptions) -> list[dict[str, Any]]:
    """The README's main job as a user runs it, on the device torch picks (CUDA when there is one)."""
    output = options.work_dir / "main_job"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(MAIN_JOB)]
    cmd += ["--output_dir", str(output)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    pairs = sorted(output.glob("*_image.nii.gz")) if output.is_dir() else []
    status = "ok" if done.returncode == 0 and len(pairs) == 4 else f"failed ({done.returncode}): {done.stderr[-500:]}"
    return [_row("main_job", "inference, 4 demo masks", status, seconds=seconds, volumes=len(pairs))]


def check_sampling_hires(options: BenchOptions) -> list[dict[str, Any]]:
    """Each sampler at the hires grid: s/step, s/volume and peak memory (seeded random networks)."""
    from benchmarks.bench_sampling import SamplerSetting, build_pipeline, time_volume

    cuda = options.device.type == "cuda"
    rows = []
    with in_bundle_root():
        pipe = build_pipeline(options, "hires")
        _, label, seed = pipe.masks(1)[0]
        for sampler, (steps, timed_on_cuda) in SAMPLERS.items():
            timed = min(steps, timed_on_cuda if cuda else 1)
            setting = SamplerSetting(f"{sampler}_{steps}", sampler, steps)
            with PeakMemory(options.device) as memory:
                run = time_volume(
                    pipe.sampler(setting), label, [seed], max_steps=timed, decode=pipe.decoder is not None
                )
            per_step = sorted(run["step_seconds"])[len(run["step_seconds"]) // 2]
            per_volume = run["overhead_seconds"] + steps * per_step + (run["decode_seconds"] or 0.0)
            rows.append(
                _row(
                    "sampling_hires",
                    f"{sampler}, {steps} steps ({timed} timed)",
                    "ok",
                    seconds_per_step=per_step,
                    seconds_per_volume=per_volume,
                    decode_seconds=run["decode_seconds"],
                    extrapolated=timed < steps,
                    peak_memory_gib=_gib(memory.bytes),
                    weights=pipe.weights,
                )
            )
    return rows


def _phantoms(options: BenchOptions) -> Path:
    """Two phantom cases (one training, one validation) with a datalist, generated once per work folder."""
    from scripts.tools.phantom import write_phantom_dataset

    root = options.work_dir / "phantoms"
    if not (root / "datalist.json").is_file():
        write_phantom_dataset(str(root), num_cases=2, seed=0, val_fraction=0.5, test_fraction=0.0)
    return root


def _stage_weights(options: BenchOptions, grid: str, base: dict[str, Any]) -> dict[str, str]:
    """Autoencoder and stage-2 UNet files the later stages load: the shipped autoencoder at the demo
    grid, seeded random networks otherwise (the shipped weights do not fit the hires networks)."""
    common = parse_configs(config_files("configs/common.yaml", grid), base)
    folder = options.work_dir / grid
    autoencoder = MODELS / "autoencoder.pt"
    if grid != "demo" or not autoencoder.is_file():
        autoencoder = write_seeded_checkpoint(common, "autoencoder_def", "autoencoder", folder / "autoencoder.pt", 0)
    unet = write_seeded_checkpoint(
        common,
        "diffusion_unet_def",
        "diffusion_unet",
        folder / "diffusion_unet.pt",
        seed=1,
        scale_factor=1.0,
        noise_schedule=str(common.get_parsed_content("noise_schedule")),
        prediction_type=str(common.get_parsed_content("prediction_type")),
        latent_space_sha256=latent_space_sha256(torch.load(autoencoder, weights_only=True)),
    )
    return {"autoencoder_path": str(autoencoder), "diffusion_unet_path": str(unet)}


def check_training(options: BenchOptions, grid: str) -> list[dict[str, Any]]:
    """One iteration of each stage's own trainer (mixed precision on CUDA), after a warm-up epoch."""
    from benchmarks.bench_training import time_trainer

    check = f"training_{grid}"
    rows = []
    with in_bundle_root():
        dataset = _phantoms(options)
        base = {
            "dataset_dir": str(dataset),
            "output_dir": str(options.work_dir / check),
            "device": f"$torch.device({str(options.device)!r})",
            # a warm-up epoch first on CUDA (kernel selection, allocator); a CPU has none worth a second paper-scale epoch
            "max_epochs": 2 if options.device.type == "cuda" else 1,
            "batch_size": 1,
            "num_workers": 0,
        }
        base.update(_stage_weights(options, grid, base))
        for stage, task in STAGES.items():
            # no validation, checkpoints or logs inside the timed epochs; stage 1 with its adversarial term on
            extra = {"train#handlers": [], **({"adversarial_warmup_epochs": 0} if stage == "autoencoder" else {})}
            parser = parse_configs(config_files(f"configs/{task}.yaml", grid), {**base, **extra})
            # what stages 2 and 3 prepare in their initialize before training (stage 1 loads no frozen autoencoder)
            for key in ("load_autoencoder", "latent_cache", "unet_checkpoint", "init_controlnet"):
                if stage != "autoencoder" and parser.get(key) is not None:
                    parser.get_parsed_content(key)
            trainer = parser.get_parsed_content("train#trainer")
            with PeakMemory(options.device) as memory:
                timing = time_trainer(trainer, options.device)
            loss = trainer.state.output["loss"] if isinstance(trainer.state.output, dict) else trainer.state.output
            finite = bool(torch.isfinite(torch.as_tensor(loss)).all())
            rows.append(
                _row(
                    check,
                    f"{stage}, batch 1, amp {bool(trainer.amp)}",
                    "ok" if finite else "non-finite loss",
                    seconds_per_iteration=timing["median_iteration_seconds"],
                    peak_memory_gib=_gib(memory.bytes),
                    amp=bool(trainer.amp),
                    spatial_size=[int(s) for s in parser.get_parsed_content("spatial_size")],
                    patch_size=(
                        [int(s) for s in parser.get_parsed_content("patch_size")] if stage == "autoencoder" else None
                    ),
                    weights=RANDOM_WEIGHTS_NOTE if grid != "demo" else "shipped autoencoder; seeded later stages",
                )
            )
    return rows


def check_multi_gpu(options: BenchOptions) -> list[dict[str, Any]]:
    """``torchrun --nproc_per_node=1`` of configs/multi_gpu.yaml on each stage: one epoch with validation."""
    rows = []
    with in_bundle_root():
        dataset = _phantoms(options)
        base = {"device": f"$torch.device({str(options.device)!r})"}
        weights = _stage_weights(options, "demo", base)
    for stage, task in STAGES.items():
        output = options.work_dir / "multi_gpu" / stage
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        cmd += ["-m", "monai.bundle", "run", "training"]
        cmd += ["--config_file", str(layered_config_files(f"configs/{task}.yaml", MULTI_GPU))]
        settings = {"dataset_dir": dataset, "output_dir": output, "max_epochs": 1, "val_interval": 1, **weights}
        if stage != "autoencoder":
            settings["num_inference_steps"] = 2
        for key, value in settings.items():
            cmd += [f"--{key}", str(value)]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - start
        saved = (output / stage / f"{stage}_last.pt").is_file()
        status = "ok" if done.returncode == 0 and saved else f"failed ({done.returncode}): {done.stderr[-500:]}"
        backend = "nccl" if options.device.type == "cuda" else "gloo"
        rows.append(_row("multi_gpu", f"{stage}, 1 process, {backend}", status, seconds=seconds))
    return rows


def check_decode_hires(options: BenchOptions) -> list[dict[str, Any]]:
    """Whole vs tiled decode of the 64 x 64 x 32 latent (256 x 256 x 128 image)."""
    from benchmarks.bench_decode import LARGEST_LATENT, run_grid

    result = run_grid(options, "hires", [LARGEST_LATENT])
    case = result["cases"][0]
    key = case["memory_measure"]
    return [
        _row(
            "decode_hires",
            f"{mode}, {case['num_windows'] if mode == 'tiled' else 1} window(s)",
            "ok",
            seconds=case[mode]["seconds"],
            peak_memory_gib=_gib(case[mode][key]),
        )
        for mode in ("whole", "tiled")
    ]


RUNNERS: dict[str, Callable[[BenchOptions], list[dict[str, Any]]]] = {
    "main_job": check_main_job,
    "sampling_hires": check_sampling_hires,
    "training_demo": lambda options: check_training(options, "demo"),
    "training_hires": lambda options: check_training(options, "hires"),
    "multi_gpu": check_multi_gpu,
    "decode_hires": check_decode_hires,
}


def run(options: BenchOptions, checks: Sequence[str]) -> list[dict[str, Any]]:
    """Every check in turn; one that fails is reported in its row and the others still run."""
    rows = []
    for check in checks:
        start = time.perf_counter()
        try:
            rows += RUNNERS[check](options)
        except Exception as error:  # one broken path must not hide the others' figures
            while error.__cause__ is not None:  # MONAI wraps what a config expression raised: report that
                error = error.__cause__
            message = " ".join(str(error).split())[:300]
            rows.append(_row(check, "", f"failed: {type(error).__name__}: {message}"))
        print(f"{check}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The one table the command prints."""
    headers = ["check", "what", "status", "s/step or s/iteration", "s/volume or s", "peak memory GiB"]
    body = [
        [
            r["check"],
            r["what"],
            r["status"],
            fmt(r.get("seconds_per_step", r.get("seconds_per_iteration"))),
            fmt(r.get("seconds_per_volume", r.get("seconds"))),
            fmt(r.get("peak_memory_gib")),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="check every config the checks use; run nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default) or cpu")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks: {', '.join(CHECKS)}")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON result file")
    p.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    args = p.parse_args(argv)
    checks = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        print(f"ERROR: --only: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not args.dry_run and not torch.cuda.is_available():
        print("ERROR: --device cuda: no CUDA device here; use --dry-run or --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        options = BenchOptions(device=device, threads=args.threads, work_dir=work, progress=False)
        try:
            rows = dry_run(checks) if args.dry_run else run(options, checks)
        except Exception as error:
            print(f"ERROR: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    result = {
        "mode": "dry-run" if args.dry_run else "measured",
        "environment": environment(options),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" and not args.dry_run else None,
        "rows": rows,
    }
    write_json_atomic(args.output, json.loads(json.dumps(result, default=str)))
    print(table(rows))
    print(f"\nwritten: {os.path.relpath(args.output)}")
    return 0 if all(r["status"] in ("ok", "configs ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
