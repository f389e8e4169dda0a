# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Plumbing every package uses: input errors, setting checks, owned output folders, checkpoints."""

from . import checkpoints, errors, outputs, settings

__all__ = ["checkpoints", "errors", "outputs", "settings"]
