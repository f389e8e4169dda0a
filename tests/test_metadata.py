# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Bundle metadata: schema validation offline, and versions equal to what is installed."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import pytest
import yaml
from monai.bundle import verify_metadata

from conftest import BUNDLE_ROOT

META = BUNDLE_ROOT / "configs" / "metadata.json"
SCHEMA = BUNDLE_ROOT / "docs" / "metadata_schema.json"


def _metadata() -> dict:
    return json.loads(META.read_text())


def test_metadata_validates_against_the_bundled_schema():
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))  # raises on failure; never downloads


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m.pop("network_data_format"),
        lambda m: m.pop("intended_use"),
        lambda m: m.update(version="one"),
        lambda m: m["autoencoder_data_format"]["inputs"]["image"].pop("num_channels"),
        lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels="1"),
    ],
    ids=["no_network_data_format", "no_intended_use", "bad_version", "spec_without_channels", "channels_not_int"],
)
def test_schema_rejects_broken_metadata(tmp_path, breakage):
    meta = _metadata()
    breakage(meta)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


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
    for name in ("LICENSE", "README.md", "docs/README.md", "large_files.yml", "configs/logging.conf", "requirements.txt"):
        assert (BUNDLE_ROOT / name).is_file(), name
    assert "Apache License" in (BUNDLE_ROOT / "LICENSE").read_text()
    entries = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    for entry in entries:
        assert {"path", "url", "hash_val", "hash_type"} <= set(entry)
        if not entry["url"]:  # shipped in the repository: present, and the listed hash is its hash
            from monai.apps.utils import check_hash

            path = BUNDLE_ROOT / entry["path"]
            assert path.is_file() and check_hash(str(path), entry["hash_val"], entry["hash_type"]), entry["path"]
