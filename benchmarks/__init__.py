# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Performance benchmarks of the bundle: sampling, VAE decode, training and end-to-end inference.

Run ``python benchmarks/run_all.py --quick`` (a few minutes on a 2-core CPU) or without ``--quick``
for the full run; each suite writes ``benchmarks/results/<suite>.json`` and all of them a
``summary.md``.
"""
