# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Smoke test of the benchmark suite: ``benchmarks/run_all.py --quick`` on a tiny grid writes valid
JSON with the expected keys and a summary. No timing is asserted: the numbers depend on the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import BUNDLE_ROOT
from stage_helpers import one_thread  # noqa: F401

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

from benchmarks import run_all  # noqa: E402
from benchmarks.common import trained_weights  # noqa: E402

TINY = ["--demo-spatial-size", "32", "32", "32", "--demo-spacing", "10", "10", "8"]


@pytest.mark.slow
def test_quick_run_writes_json_and_summary(tmp_path: Path, tiny_phantoms: Path) -> None:
    # with the shipped weights the inference suite runs the real demo command (about a minute): left to the full run
    suites = ["sampling", "decode", "training"] + (["inference"] if trained_weights() is None else [])
    argv = [
        "--quick",
        "--suites",
        *suites,
        "--output-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--no-hires",
        "--no-progress",
        *TINY,
        "--dataset-dir",
        str(tiny_phantoms),
        "--max-cases",
        "2",
        "--num-masks",
        "1",
        "--decode-latent-sizes",
        "8,8,8",
    ]
    assert run_all.main(argv) == 0

    payloads = {}
    for suite in suites:
        payload = json.loads((tmp_path / f"{suite}.json").read_text())
        assert set(run_all.RESULT_KEYS) <= set(payload), suite
        assert payload["suite"] == suite and payload["mode"] == "quick"
        for key in ("cpu_model", "cpu_cores", "torch_threads", "gpu", "torch", "monai", "date_utc"):
            assert key in payload["environment"], key
        assert payload["environment"]["torch_threads"] == 1
        assert "error" not in payload["results"], payload["results"].get("error")
        payloads[suite] = payload["results"]

    demo = payloads["sampling"]["grids"]["demo"]
    assert demo["spatial_size"] == [32, 32, 32]
    assert set(demo["settings"]) == {"ddpm_1000", "ddim_50", "rflow_30"}
    for setting in demo["settings"].values():
        for key in (
            "seconds_per_step",
            "sampling_seconds_per_volume",
            "seconds_per_volume",
            "extrapolated",
            "measured_steps",
            "quality",
            "quality_reason",
        ):
            assert key in setting, key
        assert setting["seconds_per_step"] > 0
    assert demo["settings"]["ddpm_1000"]["extrapolated"] is True  # quick mode times the first DDPM steps only
    assert demo["settings"]["rflow_30"]["extrapolated"] is False
    assert "rflow_30_vs_ddpm_1000_per_volume" in demo["ratios"]
    assert {"conditioning_embedded_once", "inference_mode", "cpu_threads", "batch_sampling", "autoguidance"} <= set(
        demo["speedups"]
    )
    assert demo["speedups"]["autoguidance"]["seconds_per_step_after"] > 0

    case = payloads["decode"]["grids"]["demo"]["cases"][0]
    assert case["latent_size"] == [4, 8, 8, 8]
    for mode in ("whole", "tiled"):
        assert case[mode]["seconds"] > 0 and "peak_rss_increase_bytes" in case[mode]
    assert {"max_abs", "mean_abs"} <= set(case["seam_error"])

    training = payloads["training"]
    assert set(training["stages"]) == {
        "autoencoder",
        "diffusion_unet_latent_cache",
        "diffusion_unet_encode_on_the_fly",
        "diffusion_unet_load_and_encode_on_the_fly",
        "controlnet",
    }
    assert all(s["iterations_per_second"] > 0 for s in training["stages"].values())
    assert "epoch_speedup" in training["latent_cache"]["vs_encode_on_the_fly"]

    if "inference" in payloads:
        assert "skipped" in payloads["inference"]

    summary = (tmp_path / "summary.md").read_text()
    for title in ("## Sampling", "## VAE decode", "## Training"):
        assert title in summary
