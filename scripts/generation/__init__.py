# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Generation from trained weights: guided sampler, autoguidance, mask-to-image inference, unconditional sampling,
previews."""

from . import (
    autoguidance,
    inference,
    mask_sources,
    preview,
    quality_gate,
    sample_preview,
    sampler,
    unconditional,
    weights,
)

__all__ = [
    "autoguidance",
    "inference",
    "mask_sources",
    "preview",
    "quality_gate",
    "sample_preview",
    "sampler",
    "unconditional",
    "weights",
]
