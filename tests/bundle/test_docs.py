# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Every bundle command in the README and the model card names config files that exist, an entry point they
declare and only settings they declare: a renamed config, entry point or setting fails here, not for a reader.
(The main job itself runs in tests/test_inference.py; placeholders such as D or P are not run.)"""

from __future__ import annotations

import ast
import re
import shlex

import pytest
import yaml
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser

from scripts.core.settings import RUN_ARGUMENTS
from scripts.tools.release import standalone_config

DOCUMENTS = ("README.md", "docs/README.md")
#: Placeholder paths of the "from another folder" example.
OTHER_FOLDER = "/path/to/bundle/"


def _commands(text: str) -> list[str]:
    """``python -m monai.bundle run ...`` commands in code blocks (continued lines joined) and inline code."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = re.findall(r"python -m monai\.bundle run [^`\n]*", joined)
    return [c.split("  #")[0].strip() for c in found if not c.rstrip().endswith("run ...")]


def _parse(command: str) -> tuple[str, list[str], list[str]]:
    """(entry point, config files, setting names) of a command; optional ``[--a b]`` parts count."""
    raw = shlex.split(command)[4:]
    tokens = [t.lstrip("[") if t.startswith("[--") else t for t in raw]
    run_id = "run" if not tokens or tokens[0].startswith("--") else tokens[0]
    files, names = [], []
    for i, token in enumerate(tokens):
        if token == "--config_file":
            value = tokens[i + 1]
            files = ast.literal_eval(value) if value.startswith("[") else [value]
        elif token.startswith("--"):
            names.append(token[2:].split("=")[0])
    return run_id, [f.replace(OTHER_FOLDER, "") for f in files], names


COMMANDS = sorted({c for doc in DOCUMENTS for c in _commands((BUNDLE_ROOT / doc).read_text())})


def test_the_documents_hold_the_commands_of_every_workflow():
    configs = {f for c in COMMANDS for f in _parse(c)[1]}
    for task in ("inference", "demo_data", "check_data", "train_autoencoder", "train_diffusion", "evaluate"):
        assert f"configs/{task}.yaml" in configs, task


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_names_what_its_configs_declare(command):
    run_id, files, names = _parse(command)
    assert files, f"no --config_file in: {command}"
    for path in files:
        assert (BUNDLE_ROOT / path).is_file(), f"{path} does not exist: {command}"
    if len(files) == 1:  # a single-file command of the release, whose workflow configs ship standalone
        content = yaml.safe_load(standalone_config(str(BUNDLE_ROOT), files[0]))
    else:
        content = ConfigParser.load_config_files([str(BUNDLE_ROOT / f) for f in files])
    assert run_id in content, f"entry point {run_id!r} is not declared: {command}"
    for name in names:
        if name in RUN_ARGUMENTS:
            continue
        assert name.split("#")[0] in content, f"--{name} is not a setting of {files[-1]}: {command}"
