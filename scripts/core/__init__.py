# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Plumbing every package uses: input errors, setting checks, owned output folders, checkpoints, available memory."""

from . import checkpoints, distributed, errors, memory, outputs, settings, workflow

__all__ = ["checkpoints", "distributed", "errors", "memory", "outputs", "settings", "workflow"]
