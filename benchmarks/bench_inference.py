# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Demo inference end to end, as a user runs it: one demo mask, the default sampler, the shipped weights.

Two figures:

* ``process_seconds``: wall time of the whole command, Python start-up, imports and weight
  loading included (``process_runs``: once as a user starts it, with torch's default threads,
  and once more with ``--threads`` when given; ``process_seconds`` is the last)::

      python -m monai.bundle run inference --config_file "['configs/common.yaml', 'configs/inference.yaml']" \\
          --mask_dir <folder with one demo mask> --output_dir <tmp>

* ``seconds_per_volume``: the same workflow in this process (``monai.bundle.ConfigWorkflow``),
  timing ``run()`` alone, i.e. checking the mask, sampling, decoding, resampling to the mask's grid
  and writing the pair; ``initialize_seconds`` is the set-up (parsing, weights) before it.

The command needs ``models/diffusion_unet.pt`` and ``models/controlnet.pt``: without them the suite
reports why it was skipped. The default sampler is the model's own (``scripts.generation.weights.check_sampler``:
rectified flow at 30 steps for an rflow model, DDIM at 35 steps for a DDPM model).

    python benchmarks/bench_inference.py [--threads N]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    BUNDLE_ROOT,
    DEMO_MASKS,
    MODELS,
    BenchOptions,
    Stopwatch,
    fmt,
    in_bundle_root,
    trained_weights,
)
from scripts.core.settings import layered_config_files

__all__ = ["TARGET_SECONDS", "COMMAND", "run", "markdown"]

#: Demo inference of one volume on a 2-core CPU should take less than this, end to end.
TARGET_SECONDS = 60.0
COMMAND = [
    "-m",
    "monai.bundle",
    "run",
    "inference",
    "--config_file",
    str(layered_config_files("configs/inference.yaml")),
]


def run(options: BenchOptions) -> dict[str, Any]:
    """Time the inference command for one demo mask, in a fresh process and in this one."""
    weights = trained_weights(options.weights_dir)
    if weights is None:
        return {
            "skipped": f"no diffusion_unet.pt and controlnet.pt in {options.weights_dir}: "
            "demo inference needs trained weights"
        }
    # the shipped weights are the config's defaults; other weights are named as a user would name them
    paths = {}
    if Path(options.weights_dir).resolve() != MODELS.resolve():
        refining = weights.get("refining_autoencoder")
        guided = refining or weights.get("label_guided_autoencoder")
        paths = {
            "autoencoder_path": str(guided or weights["autoencoder"]),
            "diffusion_unet_path": str(weights["diffusion_unet"]),
            "controlnet_path": str(weights["controlnet"]),
            "label_guided_decoder": str(guided is not None).lower(),  # decode as the files allow
            "decoder_upsampling": "1" if refining else "0",
        }
    mask = sorted(DEMO_MASKS.glob("*.nii*"))[0]
    mask_dir = options.work_dir / "inference_mask"
    mask_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(mask, mask_dir / mask.name)
    extra = ["--device", str(options.device), *(a for k, v in paths.items() for a in (f"--{k}", v))]
    # the process as a user starts it (torch's default threads), and with --threads when that is set
    process_runs = [_time_process(mask_dir, options.work_dir / "inference_process_default", extra, threads=None)]
    if options.threads is not None:
        process_runs.append(
            _time_process(mask_dir, options.work_dir / "inference_process_threads", extra, options.threads)
        )
    process_seconds = process_runs[-1]["seconds"]

    from monai.bundle import ConfigWorkflow

    out_inproc = options.work_dir / "inference_in_process"
    with in_bundle_root():
        workflow = ConfigWorkflow(
            config_file=layered_config_files("configs/inference.yaml"),
            workflow_type="infer",
            run_id="inference",
            mask_dir=str(mask_dir),
            output_dir=str(out_inproc),
            device=f"$torch.device({str(options.device)!r})",
            **paths,
        )
        with Stopwatch(options.device) as init:
            workflow.initialize()
        with Stopwatch(options.device) as volume:
            workflow.run()
        sampler = workflow.parser.get_parsed_content("sampler_name")
        steps = workflow.parser.get_parsed_content("latent_sampler").num_inference_steps
    return {
        "command": "python "
        + " ".join(COMMAND)
        + f" --mask_dir <folder with {mask.name}> --output_dir <tmp> --device {options.device}"
        + "".join(f" --{k} {v}" for k, v in paths.items()),
        "weights": str(options.weights_dir),
        "mask": mask.name,
        "sampler": sampler,
        "num_inference_steps": int(steps),
        "process_seconds": process_seconds,
        "process_runs": process_runs,
        "initialize_seconds": init.seconds,
        "seconds_per_volume": volume.seconds,
        "torch_threads": options.threads if options.threads is not None else torch.get_num_threads(),
        "target_seconds": TARGET_SECONDS,
        "meets_target": process_seconds < TARGET_SECONDS,
    }


def _time_process(mask_dir: Path, output_dir: Path, extra: Sequence[str], threads: int | None) -> dict[str, Any]:
    """Wall time of one inference command; ``threads`` None leaves OMP_NUM_THREADS unset (torch's default)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, *COMMAND, "--mask_dir", str(mask_dir), "--output_dir", str(output_dir), *extra]
    with Stopwatch() as process:
        done = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"inference command failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return {
        "threads": threads if threads is not None else f"torch default ({os.cpu_count()} cores)",
        "seconds": process.seconds,
    }


def markdown(result: dict[str, Any]) -> str:
    """The suite's lines for ``summary.md``."""
    if "skipped" in result:
        return f"## Demo inference end to end\n\nSkipped: {result['skipped']}.\n"
    return "\n".join(
        [
            "## Demo inference end to end",
            "",
            f"`{result['command']}` (sampler {result['sampler']}, {result['num_inference_steps']} steps, "
            f"{result['torch_threads']} threads):",
            f"**{fmt(result['process_seconds'])} s** for the whole process (target < {fmt(result['target_seconds'])} s: "
            f"{'met' if result['meets_target'] else 'NOT met'}); in-process {fmt(result['seconds_per_volume'])} s per volume "
            f"after {fmt(result['initialize_seconds'])} s of set-up.",
            "Whole process by thread setting: "
            + "; ".join(f"{r['threads']} threads: {fmt(r['seconds'])} s" for r in result.get("process_runs", []))
            + ".",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.run_all import main as run_all_main

    sys.exit(run_all_main(["--suites", "inference", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
