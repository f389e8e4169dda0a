# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The demo-weights recipe (scripts/tools/demo_weights.py): its commands are valid bundle commands in the right
order, bad steps are one error line, and the export step writes the shipped files from the runs' checkpoints."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE_ROOT

from scripts.core.errors import BundleInputError
from scripts.core.settings import check_cli_overrides
from scripts.tools import demo_weights


def test_dry_run_prints_every_step_as_a_command_its_configs_accept(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(BUNDLE_ROOT)
    demo_weights.main(["--work_dir", str(tmp_path / "work"), "--dry_run", "--set", "max_epochs=1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0].lstrip("[") for line in lines] == list(demo_weights.STEP_NAMES[:-1])
    for step in demo_weights.recipe(str(tmp_path / "work")):
        line = demo_weights.command(step, {"max_epochs": 1})
        # as the bundle's own command line check sees it: every --setting is declared by the step's configs
        assert check_cli_overrides(["monai/bundle/__main__.py", *line[3:]])
        assert ("--max_epochs" in line) == step.training
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_set_reaches_the_steps_that_declare_it_and_a_misspelt_one_is_refused(tmp_path):
    steps = {s.name: s for s in demo_weights.recipe(str(tmp_path))}
    extra = {"num_inference_steps": 2}
    assert "--num_inference_steps" in demo_weights.command(steps["diffusion"], extra)
    assert "--num_inference_steps" not in demo_weights.command(steps["autoencoder"], extra)
    with pytest.raises(BundleInputError, match="--set num_inference_step: not a setting of any training step"):
        demo_weights.run(str(tmp_path), ["autoencoder"], {"num_inference_step": 2}, dry_run=True)


def test_an_unknown_step_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tools.demo_weights", "--work_dir", str(tmp_path), "--steps", "data,stage4"],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("ERROR: --steps: unknown step")
    assert not any(tmp_path.iterdir())


def test_export_writes_the_shipped_files_float16_where_they_hold(tmp_path, capsys):
    work, models = tmp_path / "work", tmp_path / "models"
    for checkpoint, key, _ in demo_weights.exports().values():
        path = work / checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({key: {"weight": torch.rand(3, 3)}, "epoch": 7, "scale_factor": 0.5}, path)
    demo_weights.run(str(work), ["export"], {}, threads=1, dry_run=False, models_dir=str(models))
    for name, (_, key, dtype) in demo_weights.exports().items():
        shipped = torch.load(models / name, weights_only=True)
        assert shipped[key]["weight"].dtype == (torch.float16 if dtype else torch.float32), name
        assert shipped["source_epoch"] == 7 and shipped["scale_factor"] == 0.5
    assert capsys.readouterr().out.count("sha256") == len(demo_weights.exports())
    (work / demo_weights.exports()["controlnet.pt"][0]).unlink()
    with pytest.raises(BundleInputError, match="controlnet_last.pt: not found, so controlnet.pt cannot be exported"):
        demo_weights.run(str(work), ["export"], {}, models_dir=str(models))


def test_set_takes_key_value_pairs_with_python_values():
    assert demo_weights._setting("max_epochs=3") == ("max_epochs", 3)
    assert demo_weights._setting("patch_size=[32, 32, 32]") == ("patch_size", [32, 32, 32])
    assert demo_weights._setting("sampler=ddim") == ("sampler", "ddim")
    with pytest.raises(argparse.ArgumentTypeError, match="expected key=value"):
        demo_weights._setting("max_epochs")
