# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""User-facing errors: one line that names the file and the problem, and a non-zero exit.

``python -m monai.bundle run`` lets exceptions escape with the full traceback, and MONAI wraps
errors raised while a config expression is evaluated in ``RuntimeError("Failed to evaluate ...")``.
A researcher who pointed the bundle at a bad file needs the one sentence at the bottom of that
chain, so every config installs :func:`install_error_hook` in its ``initialize`` section.

A write that fails for a reason the user has to resolve (full disk, read-only file system, quota,
permission) is such an error too, named by the folder being written
(:func:`scripts.core.outputs.explain_write_error`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "BundleInputError",
    "install_error_hook",
    "find_input_error",
    "error_line",
    "require_finite",
    "EngineErrorsAsOneLine",
]


class BundleInputError(ValueError):
    """A problem with something the user gave (a file, a folder or a config value).

    The message must say which file or setting is wrong and what is wrong with it, in one line.
    """


#: Exceptions whose message is already a complete sentence for the user.
_USER_FACING = (BundleInputError, FileExistsError, FileNotFoundError, PermissionError)


def find_input_error(exc: BaseException | None) -> BaseException | None:
    """Return the first user-facing error in ``exc``'s cause/context chain, or ``None``."""
    return _in_chain(exc, _USER_FACING)


def _in_chain(
    exc: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain, or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(exc: BaseException) -> str | None:
    try:  # imported here: scripts.core.outputs imports this module
        from scripts.core.outputs import explain_write_error
    except ImportError:
        return None
    return explain_write_error(exc)


def error_line(exc: BaseException) -> str | None:
    """The one ``ERROR: ...`` line for ``exc``, or ``None`` when it is not the user's to fix (a bug:
    the traceback is shown then)."""
    interrupt = _in_chain(exc, KeyboardInterrupt)  # also when it broke a write that then failed in turn
    if interrupt is not None:
        return f"ERROR: interrupted ({interrupt or 'Ctrl-C'}); nothing half-written was published"
    user_error = find_input_error(exc)
    if not isinstance(user_error, BundleInputError):  # a bare OSError may be a failed write: name its folder
        message = _write_error(exc)
        if message is not None:
            return "ERROR: " + " ".join(message.split())
    if user_error is None:
        return None
    message = " ".join(str(user_error).split())  # force a single line
    if isinstance(user_error, OSError) and user_error.filename and str(user_error.filename) not in message:
        message = f"{user_error.filename}: {message}"
    return f"ERROR: {message}"


def _one_line_hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    line = error_line(exc)
    if line is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    print(line, file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def install_error_hook() -> bool:
    """Print user-facing errors as one ``ERROR:`` line instead of a traceback; Python still exits 1.

    SIGTERM (what batch schedulers and containers send) is handled like Ctrl-C: it raises
    ``KeyboardInterrupt``, so every staging folder and temporary file is removed on the way out.
    Returns ``True`` so it can sit in a config's ``initialize`` list.
    """
    sys.excepthook = _one_line_hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    return True


def require_finite(values: Any, what: str, hint: str) -> Any:
    """``values`` (a tensor or array) unchanged, or one error line when they hold NaN or Inf: no command
    publishes a non-finite volume. ``what`` names the result, ``hint`` says what to check."""
    import torch

    if not bool(torch.isfinite(torch.as_tensor(values)).all()):
        raise BundleInputError(f"{what} holds NaN or Inf: the weights produce non-finite values ({hint})")
    return values


class _EngineErrorLineFilter(logging.Filter):
    """Drops ignite's "run is terminating due to exception" line: the error hook reports the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is terminating due to exception" not in str(record.msg)


def _reraise(_engine: Any, error: BaseException) -> None:
    raise error


class EngineErrorsAsOneLine:
    """Ignite handler: a failure inside the engine (a bad file, SIGTERM, a full disk) reaches the error
    hook untouched, so it ends as one ``ERROR:`` line (a bug still shows its traceback there).

    Ignite runs ``EXCEPTION_RAISED`` handlers in order and stops at the first that raises; this one
    puts itself first, so MONAI's ``StatsHandler`` no longer logs the traceback beside the line.
    Ignite's own "terminating due to exception" log line is filtered out.
    """

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(_reraise, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, _reraise)
            # first in firing order even on an engine whose loggers attached theirs already (an evaluator
            # built before its trainer): ignite keeps (handler, args, kwargs) in this list, in order
            handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
            handlers.insert(0, handlers.pop())
            engine.logger.addFilter(_EngineErrorLineFilter())
