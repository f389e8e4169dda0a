# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Python package of the 3D-LLDM bundle, imported from configs as ``scripts.<package>.<module>``.

Packages in dependency order (each imports only from those before it): core, data, networks,
models, generation, evaluation, then the developer tools (phantoms, study, figures, release,
demo weights), which the runtime packages never import.
"""

from . import core, data, networks, models, generation, evaluation, tools  # isort: skip (dependency order)

__all__ = ["core", "data", "networks", "models", "generation", "evaluation", "tools"]
