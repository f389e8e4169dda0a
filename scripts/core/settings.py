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

__all__ = [
    "SETTING_RULES",
    "TRUE_WORDS",
    "FALSE_WORDS",
    "as_bool",
    "as_optional",
    "check_cli_overrides",
    "check_settings",
    "layered_config_files",
]

#: Task configs that are overlays on another task (besides configs/common.yaml, under every task).
BASE_TASKS = {
    "train_autoencoder": ("train_base",),  # the shared training skeleton
    "train_diffusion": ("train_base",),
    "train_controlnet": ("train_base",),
    "train_gan_baseline": ("train_base",),
    "train_segmentation": ("train_base",),
    "evaluate": ("train_segmentation",),  # the segmentation networks and sliding-window inferer
    "generate_unconditional": ("inference",),  # the weights, sampler and decoder of inference
    "inference_gan_baseline": ("inference",),  # inputs, outputs and checks of inference, another generator
}

#: Arguments of ``monai.bundle run`` itself, not config overrides.
RUN_ARGUMENTS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


#: The type and range of every user-facing setting, by name: one declaration for the whole bundle (a name
#: means the same in every workflow). A config lists the settings it reads in ``setting_checks`` (name ->
#: value); an entry may narrow the rule here with ``{value: ..., <rule keys>}`` (e.g. ``optional: true``).
SETTING_RULES: dict[str, dict[str, Any]] = {
    "acquisition_noise": dict(type="list", length=2, item="float", optional=True, null_text=True),
    "adv_weight": dict(type="float", min=0.0),
    "adversarial_warmup_epochs": dict(type="int", min=0),
    "amp": dict(type="bool"),
    "autoguidance_weight": dict(type="float", min=1.0),
    "batch_size": dict(type="int", min=1),
    "cache_rate": dict(type="float", min=0.0, max=1.0),
    "center_latents": dict(type="bool"),
    "class_loss_weights": dict(type="dict"),
    "classifier_test": dict(type="dict", optional=True, null_text=True),  # the evaluation reads null text as off
    "conditioning_scale": dict(type="float", min=0.0),
    "crop_ratios": dict(type="list", item="float", item_min=0.0),
    "d_lr": dict(type="float", min=0.0),
    "datalist": dict(type="str", optional=True),
    "decoder_upsampling": dict(type="int", min=0, max=2),
    "device": dict(type="device"),
    "distributed": dict(type="bool"),
    "edited_layouts": dict(type="dict"),
    "ema_decay": dict(type="float", min=0.001, max=0.99999),
    "ema_warmup_iterations": dict(type="int", min=1),
    "epoch_length": dict(type="int", min=1, optional=True),
    "equal_steps": dict(type="bool"),
    "eval_split": dict(type="str", choices=["training", "validation", "test"]),
    "feature_matching_weight": dict(type="float", min=0.0),
    "fid_batch_size": dict(type="int", min=1),
    "fid_center_slices_ratio": dict(type="float", min=0.0, max=1.0),
    "flip_axes": dict(type="list", item="int", item_min=0, item_max=2),
    "flip_prob": dict(type="float", min=0.0, max=1.0),
    "freeze_encoder": dict(type="bool"),
    "high_noise_timestep": dict(type="int", min=0),
    "histogram_bins": dict(type="int", min=2),
    "inference_overrides": dict(type="dict"),
    "keep_going": dict(type="bool"),
    "key_metric": dict(type="str", choices=["val_psnr", "val_ssim", "val_recon_contrast"]),
    "kl_weight": dict(type="float", min=0.0),
    "l1_weight": dict(type="float", min=0.0),
    "keep_epochs": dict(type="list", item="int", item_min=1),
    "label_guided_decoder": dict(type="bool"),
    "label_map": dict(type="dict", optional=True),
    "launcher": dict(type="str", choices=["subprocess", "in_process"]),
    "lr": dict(type="float", min=0.0),
    "lr_decay_power": dict(type="float", min=0.0),
    "mask_dir": dict(type="str", optional=True),
    "mask_editing": dict(type="dict", optional=True),
    "max_epochs": dict(type="int", min=1),
    "memory_check": dict(type="bool"),
    "ms_ssim_kernel_size": dict(type="int", min=1),
    "ms_ssim_levels": dict(type="int", min=1, optional=True),
    "ms_ssim_max_pairs": dict(type="int", min=1),
    "network": dict(type="str"),
    "network_overrides": dict(type="dict"),
    "networks": dict(type="list"),
    "num_cases": dict(type="int", min=1),
    "num_crops": dict(type="int", min=1),
    "num_inference_steps": dict(type="int", min=1),
    "num_real_cases": dict(type="int", min=1, optional=True),
    "num_renderings_per_mask": dict(type="int", min=0),
    "num_samples": dict(type="int", min=1),
    "num_samples_per_mask": dict(type="int", min=1),
    "num_val_samples": dict(type="int", min=0),
    "num_workers": dict(type="int", min=0),
    "onednn_convolutions": dict(type="bool"),
    "output_dir": dict(type="str"),
    "output_intensity_range": dict(type="list", length=2, item="float", optional=True, null_text=True),
    "overwrite": dict(type="bool"),
    "patch_size": dict(type="list", length=3, item="int"),
    "perceptual_weight": dict(type="float", min=0.0),
    "phantom": dict(type="dict"),
    "prediction_type": dict(type="str", choices=["v_prediction", "epsilon"]),
    "quality_gate_enabled": dict(type="bool"),
    "quality_gate_settings": dict(type="dict"),
    "real_case_selection": dict(type="str", choices=["first", "random"]),
    "real_sections": dict(type="list"),
    "recon_class_weights": dict(type="dict"),
    "reconstruction_row": dict(type="bool"),
    "report_first": dict(type="list"),
    "sampler": dict(type="str", choices=["ddpm", "ddim", "rflow"], optional=True),
    "save_figure": dict(type="bool"),
    "save_preview": dict(type="bool"),
    "section": dict(type="str", choices=["training", "validation", "test"]),
    "sections": dict(type="list"),
    "seed": dict(type="int", min=0),
    "seeds": dict(type="list", item="int"),
    "segmentation_checkpoint": dict(type="str", optional=True),
    "segmentation_overrides": dict(type="dict"),
    "shared_overrides": dict(type="dict"),
    "spacing": dict(type="list", length=3, item="float"),
    "spatial_size": dict(type="list", length=3, item="int"),
    "sw_batch_size": dict(type="int", min=1),
    "sw_overlap": dict(type="float", min=0.0, max=0.99),
    "synthetic": dict(type="dict"),
    "synthetic_dir": dict(type="str", optional=True),
    "synthetic_mask_dir": dict(type="str", optional=True),
    "synthetic_name": dict(type="str"),
    "synthetic_ratio": dict(type="float", min=0.0),
    "synthetic_ratios": dict(type="list", item="float"),
    "test_fraction": dict(type="float", min=0.0, max=1.0),
    "texture_measures": dict(type="bool"),
    "delivered_grid_measures": dict(type="bool"),
    "val_fraction": dict(type="float", min=0.0, max=1.0),
    "val_interval": dict(type="int", min=1),
    "val_timesteps": dict(type="list", item="int"),
    "weight_decay": dict(type="float", min=0.0),
}

#: Keys of a rule (besides ``value``); a dict made only of ``value`` and these narrows the declared rule.
RULE_KEYS = (
    "type",
    "min",
    "max",
    "choices",
    "length",
    "item",
    "item_min",
    "item_max",
    "item_choices",
    "optional",
    "null_text",
    "reason",
)


#: Text the bundle command line passes for ``--setting null`` (MONAI keeps it as a string).
NULL_WORDS = ("null", "none")


def as_optional(value: Any) -> Any:
    """``None`` for ``None`` or the text null/none (any case), as ``--setting null`` arrives; else ``value``."""
    return None if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS) else value


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

    def add_with_bases(path: str) -> None:
        for base in BASE_TASKS.get(os.path.splitext(os.path.basename(path))[0], ()):
            add_with_bases(os.path.join(os.path.dirname(path) or config_dir, f"{base}.yaml"))
        add(path)

    add(os.path.join(config_dir, "common.yaml"))
    for path in files:
        add_with_bases(path)
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


def _rule(name: str, entry: Any) -> tuple[Any, Mapping[str, Any]]:
    """The value of a ``setting_checks`` entry and its rule: :data:`SETTING_RULES`, narrowed by the entry."""
    narrowed = isinstance(entry, Mapping) and "value" in entry and set(entry) <= {"value", *RULE_KEYS}
    rule = {**SETTING_RULES.get(name, {}), **(entry if narrowed else {})}
    if "type" not in rule:
        raise KeyError(f"setting {name!r} has no rule in scripts.core.settings.SETTING_RULES")
    return (entry["value"] if narrowed else entry), rule


def check_settings(checks: Mapping[str, Any]) -> bool:
    """Check each setting against its rule; the first problem is one error line naming the setting.

    ``checks`` maps a setting's name to its value, checked against :data:`SETTING_RULES`: ``type``
    int|float|bool|str|dict|list|device with optional ``min``, ``max``, ``choices`` (str, bool), ``length``,
    ``item`` (list: int or float), ``item_min``/``item_max`` and ``item_choices`` (list: bounds or allowed
    values of every item), ``optional`` (null allowed; with ``null_text`` also the text null/none, which the
    reader converts with :func:`as_optional`) and ``reason`` (said after the error, why the rule holds).
    ``{value: ..., <rule keys>}`` narrows the declared rule for one workflow.
    Returns ``True`` for a config's ``initialize``.
    """
    for name, entry in checks.items():
        value, rule = _rule(name, entry)
        if rule.get("optional") and (value is None or (rule.get("null_text") and as_optional(value) is None)):
            continue
        if not _valid(value, rule):
            if rule["type"] == "device" and isinstance(value, (str,)) and value.startswith("cuda"):
                raise BundleInputError(
                    f"config {name!r}: {value!r} asked for, but this machine has no CUDA device; " "use --device cpu"
                )
            reason = f" ({rule['reason']})" if "reason" in rule else ""
            raise BundleInputError(f"config {name!r}: expected {_describe(rule)}, got {value!r}{reason}")
    return True
