# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Checked reading of user-facing settings.

MONAI's bundle command line passes ``--overwrite false`` to the config as the text ``'false'``,
which Python treats as true: a yes/no setting read without a check silently does the opposite
of what was asked (it replaced a user's output folder). Every yes/no setting is read through
:func:`as_bool`.
"""

from __future__ import annotations

from typing import Any

from scripts.errors import BundleInputError

__all__ = ["TRUE_WORDS", "FALSE_WORDS", "as_bool"]

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, 0/1, or one of true/false/1/0/yes/no in any case; else one
    error line naming the setting ``name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise BundleInputError(f"config '{name}': expected true/false/1/0/yes/no, got {value!r}")
