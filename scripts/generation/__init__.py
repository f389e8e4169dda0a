# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Generation from trained weights: guided sampler, mask-to-image inference, unconditional sampling, previews."""

from . import inference, preview, quality_gate, sample_preview, sampler, unconditional

__all__ = ["inference", "preview", "quality_gate", "sample_preview", "sampler", "unconditional"]
