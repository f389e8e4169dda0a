# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Settings checked before any work, nested ones and list items included (scripts.core.settings)."""

from __future__ import annotations

import re

import pytest
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigWorkflow

from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.settings import check_cli_overrides, check_settings, layered_config_files
from scripts.data.labels import LABELS, LabelContract
from scripts.tools.phantom import write_phantom_dataset

#: what ``sys.argv`` holds under ``python -m monai.bundle run``
BUNDLE_MAIN = str(BUNDLE_ROOT / ".venv" / "monai" / "bundle" / "__main__.py")


def _argv(config: str, *options: str) -> list[str]:
    files = str(layered_config_files(f"configs/{config}.yaml"))
    return [BUNDLE_MAIN, "run", "--config_file", files, *options]


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--phantom#max_hc", "--phantom#max_hc: phantom has no 'max_hc'; did you mean --phantom#max_hcc?"),
        ("--phantom#max_hcc#x", "--phantom#max_hcc#x: phantom#max_hcc is a single value (3); it has no 'x'"),
        ("--phantom#spacing_range#5", "phantom#spacing_range is a list of 3; '5' is not an index of it"),
    ],
)
def test_nested_overrides_are_checked_like_top_level_ones(option, expected, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    with pytest.raises(BundleInputError, match=re.escape(expected)):
        check_cli_overrides(_argv("demo_data", option, "2"))
    assert check_cli_overrides(_argv("demo_data", "--phantom#max_hcc", "2"))
    # a map the user fills takes any key
    assert check_cli_overrides(_argv("train_autoencoder", "--recon_class_weights#hcc", "4"))


def test_phantom_settings_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(BundleInputError, match="unknown setting 'max_hc'; did you mean max_hcc"):
        write_phantom_dataset(str(tmp_path / "a"), 2, 0, max_hc=2)
    with pytest.raises(BundleInputError, match="case 0 has no liver in its label map"):
        write_phantom_dataset(str(tmp_path / "b"), 2, 0, spacing_range=[[150, 150]] * 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("label_map", [{"liver": 1}, {1: "liver"}, {1.5: 1}, {True: 1}])
def test_label_map_with_non_integer_ids_is_one_line(label_map):
    with pytest.raises(BundleInputError, match="config 'label_map': expected dataset id -> bundle id as integers"):
        LabelContract(LABELS, label_map)
    assert LabelContract(LABELS, {"7": 1, 2: 4}).label_map == {7: 1, 2: 4}


@pytest.mark.parametrize(
    "config, setting, value, expected",
    [
        ("train_segmentation", "flip_axes", [0, 3], "config 'flip_axes': expected a list of integers from 0 to 2"),
        ("train_segmentation", "report_first", ["hcc", "tumour"], "config 'report_first': expected a list of names"),
    ],
)
def test_list_settings_check_every_item_before_any_work(config, setting, value, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=layered_config_files(f"configs/{config}.yaml"),
        workflow_type="train" if config.startswith("train") else "infer",
        output_dir=str(tmp_path / "out"),
        **{setting: value},
    )
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    assert str(find_input_error(caught.value)).startswith(expected)
    assert not (tmp_path / "out").exists()


def test_an_unknown_mask_edit_is_one_line_with_close_matches():
    from scripts.data.masks import mask_editor

    with pytest.raises(
        BundleInputError, match="unknown edit 'insert_hcc_diameter'; did you mean insert_hcc_diameters_mm"
    ):
        mask_editor(LABELS, {"insert_hcc_diameter": [10]})
    assert mask_editor(LABELS, None) is None
    assert mask_editor(LABELS, {"insert_hcc_diameters_mm": [10]}).enabled


def test_null_text_is_null_only_where_its_reader_converts_it():
    from scripts.core.settings import as_optional

    assert check_settings({"classifier_test": "null"}) and check_settings({"classifier_test": "None"})
    assert as_optional("null") is None and as_optional({"folds": 5}) == {"folds": 5}
    with pytest.raises(BundleInputError, match="config 'mask_editing': expected a dict or null, got 'null'"):
        check_settings({"mask_editing": "null"})  # read as given: the text stays refused
