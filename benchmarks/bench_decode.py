# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Whole vs tiled VAE decode: wall time, peak memory and seam error, from demo-size latents up to
the latent of a 256x256x128 image (4x64x64x32).

Both decodes go through the bundle's ``scripts.networks.tiled_autoencoder.TiledAutoencoder`` built from
``tiled_autoencoder_def`` in the configs: "whole" with a window as large as the latent (one
window, the plain decoder call), "tiled" with the configured ``latent_roi_size`` windows and
``tile_overlap`` (demo grid: 16^3 latent windows; ``configs/hires.yaml``: 32^3).

Peak memory is measured in a fresh process per decode, so what earlier decodes allocated cannot
hide it: on the CPU the rise of the process's peak resident memory over the decode (Linux
``VmHWM``, reset just before the decode, minus the resident memory then; ``ru_maxrss`` cannot
serve here because a spawned process inherits its parent's peak, see
``benchmarks.common.peak_rss_bytes``), on CUDA ``torch.cuda.max_memory_allocated`` over the
decode. Each worker first decodes a tiny latent so one-time kernel set-up is not counted.

The latents are the autoencoder's own encodings of a dataset case (the first validation
phantom) resampled onto a grid 4x the latent size with the demo field of view, so the seams are
measured on realistic content; a seeded Gaussian latent stands in when no dataset is found. The
demo autoencoder uses ``models/autoencoder.pt`` when present; the paper-scale autoencoder
(random weights) runs on CUDA only: decoding a 256x256x128 image with 64-channel layers on a CPU
takes tens of GB.

    python benchmarks/bench_decode.py [--quick] [--decode-latent-sizes 16,16,16 64,64,32]
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from benchmarks.common import (
    BUNDLE_ROOT,
    MODELS,
    RANDOM_WEIGHTS_NOTE,
    BenchOptions,
    Stopwatch,
    config_files,
    current_rss_bytes,
    fmt,
    grid_overrides,
    in_bundle_root,
    markdown_table,
    parse_configs,
    peak_rss_bytes,
    reset_peak_rss,
)
from scripts.core.checkpoints import load_network_weights
from scripts.networks.tiled_autoencoder import seam_error

__all__ = ["MEMORY_TARGET", "num_windows", "prepare_latent", "decode_worker", "run", "markdown"]

#: Tiled decode of the largest latent should need at most this share of whole-decode peak memory.
MEMORY_TARGET = 1.0 / 3.0
#: The largest case: the latent of a 256x256x128 image.
LARGEST_LATENT = [64, 64, 32]
RESULT_PREFIX = "DECODE_RESULT "


def num_windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding window places over ``size`` (its scan interval ``int(roi * (1 - overlap))``)."""
    count = 1
    for s, r in zip(size, roi, strict=True):
        r = min(r, s)
        if r < s:
            step = max(1, int(r * (1.0 - overlap)))
            count *= math.ceil((s - r) / step) + 1
    return count


def _parser(grid: str, overrides: dict[str, Any], device: str) -> Any:
    return parse_configs(
        config_files("configs/common.yaml", grid), {**overrides, "device": f"$torch.device({str(device)!r})"}
    )


def _load_demo_weights(grid: str, autoencoder: torch.nn.Module) -> str:
    path = MODELS / "autoencoder.pt"
    if grid == "demo" and path.is_file():
        load_network_weights(autoencoder, str(path), "autoencoder", "autoencoder weights")
        return "trained demo autoencoder (models/autoencoder.pt)"
    return RANDOM_WEIGHTS_NOTE


def prepare_latent(options: BenchOptions, grid: str, latent_size: Sequence[int], path: Path) -> str:
    """Write the latent to decode to ``path``; returns where it came from."""
    parser = _parser(grid, grid_overrides(options, grid), str(options.device))
    compression = int(parser.get_parsed_content("autoencoder_compression"))
    channels = int(parser.get_parsed_content("latent_channels"))
    datalist = Path(options.dataset_dir) / "datalist.json"
    if not datalist.is_file():
        torch.save(torch.randn((1, channels, *latent_size), generator=torch.Generator().manual_seed(0)), path)
        return f"seeded N(0, 1) latent ({datalist} not found)"
    cases = json.loads(datalist.read_text())
    case = (cases.get("validation") or cases["training"])[0]
    item = {k: str(Path(options.dataset_dir) / case[k]) for k in ("image", "label")}
    # the grid's field of view, sampled finer or coarser so the image is `compression` x the latent
    fov = [
        sp * sz
        for sp, sz in zip(parser.get_parsed_content("spacing"), parser.get_parsed_content("spatial_size"), strict=True)
    ]
    image_size = [compression * s for s in latent_size]
    parser["spatial_size"] = image_size
    parser["spacing"] = [f / s for f, s in zip(fov, image_size, strict=True)]
    image = parser.get_parsed_content("pair_preprocessing")(item)["image"].as_tensor()[None].to(options.device)
    encoder = parser.get_parsed_content("tiled_autoencoder_def")
    source = _load_demo_weights(grid, encoder.autoencoder)
    latent = encoder.encode(image).cpu()
    torch.save(latent, path)
    return f"encoding of {case['image']} on a {'x'.join(map(str, image_size))} grid ({source})"


def decode_worker(spec_path: str) -> None:
    """One decode in this (fresh) process; prints its measurements as one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    latent = torch.load(spec["latent_file"], weights_only=True)
    overrides = {**spec["overrides"], "latent_roi_size": spec["latent_roi_size"]}
    with in_bundle_root():
        parser = _parser(spec["grid"], overrides, spec["device"])
        torch.manual_seed(0)
        tiled = parser.get_parsed_content("tiled_autoencoder_def")
        _load_demo_weights(spec["grid"], tiled.autoencoder)
    latent = latent.to(device)
    tiled.decode(latent[:, :, :4, :4, :4])  # warm-up: kernel set-up is not the decode's memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    reset = reset_peak_rss()
    rss_before = current_rss_bytes() if reset else peak_rss_bytes()
    with Stopwatch(device) as watch:
        image = tiled.decode(latent)
    rss_after = peak_rss_bytes()
    result = {
        "seconds": watch.seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": rss_after,
        "peak_rss_increase_bytes": rss_after - rss_before,
        "memory_method": (
            "VmHWM after a clear_refs reset minus VmRSS before" if reset else "peak RSS rise over the decode"
        ),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda_before is not None else None,
        "cuda_peak_increase_bytes": (
            torch.cuda.max_memory_allocated(device) - cuda_before if cuda_before is not None else None
        ),
        "image_size": list(image.shape[2:]),
        "threads": torch.get_num_threads(),
    }
    torch.save(image.cpu(), spec["output_file"])
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _run_worker(spec: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"decode worker failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def default_sizes(options: BenchOptions) -> list[list[int]]:
    """Latent sizes: the demo latent and doubled (quick), up to the 256x256x128-image latent (full)."""
    if options.decode_latent_sizes:
        return [list(s) for s in options.decode_latent_sizes]
    with in_bundle_root():
        demo = [
            int(s) for s in _parser("demo", grid_overrides(options, "demo"), "cpu").get_parsed_content("latent_size")
        ]
    sizes = [demo, [2 * s for s in demo]] if options.quick else [demo, [32, 32, 32], LARGEST_LATENT]
    return [s for i, s in enumerate(sizes) if s not in sizes[:i]]


def run_grid(options: BenchOptions, grid: str, sizes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Whole and tiled decode of every latent size on one grid."""
    overrides = grid_overrides(options, grid)
    with in_bundle_root():
        parser = _parser(grid, overrides, "cpu")
        roi = [int(r) for r in parser.get_parsed_content("latent_roi_size")]
        overlap = float(parser.get_parsed_content("tile_overlap"))
        channels = int(parser.get_parsed_content("latent_channels"))
        compression = int(parser.get_parsed_content("autoencoder_compression"))
    work = options.work_dir / f"decode_{grid}"
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    for size in tqdm(sizes, desc=f"decode {grid}", unit="latent", disable=not options.progress):
        tag = "x".join(map(str, size))
        latent_file = work / f"latent_{tag}.pt"
        with in_bundle_root():
            source = prepare_latent(options, grid, size, latent_file)
        measured = {}
        for mode, window in (("whole", list(size)), ("tiled", roi)):
            spec = {
                "grid": grid,
                "overrides": overrides,
                "device": str(options.device),
                "latent_file": str(latent_file),
                "latent_roi_size": window,
                "output_file": str(work / f"{mode}_{tag}.pt"),
                "threads": options.threads,
            }
            measured[mode] = _run_worker(spec, work / f"spec_{mode}_{tag}.json")
        whole = torch.load(work / f"whole_{tag}.pt", weights_only=True)
        tiled = torch.load(work / f"tiled_{tag}.pt", weights_only=True)
        key = "cuda_peak_increase_bytes" if options.device.type == "cuda" else "peak_rss_increase_bytes"
        ratio = measured["tiled"][key] / measured["whole"][key] if measured["whole"][key] > 0 else None
        seams = seam_error(whole, tiled)
        cases.append(
            {
                "latent_size": [channels, *size],
                "image_size": [compression * s for s in size],
                "latent_source": source,
                "latent_roi_size": [min(r, s) for r, s in zip(roi, size, strict=True)],
                "overlap": overlap,
                "num_windows": num_windows(size, roi, overlap),
                "whole": measured["whole"],
                "tiled": measured["tiled"],
                "memory_measure": key,
                "memory_ratio_tiled_vs_whole": ratio,
                "seam_error": {
                    "max_abs": seams["max_abs"],
                    "mean_abs": seams["mean_abs"],
                    "data_range": seams["data_range"],
                    "psnr_db": seams["psnr"],
                },
            }
        )
        for f in (work / f"whole_{tag}.pt", work / f"tiled_{tag}.pt"):
            f.unlink()
    largest = max(cases, key=lambda c: math.prod(c["latent_size"]))
    ratio = largest["memory_ratio_tiled_vs_whole"]
    return {
        "grid": grid,
        "weights": (
            "trained demo autoencoder (models/autoencoder.pt)"
            if grid == "demo" and (MODELS / "autoencoder.pt").is_file()
            else RANDOM_WEIGHTS_NOTE
        ),
        "cases": cases,
        "largest_case": {
            "latent_size": largest["latent_size"],
            "memory_ratio_tiled_vs_whole": ratio,
            "target_ratio": MEMORY_TARGET,
            "meets_target": ratio is not None and ratio <= MEMORY_TARGET,
            "seam_max_abs": largest["seam_error"]["max_abs"],
            "seam_mean_abs": largest["seam_error"]["mean_abs"],
        },
    }


def run(options: BenchOptions) -> dict[str, Any]:
    """The decode suite: the demo autoencoder, plus the paper-scale one on CUDA."""
    sizes = default_sizes(options)
    grids = {"demo": run_grid(options, "demo", sizes)}
    if options.hires and options.device.type == "cuda":
        grids["hires"] = run_grid(options, "hires", [s for s in sizes if min(s) >= 32] or [LARGEST_LATENT])
    else:
        grids["hires"] = {"skipped": "paper-scale autoencoder decode is measured on CUDA only"}
    return {"grids": grids}


def markdown(result: dict[str, Any]) -> str:
    """The suite's table for ``summary.md``."""
    lines = ["## VAE decode: whole vs tiled", ""]
    mb = 1024.0**2
    for grid, r in result["grids"].items():
        if "skipped" in r:
            lines += [f"**{grid}**: skipped ({r['skipped']}).", ""]
            continue
        rows = []
        for c in r["cases"]:
            key = c["memory_measure"]
            rows.append(
                [
                    "x".join(map(str, c["latent_size"])),
                    "x".join(map(str, c["image_size"])),
                    c["num_windows"],
                    c["whole"]["seconds"],
                    c["tiled"]["seconds"],
                    c["whole"][key] / mb,
                    c["tiled"][key] / mb,
                    c["memory_ratio_tiled_vs_whole"],
                    c["seam_error"]["max_abs"],
                    c["seam_error"]["mean_abs"],
                    c["seam_error"]["psnr_db"],
                ]
            )
        memory = "peak RSS rise" if r["cases"][0]["memory_measure"] == "peak_rss_increase_bytes" else "CUDA peak"
        lines += [
            f"**{grid} autoencoder** ({r['weights']}; windows {r['cases'][-1]['latent_roi_size']} latent, "
            f"overlap {r['cases'][0]['overlap']})",
            "",
            markdown_table(
                [
                    "latent",
                    "image",
                    "windows",
                    "whole s",
                    "tiled s",
                    f"whole MiB ({memory})",
                    f"tiled MiB ({memory})",
                    "tiled/whole memory",
                    "seam max abs",
                    "seam mean abs",
                    "seam PSNR dB",
                ],
                rows,
            ),
            "",
        ]
        big = r["largest_case"]
        lines += [
            f"Largest case {'x'.join(map(str, big['latent_size']))}: tiled needs {fmt(big['memory_ratio_tiled_vs_whole'])} "
            f"of whole-decode memory (target <= {fmt(big['target_ratio'])}: {'met' if big['meets_target'] else 'NOT met'}), "
            f"seam error (tiled vs whole) max {fmt(big['seam_max_abs'])}, mean {fmt(big['seam_mean_abs'])} "
            "(preprocessed intensities lie in [0, 1]; the decoder's raw output is compared, before clipping).",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        decode_worker(argv[1])
        return
    from benchmarks.run_all import main as run_all_main

    sys.exit(run_all_main(["--suites", "decode", *argv]))


if __name__ == "__main__":
    main()
