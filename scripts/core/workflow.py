# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The start of every workflow, in one place: ``@begin`` (configs/common.yaml) heads every ``initialize``.

Order matters: the error hook first, so that every later failure is one line; then ``torchrun``'s process
group, before anything reads a rank or touches a GPU; then the command line, so that a misspelt
``--setting`` stops here instead of being ignored. The config then checks its settings
(:func:`scripts.core.settings.check_settings`), after this hook is in place.
"""

from __future__ import annotations

from typing import Any

import torch

from .distributed import init_process_group
from .errors import install_error_hook
from .settings import check_cli_overrides

__all__ = ["begin"]


def begin(distributed: Any, device: torch.device | str) -> bool:
    """Install the error hook, join the process group (``distributed``: configs/multi_gpu.yaml), check the
    command line. Returns ``True`` for a config's ``initialize``."""
    install_error_hook()
    init_process_group(distributed, device)
    check_cli_overrides()
    return True
