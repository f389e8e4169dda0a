# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluation of synthetic sets: FID, diversity, mask fidelity, Dice, and the report combining them."""

from . import diversity, evaluation, fid, mask_fidelity

__all__ = ["diversity", "evaluation", "fid", "mask_fidelity"]
