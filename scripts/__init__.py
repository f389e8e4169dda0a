# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Python package of the 3D-LLDM bundle, imported from configs as ``scripts.<module>``."""

from . import data, dataset_report, errors, labels

__all__ = ["data", "dataset_report", "errors", "labels"]
