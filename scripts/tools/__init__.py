# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Developer tools: the phantom dataset, the downstream study, the demo-weight recipe, the documentation
figures and the model-zoo release zip."""

import importlib
from types import ModuleType

__all__ = ["augmentation_study", "demo_weights", "figures", "phantom", "release"]


def __getattr__(name: str) -> ModuleType:
    """Modules imported on first use (``scripts.tools.phantom`` from a config): several also run as
    ``python -m scripts.tools.<module>``, which must not find them imported already."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
