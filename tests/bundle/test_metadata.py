# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Bundle metadata: validation against the model zoo's schema offline, and versions equal to what is installed."""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version

import pytest
import yaml
from conftest import BUNDLE_ROOT
from monai.bundle import verify_metadata

META = BUNDLE_ROOT / "configs" / "metadata.json"
# The model zoo's metadata schema, named by its URL in metadata.json. The offline copy is the text the
# MONAI project publishes as public/schema/meta_schema_20240725.json in the GitHub repository
# Project-MONAI/project-monai.github.io (git blob 875e55b7a3e03967ce2df999073ab6ff073290fa), byte for
# byte, so the tests never download it.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA = BUNDLE_ROOT / "docs" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"


def _metadata() -> dict:
    return json.loads(META.read_text())


def _tensor_specs(meta: dict):
    """(network, side, name, spec) for every tensor of every ``*_data_format``."""
    for network, data_format in meta.items():
        if network.endswith("_data_format"):
            for side in ("inputs", "outputs"):
                for name, spec in data_format[side].items():
                    yield network, side, name, spec


def test_schema_field_is_the_model_zoo_url():
    assert _metadata()["schema"] == SCHEMA_URL


def test_offline_schema_is_the_official_copy():
    assert SCHEMA.name == SCHEMA_URL.rsplit("/", 1)[-1]
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_metadata_validates_against_the_official_schema():
    # the schema file exists and its hash matches, so verify_metadata never downloads; it raises on failure
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA), hash_val=SCHEMA_SHA256, hash_type="sha256")


def _set_value_range(meta: dict, value_range: list) -> None:
    meta["autoencoder_data_format"]["outputs"]["latent"]["value_range"] = value_range


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m.pop("schema"),
        lambda m: m.pop("network_data_format"),
        lambda m: m.update(version=5),
        lambda m: m["autoencoder_data_format"]["inputs"]["image"].pop("num_channels"),
        lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels="1"),
        lambda m: _set_value_range(m, ["-inf", "inf"]),
        lambda m: m["controlnet_data_format"]["outputs"]["pred"].update(value_range=[0, "inf"]),
        lambda m: m["network_data_format"]["inputs"]["label"].pop("value_range"),
    ],
    ids=[
        "no_schema",
        "no_network_data_format",
        "version_not_string",
        "spec_without_channels",
        "channels_not_int",
        "value_range_strings",
        "value_range_one_string",
        "spec_without_value_range",
    ],
)
def test_schema_rejects_broken_metadata(tmp_path, breakage):
    meta = _metadata()
    breakage(meta)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


def test_value_ranges_are_min_max_or_not_known():
    """The bundle specification's form: ``[MIN, MAX]``, or ``[]`` where the range is not known (latents)."""
    for network, side, name, spec in _tensor_specs(_metadata()):
        value_range = spec["value_range"]
        where = f"{network}.{side}.{name}"
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range), where
        assert value_range == [] or (len(value_range) == 2 and value_range[0] <= value_range[1]), where


def test_model_card_fields_are_filled():
    """Fields the model zoo shows that the official schema leaves optional."""
    meta = _metadata()
    for key in ("name", "intended_use", "data_source", "data_type", "image_classes", "label_classes", "pred_classes"):
        assert isinstance(meta.get(key), str) and meta[key].strip(), key
    assert meta["references"] and all(isinstance(r, str) and r for r in meta["references"])


def test_version_has_a_changelog_entry():
    meta = _metadata()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["version"] in meta["changelog"]


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, pinned = line.split("==")
            pins[name.strip().lower()] = pinned.strip()
    return pins


def test_versions_equal_requirements_and_installed_packages():
    meta = _metadata()
    pins = _pins(BUNDLE_ROOT / "requirements.txt")
    declared = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    declared.update({k.lower(): v for k, v in meta["required_packages_version"].items()})
    assert declared == pins, "metadata.json and requirements.txt disagree"
    for package, pinned in declared.items():
        assert version(package).split("+")[0] == pinned, f"{package} installed {version(package)}, pinned {pinned}"


def test_labels_in_metadata_match_common_config():
    labels = yaml.safe_load((BUNDLE_ROOT / "configs" / "common.yaml").read_text())["labels"]
    channel_def = _metadata()["controlnet_data_format"]["inputs"]["controlnet_cond"]["channel_def"]
    assert len(channel_def) == len(labels)
    assert _metadata()["controlnet_data_format"]["inputs"]["controlnet_cond"]["num_channels"] == len(labels)


def test_model_zoo_files_are_present():
    for name in (
        "LICENSE",
        "README.md",
        "docs/README.md",
        "large_files.yml",
        "configs/logging.conf",
        "requirements.txt",
    ):
        assert (BUNDLE_ROOT / name).is_file(), name
    assert "Apache License" in (BUNDLE_ROOT / "LICENSE").read_text()
    entries = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    for entry in entries:
        assert {"path", "url", "hash_val", "hash_type"} <= set(entry)
        if not entry["url"]:  # shipped in the repository: present, and the listed hash is its hash
            from monai.apps.utils import check_hash

            path = BUNDLE_ROOT / entry["path"]
            assert path.is_file() and check_hash(str(path), entry["hash_val"], entry["hash_type"]), entry["path"]


def test_model_card_is_short_enough_to_read_and_keeps_its_history_apart():
    card = (BUNDLE_ROOT / "docs" / "README.md").read_text().splitlines()
    assert (
        len(card) <= 500
    ), f"docs/README.md has {len(card)} lines: move history to docs/CHANGELOG.md or docs/experiments.md"
    changelog = (BUNDLE_ROOT / "docs" / "CHANGELOG.md").read_text()
    assert f"## {_metadata()['version']}" in changelog  # the current release has its entry
