# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Experiments built from the other packages: the synthetic-data augmentation study."""

from . import augmentation_study

__all__ = ["augmentation_study"]
