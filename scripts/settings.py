# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Checked reading of user-facing settings.

MONAI's bundle command line passes ``--overwrite false`` to the config as the text ``'false'``,
which Python treats as true: a yes/no setting read without a check silently does the opposite
of what was asked (it replaced a user's output folder). Every yes/no setting is read through
:func:`as_bool`.

It also adds any ``--key value`` as a new config entry, so a misspelt setting
(``--num_inference_step 5``) is silently ignored and the default used. :func:`check_cli_overrides`,
first in every config's ``initialize``, refuses a key that none of the command's config files
declares, with the closest declared ones.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any

from scripts.errors import BundleInputError

__all__ = ["TRUE_WORDS", "FALSE_WORDS", "as_bool", "check_cli_overrides"]

#: Arguments of ``monai.bundle run`` itself, not config overrides.
RUN_ARGUMENTS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")

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


def _cli_options(argv: Sequence[str]) -> dict[str, str | None]:
    """``--name value`` and ``--name=value`` options of a command line, in order."""
    options: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if not token.startswith("--") or len(token) < 3:
            continue
        name, equals, value = token[2:].partition("=")
        following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        options[name] = value if equals else following
    return options


def check_cli_overrides(argv: Sequence[str] | None = None) -> bool:
    """Refuse a command-line override that no config file of the command declares.

    Applies to ``python -m monai.bundle run`` command lines (``argv``: ``sys.argv``); a key path
    (``--a#b``) is checked by its first part. Returns ``True`` for a config's ``initialize``.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or os.path.basename(os.path.dirname(argv[0])) != "bundle" or "run" not in argv[1:2]:
        return True  # not the bundle command line (in-process workflows pass their overrides as arguments)
    options = _cli_options(argv[1:])
    files = options.get("config_file")
    if not files:
        return True
    files = ast.literal_eval(files) if files.strip().startswith("[") else files
    parser = ConfigParser()
    parser.read_config(files)
    declared = [key for key in parser.get() if not key.startswith("_")]
    for name in options:
        key = name.split("#")[0]
        if name in RUN_ARGUMENTS or key in declared:
            continue
        close = difflib.get_close_matches(key, declared, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        raise BundleInputError(f"--{name}: not a setting of {files}{hint}")
    return True
