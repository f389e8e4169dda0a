# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The CUDA and multi-GPU paths, checked on a machine without a GPU.

Every training and inference config, alone and with configs/hires.yaml and configs/multi_gpu.yaml,
is run with CUDA reported available until its first real CUDA call, which stops the walk. Up to
there nothing may fail: no rank read before the process group exists (torch raises then, as it
does on a GPU machine), the group joined with NCCL before the GPU is touched, the device taken
from LOCAL_RANK, mixed precision switched on. What comes after the first CUDA call needs a GPU:
``benchmarks/gpu_acceptance.py`` and the tests marked ``gpu``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow

import scripts.core.distributed as distributed
from scripts.core.settings import layered_config_files

TRAINING = ["train_autoencoder", "train_diffusion", "train_controlnet", "train_segmentation", "train_gan_baseline"]
INFERENCE = ["inference", "inference_autoencoder", "generate_unconditional", "inference_gan_baseline"]
HIRES = "configs/hires.yaml"
MULTI_GPU = "configs/multi_gpu.yaml"


class FirstCudaCallError(Exception):
    """Raised where the code first touches a GPU: the end of what can be checked without one."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cuda_reported(monkeypatch):
    """CUDA reported available with one GPU; every real CUDA call raises :class:`FirstCudaCallError`.

    Returns the list of events in order: ``init_process_group:<backend>``, ``set_device:<device>``,
    ``cuda:<what>`` (the first tensor or module placed on the GPU).
    ``init_process_group`` makes a real one-process gloo group whatever backend is asked for.
    """
    events: list[str] = []

    def first_cuda_call(what: str):
        def touch(*args: Any, **kwargs: Any) -> None:
            events.append(f"cuda:{what}{args}")
            raise FirstCudaCallError(f"{what}{args}")

        return touch

    real_init = dist.init_process_group

    def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
        events.append(f"init_process_group:{backend}")
        real_init(backend="gloo", **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", first_cuda_call("lazy_init"))
    # choosing the GPU is recorded, not stopped, so the walk goes on to the first tensor placed on it
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(f"set_device:{torch.device(device)}"))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield events
    if dist.is_initialized():
        dist.destroy_process_group()


def _torchrun_env(monkeypatch, local_rank: int = 0, rank: int = 0, world_size: int = 1) -> None:
    """The environment torchrun gives one process."""
    for name, value in (
        ("RANK", rank),
        ("LOCAL_RANK", local_rank),
        ("WORLD_SIZE", world_size),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", _free_port()),
    ):
        monkeypatch.setenv(name, str(value))


def _walk_to_first_cuda_call(files: list[str], workflow_type: str, **settings: Any) -> FirstCudaCallError:
    """``initialize`` then ``run`` of the layered ``files``; the FirstCudaCallError that stopped them.

    Any other error (a rank read before the group, a setting that fails under CUDA) fails the test.
    """
    workflow = ConfigWorkflow(config_file=files, workflow_type=workflow_type, **settings)
    try:
        workflow.initialize()
        workflow.run()
    except Exception as error:  # MONAI wraps what a config expression raises: find the sentinel in the chain
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, FirstCudaCallError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        return cause
    pytest.fail(f"{files} ran to the end without touching the GPU it was given")


def _files(task: str, multi_gpu: bool, hires: bool) -> list[str]:
    return layered_config_files(
        f"configs/{task}.yaml", *([MULTI_GPU] if multi_gpu else []), *([HIRES] if hires else [])
    )


def _training_settings(tiny_phantoms: Path, tmp_path: Path) -> dict[str, Any]:
    return {
        "dataset_dir": str(tiny_phantoms),
        "output_dir": str(tmp_path / "out"),
        "cache_rate": 0.0,  # nothing preprocessed before the networks move to the GPU
        "max_epochs": 1,
    }


@pytest.mark.parametrize("hires", [False, True], ids=["demo", "hires"])
@pytest.mark.parametrize("multi_gpu", [False, True], ids=["one_process", "multi_gpu"])
@pytest.mark.parametrize("task", TRAINING)
def test_training_reaches_the_gpu_in_order(task, multi_gpu, hires, cuda_reported, tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    if multi_gpu:
        _torchrun_env(monkeypatch)
    stop = _walk_to_first_cuda_call(
        _files(task, multi_gpu, hires), "train", **_training_settings(tiny_phantoms, tmp_path)
    )
    if multi_gpu:
        # the group first (NCCL, as on a GPU machine), then the process's own GPU, nothing before
        assert cuda_reported == ["init_process_group:nccl", "set_device:cuda:0", "cuda:lazy_init()"]
    else:
        assert [e for e in cuda_reported if e.startswith("init_process_group")] == []
        assert cuda_reported == ["cuda:lazy_init()"]
    assert isinstance(stop, FirstCudaCallError)


@pytest.mark.parametrize("hires", [False, True], ids=["demo", "hires"])
@pytest.mark.parametrize("task", INFERENCE)
def test_inference_reaches_the_gpu(task, hires, cuda_reported, tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    _walk_to_first_cuda_call(
        _files(task, False, hires), "infer", dataset_dir=str(tiny_phantoms), output_dir=str(tmp_path / "out")
    )
    assert cuda_reported == ["cuda:lazy_init()"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


def test_each_process_takes_the_gpu_of_its_local_rank(cuda_reported, tiny_phantoms, tmp_path, monkeypatch):
    """Second node of two with 8 GPUs each: global rank 11 is local rank 3 and must use cuda:3."""
    monkeypatch.chdir(BUNDLE_ROOT)
    _torchrun_env(monkeypatch, local_rank=3, rank=11, world_size=16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: cuda_reported.append(f"init:{backend}"))
    _walk_to_first_cuda_call(
        _files("train_diffusion", True, False), "train", **_training_settings(tiny_phantoms, tmp_path)
    )
    assert cuda_reported[:2] == ["init:nccl", "set_device:cuda:3"]


def test_more_processes_than_gpus_is_one_clear_line(cuda_reported, tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    _torchrun_env(monkeypatch, local_rank=1, rank=1, world_size=2)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: None)
    workflow = ConfigWorkflow(
        config_file=_files("train_autoencoder", True, False),
        workflow_type="train",
        **_training_settings(tiny_phantoms, tmp_path),
    )
    with pytest.raises(RuntimeError) as raised:
        workflow.initialize()
    assert "this node has 1 GPU(s)" in str(raised.value.__cause__)


def test_the_overlay_without_torchrun_is_one_clear_line(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="start the command with torchrun"):
        distributed.init_process_group(True, "cpu")
    assert distributed.init_process_group("false", "cpu") is False


@pytest.mark.parametrize("task", TRAINING)
def test_mixed_precision_is_on_under_cuda_only(task, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        parser = ConfigParser()
        parser.read_config(_files(task, False, False))
        parser.parse()
        engines = [key for key in ("train#trainer", "validate#evaluator") if parser.get(key) is not None]
        for engine in engines:
            amp = parser.get_parsed_content(f"{engine}#amp")
            assert amp is available, f"{task} {engine} amp {amp} with CUDA available={available}"


def test_ddp_device_ids_follow_the_device():
    assert distributed.ddp_device_ids(torch.device("cuda", 2)) == [torch.device("cuda", 2)]
    assert distributed.ddp_device_ids("cpu") is None


def test_hires_changes_only_shared_settings(monkeypatch):
    """configs/hires.yaml edits only what configs/common.yaml declares (the grid, the networks, the
    stage-1 crop), so layered on any task it cannot change a setting of that task by name clash."""
    monkeypatch.chdir(BUNDLE_ROOT)
    hires = ConfigParser.load_config_file(HIRES)
    common = ConfigParser()
    common.read_config("configs/common.yaml")
    for key in hires:
        assert common.get(key.split("#")[0]) is not None, f"hires.yaml sets {key!r}, which common.yaml does not declare"
    for task, unchanged in (("train_segmentation", "patch_size"), ("train_gan_baseline", "patch_size")):
        alone, layered = ConfigParser(), ConfigParser()
        alone.read_config(_files(task, False, False))
        layered.read_config(_files(task, False, True))
        assert alone.get_parsed_content(unchanged) == layered.get_parsed_content(unchanged)
    layered = ConfigParser()
    layered.read_config(_files("train_autoencoder", False, True))
    assert layered.get_parsed_content("patch_size") == hires["autoencoder_patch_size"]
