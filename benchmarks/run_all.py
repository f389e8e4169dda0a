# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Run the benchmark suites and write their JSON results and a Markdown summary.

    python benchmarks/run_all.py --quick          # a few minutes on a 2-core CPU
    python benchmarks/run_all.py                  # full run: every number of the model card
    python benchmarks/run_all.py --suites decode training --threads 1

Suites (one module each): ``sampling`` (bench_sampling.py: DDPM-1000 / DDIM-50 / rflow-30 speed,
quality and speed-ups), ``decode`` (bench_decode.py: whole vs tiled VAE decode, memory and seams),
``training`` (bench_training.py: iterations per second per stage, latent cache vs encoding on the
fly) and ``inference`` (bench_inference.py: the user's inference command end to end).

Each suite writes ``<output-dir>/<suite>.json`` = ``{"suite", "mode", "command", "environment"
(hardware, versions, date, load), "suite_seconds", "results"}``; then ``summary.md`` is rebuilt
from every suite JSON in the folder. Files are written atomically. The default output folder is
``benchmarks/results`` for a full run and ``benchmarks/results/quick`` for ``--quick``, so a quick
run never replaces full-run numbers. A suite that fails records its error and the run goes on;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import bench_decode, bench_inference, bench_sampling, bench_training
from benchmarks.common import (
    BUNDLE_ROOT,
    BenchOptions,
    environment,
    markdown_table,
    write_json_atomic,
    write_text_atomic,
)

__all__ = ["SUITES", "RESULTS_DIR", "parse_args", "options_from_args", "summary_markdown", "main"]

SUITES = {"sampling": bench_sampling, "decode": bench_decode, "training": bench_training, "inference": bench_inference}
RESULTS_DIR = BUNDLE_ROOT / "benchmarks" / "results"
#: Keys every suite JSON has (the smoke test checks them).
RESULT_KEYS = ("suite", "mode", "command", "environment", "suite_seconds", "results")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace("x", ",").split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="fewer steps/cases; unfinished figures are extrapolated and flagged"
    )
    p.add_argument(
        "--suites", nargs="+", choices=sorted(SUITES), default=list(SUITES), help="suites to run (default: all)"
    )
    p.add_argument("--output-dir", type=Path, default=None, help="results folder (default: benchmarks/results[/quick])")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-hires", action="store_true", help="skip the paper-scale grid of configs/hires.yaml")
    p.add_argument("--demo-spatial-size", type=int, nargs=3, default=None, help="override the demo grid size (tests)")
    p.add_argument(
        "--demo-spacing", type=float, nargs=3, default=None, help="override the demo grid spacing in mm (tests)"
    )
    p.add_argument(
        "--dataset-dir",
        type=Path,
        default=BenchOptions.dataset_dir,
        help="training-suite dataset with datalist.json (generated phantoms when absent)",
    )
    p.add_argument(
        "--max-cases", type=int, default=None, help="at most this many training cases (default: quick 4, full all)"
    )
    p.add_argument(
        "--num-masks", type=int, default=None, help="demo masks per sampler setting (default: quick 1, full 4)"
    )
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="trained demo weights (autoencoder.pt, diffusion_unet.pt, controlnet.pt); default models/",
    )
    p.add_argument(
        "--decode-latent-sizes",
        type=_ints,
        nargs="+",
        default=None,
        help="latent sizes of the decode suite, e.g. 16,16,16 64,64,32 (default by mode)",
    )
    p.add_argument(
        "--cuda-experimental",
        action="store_true",
        help="also time channels-last-3d and torch.compile on CUDA (untested code path)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace, work_dir: Path) -> BenchOptions:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return BenchOptions(
        quick=args.quick,
        device=torch.device(device),
        threads=args.threads,
        work_dir=work_dir,
        demo_spatial_size=args.demo_spatial_size,
        demo_spacing=args.demo_spacing,
        hires=not args.no_hires,
        dataset_dir=args.dataset_dir,
        max_cases=args.max_cases,
        num_masks=args.num_masks,
        weights_dir=args.weights_dir or BenchOptions.weights_dir,
        decode_latent_sizes=args.decode_latent_sizes,
        cuda_experimental=args.cuda_experimental,
        progress=not args.no_progress,
    )


def summary_markdown(folder: Path) -> str:
    """``summary.md`` of every suite JSON in ``folder``: the machine, then each suite's tables."""
    payloads = {}
    for name in SUITES:
        path = folder / f"{name}.json"
        if path.is_file():
            payloads[name] = json.loads(path.read_text())
    lines = ["# Benchmark results", ""]
    if not payloads:
        return "\n".join(lines + ["No results yet.", ""])
    rows = []
    for name, p in payloads.items():
        e = p["environment"]
        load = "/".join(str(x) for x in e.get("load_average_1_5_15_min") or [])
        rows.append(
            [
                name,
                p["mode"],
                e["date_utc"],
                f"{e['cpu_model']} ({e['cpu_cores']} cores)",
                e["torch_threads"],
                e["gpu"] or "-",
                e["torch"],
                e["monai"],
                load,
                f"{p['suite_seconds']:.0f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "suite",
                "mode",
                "date (UTC)",
                "CPU",
                "threads",
                "GPU",
                "torch",
                "MONAI",
                "load (1/5/15 min)",
                "suite time s",
            ],
            rows,
        )
    )
    lines += ["", "Commands: " + "; ".join(sorted({f"`{p['command']}`" for p in payloads.values()})), ""]
    for name, p in payloads.items():
        if "error" in p["results"]:
            lines += [f"## {name}", "", "FAILED:", "", "```", p["results"]["error"].strip(), "```", ""]
        else:
            lines += [SUITES[name].markdown(p["results"]), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen suites; returns 0, or 1 when a suite failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir = args.output_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    command = "python benchmarks/run_all.py" + ("" if not argv else " " + " ".join(argv))
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the processes the suites start
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="lldm-bench-") as work:
            options = options_from_args(args, Path(work))
            for name in args.suites:
                print(f"== {name} ({options.mode}) ==", flush=True)
                env = environment(options)
                start = time.perf_counter()
                try:
                    results: dict[str, Any] = SUITES[name].run(options)
                except Exception:  # record and go on: one broken suite should not hide the others' numbers
                    failed = True
                    results = {"error": traceback.format_exc(limit=8)}
                    print(results["error"], file=sys.stderr, flush=True)
                seconds = time.perf_counter() - start
                env["load_average_end_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
                payload = {
                    "suite": name,
                    "mode": options.mode,
                    "command": command,
                    "environment": env,
                    "suite_seconds": seconds,
                    "results": results,
                }
                print(
                    f"   {name}: {seconds:.0f} s -> {write_json_atomic(out_dir / f'{name}.json', payload)}", flush=True
                )
        summary = write_text_atomic(out_dir / "summary.md", summary_markdown(out_dir))
        print(f"summary: {summary}", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
