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

:func:`check_settings` checks the type and range of each user-facing setting a config lists in its
``setting_checks`` before any work, so ``--seed -1`` or ``--num_inference_steps abc`` is one line
naming the setting, not a traceback after the first volumes were sampled.

Every command layers its task config on ``configs/common.yaml``; :func:`layered_config_files`
is the one place that knows the order (used by the drivers that start other commands, the
benchmarks and the tests).
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.core.errors import BundleInputError

__all__ = ["TRUE_WORDS", "FALSE_WORDS", "as_bool", "check_cli_overrides", "check_settings", "layered_config_files"]

#: Task configs that are overlays on another task (besides configs/common.yaml, under every task).
BASE_TASKS = {
    "evaluate": ("train_segmentation",),  # the segmentation networks and sliding-window inferer
    "generate_unconditional": ("inference",),  # the weights, sampler and decoder of inference
    "inference_gan_baseline": ("inference",),  # inputs, outputs and checks of inference, another generator
}

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
    raise BundleInputError(f"config {name!r}: expected true/false/1/0/yes/no, got {value!r}")


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


def layered_config_files(*files: str, config_dir: str | None = None) -> list[str]:
    """Config files of one command in layering order: common.yaml, each task's base tasks, then ``files``.

    ``files`` are config paths (``configs/inference.yaml``, an overlay such as ``configs/hires.yaml``)
    in the order given; a file already listed is not repeated. Paths keep their form (relative or
    absolute); the added ones are ``config_dir/<name>.yaml``, by default in the first file's folder.
    """
    config_dir = config_dir or (os.path.dirname(files[0]) if files else "") or "configs"
    ordered: list[str] = []

    def add(path: str) -> None:
        if os.path.normpath(path) not in map(os.path.normpath, ordered):
            ordered.append(path)

    add(os.path.join(config_dir, "common.yaml"))
    for path in files:
        for base in BASE_TASKS.get(os.path.splitext(os.path.basename(path))[0], ()):
            add(os.path.join(os.path.dirname(path) or config_dir, f"{base}.yaml"))
        add(path)
    return ordered


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
    task = files[-1] if isinstance(files, list) else files  # the task config, layered on configs/common.yaml
    for name in options:
        key = name.split("#")[0]
        if name in RUN_ARGUMENTS:
            continue
        if key in declared:
            _check_key_path(parser.get(key), name)
            continue
        close = difflib.get_close_matches(key, declared, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        raise BundleInputError(f"--{name}: not a setting of {task}{hint}")
    return True


def _check_key_path(value: Any, name: str) -> None:
    """Refuse ``--a#b#c`` when ``b`` (or ``c``) is not inside the declared ``a``, with close matches.

    An empty dict (a map the user fills, e.g. class weights) takes any key; a value given as an
    expression or reference cannot be looked into and is left to its own checks.
    """
    parts = name.split("#")
    for depth, part in enumerate(parts[1:], start=1):
        prefix = "#".join(parts[:depth])
        if isinstance(value, str) and value.startswith(("$", "@", "%")):
            return
        if isinstance(value, Mapping):
            if not value:
                return
            if part in value:
                value = value[part]
                continue
            close = difflib.get_close_matches(part, [str(k) for k in value], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(f'--{prefix}#{c}' for c in close)}?" if close else ""
            raise BundleInputError(f"--{name}: {prefix} has no {part!r}{hint}")
        if isinstance(value, (list, tuple)):
            if part.isdigit() and int(part) < len(value):
                value = value[int(part)]
                continue
            raise BundleInputError(f"--{name}: {prefix} is a list of {len(value)}; {part!r} is not an index of it")
        raise BundleInputError(f"--{name}: {prefix} is a single value ({value!r}); it has no {part!r}")


def _describe(rule: Mapping[str, Any]) -> str:
    kind = {
        "int": "an integer",
        "float": "a number",
        "bool": "true/false",
        "str": "text",
        "dict": "a dict",
        "list": "a list",
        "device": "a device (cpu, cuda, cuda:N)",
    }[rule["type"]]
    if "choices" in rule:
        kind = "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in rule["choices"])
    if rule["type"] == "list":
        item = {"int": "integers", "float": "numbers"}.get(rule.get("item", ""), "values")
        if "item_choices" in rule:
            item = "names from " + ", ".join(str(c) for c in rule["item_choices"])
        if "item_min" in rule or "item_max" in rule:
            item += f" from {rule.get('item_min', '-inf')} to {rule.get('item_max', 'inf')}"
        kind = f"a list of {rule['length']} {item}" if "length" in rule else f"a list of {item}"
    bounds = [f">= {rule['min']}" if "min" in rule else "", f"<= {rule['max']}" if "max" in rule else ""]
    bounds = " and ".join(b for b in bounds if b)
    return kind + (f" {bounds}" if bounds else "") + (" or null" if rule.get("optional") else "")


def _is_number(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float)) and value == value


def _valid(value: Any, rule: Mapping[str, Any]) -> bool:
    kind = rule["type"]
    if kind == "bool":
        try:
            flag = as_bool(value, "")
        except BundleInputError:
            return False
        return "choices" not in rule or flag in rule["choices"]
    if kind in ("int", "float"):
        ok = _is_number(value, kind)
        return ok and rule.get("min", value) <= value <= rule.get("max", value)
    if kind == "str":
        return isinstance(value, str) and ("choices" not in rule or value in rule["choices"])
    if kind == "dict":
        return isinstance(value, Mapping)
    if kind == "list":
        if not isinstance(value, (list, tuple)) or ("length" in rule and len(value) != rule["length"]):
            return False
        if "item_choices" in rule and any(v not in rule["item_choices"] for v in value):
            return False
        if any(not rule.get("item_min", v) <= v <= rule.get("item_max", v) for v in value if _is_number(v, "float")):
            return False
        return "item" not in rule or all(_is_number(v, rule["item"]) for v in value)
    if kind == "device":
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            return False
        return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    raise ValueError(f"unknown setting type {kind!r}")


def check_settings(checks: Mapping[str, Mapping[str, Any]]) -> bool:
    """Check each setting against its rule; the first problem is one error line naming the setting.

    ``checks`` maps a setting's name to ``{"value": ..., "type": int|float|bool|str|dict|list|device}``
    with optional ``min``, ``max``, ``choices`` (str, bool), ``length``, ``item`` (list: int or float),
    ``item_min``/``item_max`` and ``item_choices`` (list: bounds or allowed values of every item),
    ``optional`` (null allowed) and ``reason`` (said after the error, why the rule holds).
    Returns ``True`` for a config's ``initialize``.
    """
    for name, rule in checks.items():
        value = rule["value"]
        if value is None and rule.get("optional"):
            continue
        if not _valid(value, rule):
            if rule["type"] == "device" and isinstance(value, (str,)) and value.startswith("cuda"):
                raise BundleInputError(
                    f"config {name!r}: {value!r} asked for, but this machine has no CUDA device; " "use --device cpu"
                )
            reason = f" ({rule['reason']})" if "reason" in rule else ""
            raise BundleInputError(f"config {name!r}: expected {_describe(rule)}, got {value!r}{reason}")
    return True
