# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Output folders that appear whole or not at all, and never replace a user's files unasked.

A command writes into a hidden staging folder next to its destination; only when everything is
written is the staging folder renamed onto the destination (an atomic rename on one file
system). An interrupted run leaves at most a hidden ``.<name>.staging-*`` folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from scripts.errors import BundleInputError

__all__ = ["staging_dir", "publish"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(final_dir: str, overwrite: bool = False) -> str:
    """Create and return a staging folder for ``final_dir``.

    Raises ``BundleInputError`` up front when ``final_dir`` holds files and ``overwrite`` is off,
    or when its parent cannot be written.
    """
    final_dir = os.path.abspath(final_dir)
    if os.path.isfile(final_dir):
        raise BundleInputError(f"{final_dir}: exists and is a file; choose another output folder")
    if os.path.isdir(final_dir) and os.listdir(final_dir) and not overwrite:
        raise BundleInputError(f"{final_dir}: exists and is not empty; pass --overwrite true or choose another folder")
    parent = os.path.dirname(final_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.staging-", dir=parent)
    except OSError as e:
        raise BundleInputError(f"{parent}: cannot write output here ({e.strerror})") from e
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
    return staging


def publish(staging: str, final_dir: str) -> str:
    """Rename the finished ``staging`` folder onto ``final_dir``, replacing an old one."""
    final_dir = os.path.abspath(final_dir)
    old = None
    if os.path.isdir(final_dir):
        if os.listdir(final_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.old-", dir=os.path.dirname(final_dir))
            os.rmdir(old)
            os.rename(final_dir, old)
        else:
            os.rmdir(final_dir)
    os.rename(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir
