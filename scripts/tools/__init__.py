# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Developer tools: the model-zoo release zip and the documentation figures."""

from . import figures, release

__all__ = ["figures", "release"]
