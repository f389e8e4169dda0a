# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The bundle package's layers: each sub-package imports only from those before it in ``scripts.__all__``,
so the runtime packages never depend on the developer tools."""

from __future__ import annotations

import ast

from conftest import BUNDLE_ROOT

import scripts


def _imported_packages(path) -> set[str]:
    """Sub-packages of ``scripts`` that a module imports (``import scripts.x...`` or ``from scripts.x... import``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(n.split(".")[1] for n in names if n.startswith("scripts.") and n.count(".") >= 1)
    return found


def test_each_package_imports_only_from_the_packages_before_it():
    order = list(scripts.__all__)
    assert order[-1] == "tools"  # the developer tools come last: no runtime package may import them
    upward = []
    for package in order:
        for path in sorted((BUNDLE_ROOT / "scripts" / package).glob("*.py")):
            for imported in _imported_packages(path):
                if order.index(imported) > order.index(package):
                    upward.append(f"{path.relative_to(BUNDLE_ROOT)} imports scripts.{imported}")
    assert not upward, upward
