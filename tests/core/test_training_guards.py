# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""What every training refuses before it starts or stops on while it runs (scripts.core.checkpoints):
a folder that cannot hold checkpoints, a second training into the same checkpoints, a checkpoint
slot holding something else, a non-finite loss; and engine failures reported as one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from ignite.engine import Engine
from stage_helpers import cli, one_thread, write_autoencoder  # noqa: F401  (one_thread: autouse)

from scripts.core.checkpoints import StageCheckpointer
from scripts.core.errors import BundleInputError


def _checkpointer(folder: Path, network: torch.nn.Module | None = None, **kwargs) -> StageCheckpointer:
    network = network or torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    return StageCheckpointer(str(folder), "toy", {"net": network, "optimizer": optimizer}, **kwargs)


def _engine(losses: list[float]) -> Engine:
    return Engine(lambda engine, batch: {"loss": torch.tensor(losses[engine.state.iteration - 1])})


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    engine = _engine([0.5, float("nan"), 0.4])
    checkpointer.attach(engine)
    with pytest.raises(BundleInputError, match=r"toy training: the loss became nan at epoch 1, iteration 2 .*--lr"):
        engine.run([0, 1, 2], max_epochs=2)
    assert not (tmp_path / "toy_last.pt").exists() and not (tmp_path / "toy_best.pt").exists()


def test_finite_losses_train_and_save_as_before(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    engine = _engine([0.5, 0.4, 0.3] * 2)
    checkpointer.attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    assert torch.load(tmp_path / "toy_last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / ".training.lock").exists()  # released when training completed


@pytest.mark.parametrize(
    "slot, expected",
    [
        ({"something": torch.zeros(1)}, "not a checkpoint of this toy configuration (no 'net' entry)"),
        ({"net": torch.nn.Linear(4, 2).state_dict(), "optimizer": {}}, "its net weights do not fit"),
    ],
    ids=["foreign file", "other architecture"],
)
def test_a_checkpoint_slot_holding_something_else_is_one_line(slot, expected, tmp_path):
    torch.save(slot, tmp_path / "toy_last.pt")
    with pytest.raises(BundleInputError, match=re.escape(expected)):
        _checkpointer(tmp_path)


def test_a_pickled_object_in_the_slot_is_refused_as_such(tmp_path):
    torch.save({"net": torch.nn.Linear(3, 2)}, tmp_path / "toy_last.pt")  # a whole module: needs unpickling
    with pytest.raises(BundleInputError, match="refuses to unpickle") as raised:
        _checkpointer(tmp_path)
    assert "weights_only=False" not in str(raised.value)


def test_an_output_folder_that_is_a_file_or_spelled_with_tilde_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(BundleInputError, match="is a file, not a folder"):
        _checkpointer(tmp_path / "taken")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleInputError, match="'~' is not expanded"):
        _checkpointer(Path("~/runs"))
    assert not (tmp_path / "~").exists()


def test_leftovers_of_killed_saves_and_runs_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".training.lock").write_text(dead.stdout.strip())
    leftover = tmp_path / ".toy_last.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.tmp"
    mine.write_text("not a checkpoint temporary")
    checkpointer = _checkpointer(tmp_path)
    assert not leftover.exists() and mine.exists()
    assert (tmp_path / ".training.lock").read_text() == str(os.getpid())
    checkpointer.lock.release()


def test_a_live_training_holds_its_folder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".training.lock").write_text(str(sleeper.pid))
        with pytest.raises(BundleInputError, match=f"another training \\(process {sleeper.pid}\\)"):
            _checkpointer(tmp_path)
        _checkpointer(tmp_path / "elsewhere")  # another folder is free
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_concurrent_training_is_refused_and_sigterm_is_one_line(tiny_phantoms, tmp_path):
    """A second training into a folder a live one writes is refused; SIGTERM ends the first with one
    ERROR line and no engine traceback, and its checkpoint stays loadable."""
    autoencoder = write_autoencoder(tmp_path / "ae.pt")
    args = cli("configs/train_diffusion.yaml", tiny_phantoms, tmp_path, max_epochs=5000, num_val_samples=0)
    args += ["--autoencoder_path", str(autoencoder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    first = subprocess.Popen(
        command, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ckpt = tmp_path / "diffusion_unet" / "diffusion_unet_last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and f"another training (process {first.pid})" in errors[0], second.stderr[-2000:]
    assert first.poll() is None, "the refused run must not disturb the running one"

    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode != 0
    assert [line for line in stderr.splitlines() if line.startswith("ERROR:")] == [
        "ERROR: interrupted (signal SIGTERM); nothing half-written was published"
    ], stderr[-3000:]
    printed = stdout + stderr  # MONAI's loggers print to stdout
    assert "Traceback" not in printed and "terminating due to exception" not in printed, printed[-3000:]
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1


def test_a_lock_taken_before_a_failure_leaves_no_folder_behind(tmp_path):
    from scripts.core.checkpoints import TrainingLock

    lock = TrainingLock(str(tmp_path / "runs" / "stage"))
    assert (tmp_path / "runs" / "stage" / ".training.lock").read_text() == str(os.getpid())
    lock.release()  # what happens at exit when the command failed before writing anything
    assert not (tmp_path / "runs" / "stage").exists()
    kept = TrainingLock(str(tmp_path / "kept"))
    (tmp_path / "kept" / "stage_last.pt").write_bytes(b"checkpoint")
    kept.release()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["stage_last.pt"]
