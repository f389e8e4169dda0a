# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Developer tools: the model-zoo release zip and the documentation figures."""

import importlib
from types import ModuleType

__all__ = ["figures", "release"]


def __getattr__(name: str) -> ModuleType:
    """Modules imported on first use (``scripts.tools.figures`` from a config): both also run as
    ``python -m scripts.tools.<module>``, which must not find them imported already."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
