# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""One process per GPU under ``torchrun``: the process group, the device, the DDP wrapper.

``configs/multi_gpu.yaml`` sets ``distributed: true`` on any training config. Every training config
runs :func:`init_process_group` right after the error hook in its ``initialize``, so the group exists
before anything reads a rank or touches a GPU, whatever the overlay adds; it wraps the networks it
trains with :func:`data_parallel`. The device is ``cuda:LOCAL_RANK`` (configs/common.yaml): the
process's index on its own node, never the global rank, which on a second node would name a GPU that
does not exist. MONAI has no helper for this wiring: its bundles write it into each multi-GPU config,
which is what put the rank read before the group here once.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import BundleInputError
from .settings import as_bool

__all__ = ["TORCHRUN_VARIABLES", "init_process_group", "data_parallel", "ddp_device_ids"]

#: Environment variables ``torchrun`` sets for every process; the env:// rendezvous needs them all.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_process_group(distributed: Any, device: torch.device | str) -> bool:
    """Join the ``torchrun`` process group (NCCL on a GPU, gloo on the CPU), then take the GPU.

    ``distributed``: the config setting (false: one process, nothing to do). Returns whether the
    process is part of a group, for a config's ``initialize``. An error line, not a hang or a
    traceback, when the command was not started by ``torchrun`` or asks for a GPU the node lacks.
    """
    if not as_bool(distributed, "distributed"):
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise BundleInputError(
            f"config 'distributed' is true (configs/multi_gpu.yaml) but {', '.join(missing)} "
            "are not set: start the command with torchrun --nproc_per_node=N -m monai.bundle run ..."
        )
    device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if device.index is None or device.index >= available:
            raise BundleInputError(
                f"config 'device' {device} (LOCAL_RANK {os.environ['LOCAL_RANK']}): this node has {available} "
                "GPU(s); start at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(device)
    return True


def ddp_device_ids(device: torch.device | str) -> list[torch.device] | None:
    """``device_ids`` for ``DistributedDataParallel``: the process's GPU, or ``None`` on the CPU (gloo)."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else None


def data_parallel(module: torch.nn.Module, distributed: Any, device: torch.device | str) -> torch.nn.Module:
    """``module`` (already on ``device``) wrapped in ``DistributedDataParallel`` when ``distributed``.

    Checkpoints unwrap it again (``scripts.core.checkpoints.unwrap``), so weights never carry the
    wrapper's ``module.`` prefix.
    """
    if not as_bool(distributed, "distributed"):
        return module
    if not dist.is_initialized():
        raise RuntimeError(
            "a network was wrapped for DDP before the process group exists: "
            "scripts.core.distributed.init_process_group must come first in initialize"
        )
    return DistributedDataParallel(module, device_ids=ddp_device_ids(device))
