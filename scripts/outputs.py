# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Outputs that appear whole or not at all, and never replace a user's files unasked.

Single files (:func:`atomic_path`, :func:`write_text_atomic`) are written to a temporary sibling
and renamed over the target, which the OS does atomically.

A command writes into a hidden staging folder next to its destination; only when everything is
written is the staging folder renamed onto the destination (an atomic rename on one file
system). An interrupted run leaves at most a hidden ``.<name>.staging-*`` folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from scripts.errors import BundleInputError
from scripts.settings import as_bool

__all__ = ["atomic_path", "write_text_atomic", "staging_dir", "publish"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary sibling of ``path`` for the block to write; renamed onto ``path`` when the block
    ends without error (with the usual file mode: ``mkstemp`` makes owner-only files), removed otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def staging_dir(final_dir: str, overwrite: bool = False) -> str:
    """Create and return a staging folder for ``final_dir``.

    Raises ``BundleInputError`` up front when ``final_dir`` holds files and ``overwrite`` is off,
    or when its parent cannot be written.
    """
    overwrite = as_bool(overwrite, "overwrite")
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
