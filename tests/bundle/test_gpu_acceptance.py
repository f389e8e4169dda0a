# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The GPU acceptance script: its dry run and its CPU paths here, its CUDA checks where there is a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLE_ROOT

from benchmarks import gpu_acceptance


def _rows(path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_dry_run_resolves_every_config_of_every_check(tmp_path, capsys):
    output = tmp_path / "acceptance.json"
    assert gpu_acceptance.main(["--dry-run", "--output", str(output)]) == 0
    rows = _rows(output)
    assert {r["check"] for r in rows} == set(gpu_acceptance.CHECKS)
    assert all(r["status"] == "configs ok" for r in rows)
    layered = {r["what"] for r in rows if r["check"] == "multi_gpu"}
    assert layered == {
        f"common.yaml + train_base.yaml + {task}.yaml + multi_gpu.yaml" for task in gpu_acceptance.STAGES.values()
    }
    assert "| check | what | status |" in capsys.readouterr().out


def test_dry_run_fails_on_a_config_that_does_not_resolve(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text('spacing: "@no_such_setting"\n')
    monkeypatch.setattr(
        gpu_acceptance, "plan", lambda: {"main_job": [[str(BUNDLE_ROOT / "configs/common.yaml"), str(broken)]]}
    )
    assert gpu_acceptance.main(["--dry-run", "--only", "main_job", "--output", str(tmp_path / "a.json")]) == 1
    assert "no_such_setting" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


def test_unknown_check_is_one_error_line(tmp_path, capsys):
    assert gpu_acceptance.main(["--dry-run", "--only", "sampling", "--output", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: --only: unknown check(s) sampling")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_run_without_cuda_is_refused(tmp_path, capsys):
    assert gpu_acceptance.main(["--device", "cuda", "--output", str(tmp_path / "a.json")]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


@pytest.mark.slow
def test_one_training_iteration_of_each_stage_on_the_cpu(tmp_path):
    """The training check's CPU path at the demo grid: every stage trains one finite step, no AMP on a CPU."""
    output = tmp_path / "acceptance.json"
    argv = ["--device", "cpu", "--only", "training_demo", "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    assert gpu_acceptance.main(argv) == 0
    rows = _rows(output)
    assert [r["what"].split(",")[0] for r in rows] == list(gpu_acceptance.STAGES)
    assert all(r["status"] == "ok" and r["amp"] is False and r["seconds_per_iteration"] > 0 for r in rows)


@pytest.mark.gpu
def test_acceptance_checks_pass_on_cuda(tmp_path):
    """On a GPU: the main job, one AMP iteration per stage and one-process NCCL runs of every overlay."""
    output = tmp_path / "acceptance.json"
    argv = ["--only", "main_job,training_demo,multi_gpu", "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    assert gpu_acceptance.main(argv) == 0
    rows = _rows(output)
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["amp"] for r in rows if r["check"] == "training_demo")
    assert all(r["peak_memory_gib"] > 0 for r in rows if r["check"] == "training_demo")
