# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Outputs that appear whole or not at all, and never replace a user's files unasked.

Single files (:func:`atomic_path`, :func:`write_text_atomic`) are written to a temporary sibling
and renamed over the target, which the OS does atomically.

A command writes into a hidden staging folder next to its destination; only when everything is
written is the staging folder renamed onto the destination (an atomic rename on one file
system). An interrupted run leaves at most a hidden ``.<name>.staging-<pid>-*`` folder behind;
the next run for the same destination removes those whose process has ended.

Replacing a non-empty folder needs ``overwrite`` and is allowed only for a folder the bundle
published itself as the same kind of output (its :data:`OWNER_MARKER` names the kind: a latent
cache never replaces a dataset) and that holds nothing but the files published there (a checkpoint
written into it later is the user's); never for one that holds an input of the command, the
bundle, the working directory, the home folder or ``/``. A second run that finishes writing into the
same destination after another published there is refused instead of replacing it. A destination
given as ``~/...`` is refused: nothing here expands ``~``, so it would become a folder named ``~``.

A write that fails because the disk is full, the file system read-only, the quota used up or
writing not permitted ends the command with one ``ERROR:`` line naming the destination and the
cause (:func:`explain_write_error`, called by the error hook of :mod:`scripts.core.errors`), and what
was staged is removed.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from scripts.core.errors import BundleInputError
from scripts.core.settings import as_bool

__all__ = [
    "OWNER_MARKER",
    "atomic_path",
    "write_text_atomic",
    "markdown_table",
    "staging_dir",
    "publish",
    "staged_output",
    "check_folder_path",
    "pid_alive",
    "explain_write_error",
]

#: File in every folder the bundle publishes: the proof that it may replace that folder.
OWNER_MARKER = ".3d-lldm-output.json"
#: Folder of the bundle (never an output folder, nor inside one being replaced).
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger(__name__)

#: errno of a write the user has to resolve (free space, another place), with what to do about it.
WRITE_ERRORS = {
    errno.ENOSPC: "free space there or choose another folder",
    errno.EDQUOT: "free space within your quota or choose another folder",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
}
#: What is being written now: a staging folder or temporary file -> (the destination the user named,
#: whether it is a folder). Filled by :func:`staging_dir` and :func:`atomic_path`, emptied when they
#: finish; an entry stays when the write failed, for :func:`explain_write_error` to name the destination.
_WRITING: dict[str, tuple[str, bool]] = {}


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
    _WRITING[tmp] = (os.path.abspath(path), False)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    del _WRITING[tmp]


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (every report the bundle writes); cells are written with ``str``."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _contains(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (real paths)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _published_files(folder: str) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), the ownership marker aside."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != OWNER_MARKER:
                found.append(relative)
    return sorted(found)


def _check_owned(final_dir: str, kind: str) -> None:
    """Raise unless ``final_dir`` is a ``kind`` output the bundle published and holds only what it published."""
    marker = os.path.join(final_dir, OWNER_MARKER)
    if not os.path.isfile(marker):
        raise BundleInputError(
            f"{final_dir}: not a folder this bundle wrote (no {OWNER_MARKER}); it is not replaced "
            "even with --overwrite true: remove it yourself or choose another folder"
        )
    try:
        with open(marker) as f:
            record = json.load(f)
        published, written_as = set(record["files"]), record["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BundleInputError(
            f"{final_dir}: its {OWNER_MARKER} does not list what was published there (an older bundle version "
            "or an edited file); it is not replaced: remove the folder yourself or choose another one"
        ) from None
    if written_as != kind:
        raise BundleInputError(
            f"{final_dir}: holds a {written_as} this bundle wrote, not a {kind}; it is not replaced "
            "even with --overwrite true: choose another folder"
        )
    added = [path for path in _published_files(final_dir) if path not in published]
    if added:
        raise BundleInputError(
            f"{final_dir}: holds files the bundle did not publish there ({added[0]}"
            f"{f' and {len(added) - 1} more' if len(added) > 1 else ''}); it is not replaced even with "
            "--overwrite true: move them or choose another folder"
        )


def _check_replaceable(final_dir: str, inputs: Sequence[str], kind: str) -> None:
    """Raise unless the non-empty ``final_dir`` is a folder the bundle published and holds nothing precious."""
    protected = {
        "/": os.sep,
        "the home folder": os.path.expanduser("~"),
        "the working directory": os.getcwd(),
        "the bundle": BUNDLE_ROOT,
    }
    for what, folder in protected.items():
        if _contains(final_dir, folder):
            raise BundleInputError(f"{final_dir}: holds {what}; it is never replaced, choose another output folder")
    held = [path for path in inputs if _contains(final_dir, path)]
    if held:
        raise BundleInputError(f"{final_dir}: holds an input of this command ({held[0]}); choose another output folder")
    _check_owned(final_dir, kind)


def _destination(final_dir: str) -> str:
    """``final_dir`` as an absolute path; ``~`` is refused rather than made into a folder of that name,
    and a path through a file is named as such (not ``File exists`` from ``makedirs``)."""
    if str(final_dir).startswith("~"):
        raise BundleInputError(
            f"{final_dir}: '~' is not expanded here and would become a folder named '~'; give the full path"
        )
    final_dir = os.path.abspath(final_dir)
    check_folder_path(final_dir)
    return final_dir


def check_folder_path(folder: str) -> None:
    """One error line when ``folder`` or a folder above it exists as something other than a folder."""
    path = os.path.abspath(folder)
    while True:
        if os.path.exists(path) and not os.path.isdir(path):
            what = "is" if path == os.path.abspath(folder) else f"lies inside {path}, which is"
            raise BundleInputError(f"{folder}: {what} a file, not a folder; choose another folder")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_leftovers(final_dir: str) -> None:
    """Remove hidden staging / old folders of ``final_dir`` whose run has ended (killed, power loss)."""
    name = os.path.basename(final_dir)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(staging|old)-(\d+)-")
    for path in glob.glob(os.path.join(glob.escape(os.path.dirname(final_dir)), f".{glob.escape(name)}.*-*")):
        match = pattern.match(os.path.basename(path))
        if match and os.path.isdir(path) and not pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning(f"removed {path}, left by an interrupted run")


def staging_dir(final_dir: str, overwrite: bool = False, inputs: Sequence[str] = (), kind: str = "output") -> str:
    """Create and return a staging folder for ``final_dir``.

    Raises ``BundleInputError`` up front when ``final_dir`` holds files and ``overwrite`` is off,
    when it could not be replaced even with ``overwrite`` (see the module docstring; ``inputs``:
    the files the command reads; ``kind``: what the command publishes, e.g. ``"latent cache"``),
    or when its parent cannot be written.
    """
    overwrite = as_bool(overwrite, "overwrite")
    final_dir = _destination(final_dir)
    if os.path.isdir(final_dir) and os.listdir(final_dir):
        if not overwrite:
            raise BundleInputError(
                f"{final_dir}: exists and is not empty; pass --overwrite true or choose another folder"
            )
        _check_replaceable(final_dir, inputs, kind)
    parent = os.path.dirname(final_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(final_dir)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.staging-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise BundleInputError(f"{parent}: cannot write output here ({e.strerror})") from e
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
    _WRITING[staging] = (final_dir, True)
    return staging


def publish(staging: str, final_dir: str, overwrite: bool = False, kind: str = "output") -> str:
    """Rename the finished ``staging`` folder onto ``final_dir``, replacing an old one the bundle wrote
    when ``overwrite`` allows it (as :func:`staging_dir` checked when the run started).

    The marker written into it records ``kind`` and every file published, which is what a later
    ``overwrite`` may replace. A destination that another run filled while this one was working is
    not replaced: one error line, and this run's staging folder is removed.
    """
    final_dir = _destination(final_dir)
    record = {
        "written_by": "3D-LLDM bundle",
        "kind": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
        "files": _published_files(staging),
    }
    with open(os.path.join(staging, OWNER_MARKER), "w") as f:
        json.dump(record, f)
    old = None
    try:
        if os.path.isdir(final_dir):
            if os.listdir(final_dir):
                if not as_bool(overwrite, "overwrite"):
                    raise BundleInputError(
                        f"{final_dir}: another run wrote this folder while this one was working; "
                        "its content is kept and this run's output discarded"
                    )
                _check_owned(final_dir, kind)  # as it is now, not as it was when this run started
                old = tempfile.mkdtemp(
                    prefix=f".{os.path.basename(final_dir)}.old-{os.getpid()}-", dir=os.path.dirname(final_dir)
                )
                os.rmdir(old)
                os.rename(final_dir, old)
            else:
                os.rmdir(final_dir)
        os.rename(staging, final_dir)
    except OSError as e:  # e.g. the destination appeared (non-empty) between the check and the rename
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleInputError(f"{final_dir}: cannot publish the output here ({e.strerror})") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _WRITING.pop(os.path.abspath(staging), None)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


@contextmanager
def staged_output(
    final_dir: str, overwrite: bool = False, inputs: Sequence[str] = (), kind: str = "output"
) -> Iterator[str]:
    """The one transaction of every output folder: a :func:`staging_dir` for the block to fill,
    published onto ``final_dir`` (:func:`publish`) when the block ends without error, removed otherwise."""
    staging = staging_dir(final_dir, overwrite, inputs=inputs, kind=kind)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, final_dir, overwrite, kind=kind)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def explain_write_error(exc: BaseException | None) -> str | None:
    """One line for a failed write in ``exc``'s cause/context chain, or ``None`` if there is none.

    A write error is an ``OSError`` with an errno of :data:`WRITE_ERRORS` met while writing a
    staging folder or an atomic file (found by the file it names; an error that names no file, as
    a full disk met inside a compressor, belongs to the latest of them), or, for a full disk, an
    exceeded quota or a read-only file system, any file. The line names the folder being written
    (for a staging folder: the destination the user gave), the cause and what to do; the staging
    folder, if still there, is removed.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return None
    filename = os.path.abspath(os.fsdecode(exc.filename)) if exc.filename else None
    writing = [path for path in _WRITING if filename is None or _inside(filename, path)]
    if writing:
        target, is_folder = _WRITING.pop(writing[-1])
        if is_folder:  # a staging folder: removed (if its command has not), the destination stays as it was
            shutil.rmtree(writing[-1], ignore_errors=True)
            folder, what = target, "the output"
        else:
            folder, what = os.path.dirname(target), os.path.basename(target)
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and filename is not None:
        folder, what = os.path.dirname(filename), os.path.basename(filename)
    else:
        return None  # e.g. an input that may not be read: not a write error
    cause = exc.strerror or os.strerror(exc.errno)
    return f"{folder}: cannot write {what} ({cause}); nothing half-written was kept: {WRITE_ERRORS[exc.errno]}"
