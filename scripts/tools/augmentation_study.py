# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The downstream augmentation study: does synthetic data improve segmentation?

:class:`AugmentationStudy` (``configs/augmentation_study.yaml``) runs, with one command:

1. **real cases**: the datalist's training split, optionally cut to ``num_real_cases`` (the
   first N or N drawn with a seed: a low-data regime); validation and test stay whole. The
   chosen split is written to ``<output_dir>/datalist.json`` with absolute paths.
2. **synthetic pairs**: ``configs/inference.yaml`` on those training masks only (or on a folder of
   extra label maps without images, ``synthetic_mask_dir``), once per *variant*: ``render``
   (plain re-renderings, several samples per mask) and each named edited layout
   (``scripts.data.masks.MaskEditor`` options, e.g. inserted HCC nodules or an elastic deformation).
   The variants are merged into ``<output_dir>/synthetic/`` (files prefixed with the variant) with
   one ``pairs.json`` that records each pair's source mask and the settings.
3. **the guard**: before any training the synthetic set's ``pairs.json`` must name a source mask
   for every pair and none may be a validation or test mask, by path or, for a source outside the
   real training cases, by content (a renamed copy); otherwise the study stops.
4. **the grid** {networks} x {real only, real + synthetic at each ratio} x {seeds}: each cell is
   ``configs/train_segmentation.yaml`` ``training`` then ``evaluating`` (as subprocesses by
   default) in ``<output_dir>/runs/<network>_<condition>_seed<k>/``.
5. **the report**: ``study.json`` (settings, every run's Dice and wall times, the summary) and
   ``study.md`` (per network, Dice per class, HCC first: real only, real + synthetic and the
   difference; mean ± std over seeds), rewritten atomically after every run.

Everything resumes: a variant or a merged synthetic set already written with the same settings
is reused, a run whose ``test_metrics.json`` exists is skipped, and an interrupted training run
continues from its last checkpoint. Settings that changed under an existing output folder are an
error rather than a silent mix of two experiments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from scripts.core.checkpoints import FolderBusyError, TrainingLock, file_hash
from scripts.core.errors import BundleInputError, find_input_error
from scripts.core.outputs import markdown_table, staged_output, write_text_atomic
from scripts.core.settings import as_bool, layered_config_files
from scripts.data.cases import load_datalist, read_nifti
from scripts.data.labels import LABELS
from scripts.data.masks import mask_editor
from scripts.data.pairs import PAIRS_MANIFEST, ROLES, find_pairs, read_pairs_manifest, write_pairs_manifest
from scripts.generation.mask_sources import find_masks
from scripts.models.segmentation import check_synthetic_sources
from scripts.tools.figures import save_study_figure

__all__ = [
    "RENDER_VARIANT",
    "StudyRunError",
    "select_real_cases",
    "variant_seed",
    "label_fingerprint",
    "check_not_held_out",
    "check_synthetic_set",
    "run_bundle_command",
    "summarise",
    "format_table",
    "estimate_seconds_left",
    "AugmentationStudy",
]

logger = logging.getLogger(__name__)

#: Variant name of the plain re-renderings (no mask editing).
RENDER_VARIANT = "render"
#: Variant names become file-name prefixes: no underscores (``_s{k}`` marks samples of one mask).
_VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
#: Keys the study sets in every child command; a user override of them would break the design.
_STUDY_KEYS = {
    "dataset_dir",
    "datalist",
    "output_dir",
    "network",
    "seed",
    "synthetic_dir",
    "synthetic_ratio",
    "section",
    "mask_dir",
    "num_samples_per_mask",
    "mask_editing",
    "overwrite",
}
_LAUNCHERS = ("subprocess", "in_process")
#: Default name of the synthetic set: its folder, its arms (``synthetic1``) and the report ``study.md``.
DEFAULT_SYNTHETIC_NAME = "synthetic"
#: A set's name prefixes its arms' ratio (``newmasks-hcc3``) and names folders: letters and '-' only.
_SYNTHETIC_NAME = re.compile(r"^[A-Za-z][A-Za-z-]*$")
#: What precedes the ratio in an arm's name (``newmasks-hcc3`` -> ``3``).
_RATIO_OF = re.compile(r"^[A-Za-z-]+")
#: Held in a grid cell's folder while a study process trains or evaluates it (several study
#: processes may share one study folder, e.g. one per network, or one per kind of synthetic pairs).
CELL_LOCK = ".study_cell.lock"
# Real-only Dice below this: the network has not learned the class, and its comparison answers nothing
LEARNED_DICE = 0.05


class StudyRunError(BundleInputError):
    """One or more study runs failed; the message names each with its error line and log file.

    A ``BundleInputError`` so the command ends with that one line: failures of whole runs come
    from settings (patch size, memory, weights) far more often than from bugs.
    """


# ---------------------------------------------------------------------------------------- helpers
def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON/YAML data (dicts, lists, str, numbers, bools, None), else an error."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    raise BundleInputError(
        f"config {what!r}: {value!r} is not a plain value (number, string, list or dict); "
        "expressions are not passed on to the study's commands"
    )


def _same(a: Any, b: Any) -> bool:
    """Equal once both are normalised as JSON (tuples vs lists, int keys vs str keys)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if not _same(old.get(k), new.get(k)))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BundleInputError(
            f"{path}: cannot read it ({type(e).__name__}: {e}); " "remove it to start that part over"
        ) from e


def _generation_seconds(synthetic: Mapping[str, Any]) -> float:
    """Total wall time of synthetic generation (0 when given or unknown)."""
    times = synthetic.get("wall_time_s")
    return float(sum(v for v in times.values() if v is not None)) if isinstance(times, Mapping) else 0.0


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------------------- real cases
def select_real_cases(
    cases: Sequence[Mapping[str, str]], num: int | None, selection: str = "first", seed: int = 0
) -> list[dict[str, str]]:
    """The real training cases of the study: all, the first ``num``, or ``num`` drawn with ``seed``.

    Drawn cases keep their datalist order, so the same seed lists the same cases the same way.
    """
    if selection not in ("first", "random"):
        raise BundleInputError(f"config 'real_case_selection' must be 'first' or 'random', got {selection!r}")
    if num is None:
        return [dict(c) for c in cases]
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise BundleInputError(f"config 'num_real_cases' must be a whole number >= 1 or null (all), got {num!r}")
    num = int(num)
    if num > len(cases):
        raise BundleInputError(f"config 'num_real_cases' is {num} but the datalist has {len(cases)} training cases")
    if selection == "first":
        return [dict(c) for c in cases[:num]]
    picked = sorted(random.Random(int(seed)).sample(range(len(cases)), num))
    return [dict(cases[i]) for i in picked]


def variant_seed(seed: int, variant: str) -> int:
    """Inference seed of one synthetic variant: variants draw different noise for the same mask."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(variant.encode())]).generate_state(1)[0] % 2**31)


# ---------------------------------------------------------------------------------------- the guard
def label_fingerprint(path: str) -> str:
    """SHA-256 of a label map's voxel grid (shape and integer values, read by
    :func:`scripts.data.cases.read_nifti`), whatever its file name, format, data type or header.

    Two files with the same fingerprint hold the same label map voxel for voxel; a copy that was
    resampled or reoriented is not caught (nothing short of registration would).
    """
    grid, _ = read_nifti(path, role="label map")  # one error line for a bad file; X x Y x Z x 1 -> X x Y x Z
    digest = hashlib.sha256(str(grid.shape).encode())
    digest.update(np.ascontiguousarray(np.rint(grid), dtype=np.int32).tobytes())
    return digest.hexdigest()


def check_not_held_out(masks: Sequence[str], held_out: Sequence[Mapping[str, str]], what: str) -> None:
    """Refuse ``masks`` (paths) if one is a validation or test mask, by path or by content.

    The content check catches a held-out mask copied or renamed into a folder of extra masks: its
    label map would reach training through the synthetic pair generated from it. ``what`` says
    where the masks come from; the error line gives it after the mask's path.
    """
    if not masks:
        return  # nothing to compare: the held-out masks are not read
    held_out_paths = {os.path.realpath(item["label"]): item["label"] for item in held_out}
    for mask in masks:
        if os.path.realpath(mask) in held_out_paths:
            raise BundleInputError(
                f"{mask} {what} is a validation or test mask; generate synthetic pairs from other masks only"
            )
    held_out_content = {label_fingerprint(item["label"]): item["label"] for item in held_out}
    for mask in masks:
        same = held_out_content.get(label_fingerprint(mask))
        if same is not None:
            raise BundleInputError(
                f"{mask} {what} holds the same label map as the held-out mask {same} (validation or test "
                "split); training on a pair generated from it would leak that label into the evaluation"
            )


def check_synthetic_set(
    synthetic_dir: str, training: Sequence[Mapping[str, str]], held_out: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """Refuse a synthetic set unless ``pairs.json`` proves every pair comes from a non-held-out mask.

    Stricter than the segmentation config's own check (which takes a folder without a manifest on
    trust): the study needs the manifest and a source mask for every pair. Sources outside the
    study's real training cases (e.g. label maps without images) are allowed and counted once
    their content is checked against every held-out mask (:func:`check_not_held_out`).
    Returns ``{"num_pairs", "num_source_masks", "sources_outside_training", "sha256"}``, the last
    from :func:`synthetic_set_fingerprint`.
    """
    pairs = find_pairs(synthetic_dir)
    manifest = os.path.join(synthetic_dir, PAIRS_MANIFEST)
    if not os.path.isfile(manifest):
        raise BundleInputError(
            f"{synthetic_dir}: no {PAIRS_MANIFEST} recording the source mask of each pair; "
            "the study cannot prove that no validation or test mask reached the synthetic set"
        )
    known = check_synthetic_sources(pairs, held_out, synthetic_dir)  # raises on a held-out source
    if known < len(pairs):
        raise BundleInputError(
            f"{manifest}: {len(pairs) - known} of {len(pairs)} synthetic pairs have no source mask "
            "recorded; the study cannot prove they do not come from validation or test masks"
        )
    records = read_pairs_manifest(synthetic_dir, required=True)["pairs"]
    sources = {os.path.realpath(r["mask"]) for r in records if r.get("mask")}
    outside = sorted(sources - {os.path.realpath(c["label"]) for c in training})
    missing = [m for m in outside if not os.path.isfile(m)]
    if missing:
        raise BundleInputError(
            f"{manifest}: source mask {missing[0]} ({len(missing)} in all) is not among the study's training "
            "cases and not on disk; the study cannot prove it is not a copy of a validation or test mask"
        )
    check_not_held_out(outside, held_out, f"(a source mask recorded in {manifest})")
    if outside:
        logger.info(
            f"{synthetic_dir}: {len(outside)} source masks are not among the study's real training cases "
            f"(e.g. {outside[0]}); checked: none is a validation or test mask"
        )
    return {
        "num_pairs": len(pairs),
        "num_source_masks": len(sources),
        "sources_outside_training": len(outside),
        "sha256": synthetic_set_fingerprint(pairs),
    }


def synthetic_set_fingerprint(pairs: Sequence[Mapping[str, str]]) -> str:
    """SHA-256 over the file names and bytes of every pair (:func:`scripts.data.pairs.find_pairs` order).

    A synthetic run records it, so a run that trained on one set is never reported beside a set
    generated later into the same folder (deleted and regenerated with other settings, or a
    given folder whose files changed).
    """
    listing = "".join(
        f"{os.path.basename(pair[role])}\0{file_hash(pair[role])}\n" for pair in pairs for role in ("image", "label")
    )
    return hashlib.sha256(listing.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- child commands
def _error_line(log_path: str) -> str:
    """The ``ERROR:`` line of a failed command's log, else its last non-empty line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def run_bundle_command(
    role: str, config_files: Sequence[str], log_path: str, bundle_root: str, launcher: str = "subprocess"
) -> float:
    """Run entry point ``role`` of the layered ``config_files``; returns its wall time in seconds.

    ``subprocess``: ``python -m monai.bundle run ROLE --config_file [...]`` in ``bundle_root`` with
    its output in ``log_path`` (a fresh process per command: no state leaks between runs).
    ``in_process``: a ``ConfigWorkflow`` in this process (no import cost; for tests and debugging;
    the working folder must be ``bundle_root``). A failure raises :class:`StudyRunError`.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = time.perf_counter()
    if launcher == "subprocess":
        command = [sys.executable, "-m", "monai.bundle", "run", role, "--config_file", json.dumps(list(config_files))]
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            result = subprocess.run(command, cwd=bundle_root, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise StudyRunError(f"{role} failed (exit {result.returncode}): {_error_line(log_path)} (log: {log_path})")
    elif launcher == "in_process":
        from monai.bundle import ConfigWorkflow

        if os.path.realpath(os.getcwd()) != os.path.realpath(bundle_root):
            raise BundleInputError(f"launcher in_process must run from the bundle root {bundle_root}")
        try:
            workflow = ConfigWorkflow(
                config_file=list(config_files), workflow_type=None, run_id=role, logging_file=False
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as e:
            error = find_input_error(e) or e
            raise StudyRunError(f"{role} failed: {' '.join(str(error).split())}") from e
    else:
        raise BundleInputError(f"config 'launcher' must be one of {list(_LAUNCHERS)}, got {launcher!r}")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- summary
def _run_seconds(run: Mapping[str, Any]) -> float | None:
    wall = run.get("wall_time_s") or {}
    return (
        float(sum(wall.values())) if wall.get("training") is not None and wall.get("evaluating") is not None else None
    )


def estimate_seconds_left(pending: Sequence[Mapping[str, Any]], timed: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds the ``pending`` cells will take: each at the mean wall time of the ``timed`` cells of
    its network (networks differ several-fold in cost), or of all timed cells when its network has
    none yet; None before any cell has a recorded time."""
    seconds = [(r["network"], s) for r in timed if (s := _run_seconds(r)) is not None]
    if not seconds:
        return None
    overall = sum(s for _, s in seconds) / len(seconds)
    by_network: dict[str, list[float]] = {}
    for network, s in seconds:
        by_network.setdefault(network, []).append(s)
    return sum(
        sum(by_network[r["network"]]) / len(by_network[r["network"]]) if r["network"] in by_network else overall
        for r in pending
    )


def _stats(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": round(mean, 6), "std": None if std is None else round(std, 6), "n": n}


def summarise(runs: Sequence[Mapping[str, Any]], conditions: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Per network and class: Dice of each condition over seeds, and each synthetic condition's
    difference to real only, paired by seed (mean and sample std; std needs two seeds).

    ``runs``: finished runs as ``{"network", "condition", "seed", "dice": {class: value|None},
    "mean_dice"}``; a class the test cases lack has ``None`` and is left out. Row ``mean`` is
    the report's mean over classes.
    """
    summary: dict[str, Any] = {}
    baseline = conditions[0]
    for network in dict.fromkeys(r["network"] for r in runs):
        mine = [r for r in runs if r["network"] == network]
        table: dict[str, Any] = {}
        for row in [*classes, "mean"]:
            by_condition: dict[str, dict[int, float]] = {}
            for r in mine:
                value = r["mean_dice"] if row == "mean" else r["dice"].get(row)
                if value is not None:
                    by_condition.setdefault(r["condition"], {})[r["seed"]] = float(value)
            cells = {c: _stats(list(by_condition.get(c, {}).values())) for c in conditions}
            real = by_condition.get(baseline, {})
            difference = {}
            for c in conditions[1:]:
                other = by_condition.get(c, {})
                deltas = [other[s] - real[s] for s in sorted(set(real) & set(other))]
                difference[c] = {**_stats(deltas), "up": sum(d > 0 for d in deltas)}
            table[row] = {"dice": cells, "difference": difference}
        summary[network] = table
    return summary


def verdict(real: Mapping[str, Any], difference: Mapping[str, Any], floor: float = LEARNED_DICE) -> str:
    """Plain-words answer to "does the gain exceed its seed spread?" for one network and condition.

    ``real``: the real-only arm's stats; ``difference``: the paired differences' stats with ``up``
    (seeds where synthetic pairs helped). Beyond the spread: the mean difference is larger than
    the sample std of the differences. A real-only arm below ``floor`` has not learned the class,
    so its comparison says nothing about augmentation.
    """
    n = difference.get("n", 0)
    if not n or real.get("mean") is None:
        return "no paired seeds yet"
    if real["mean"] < floor:
        return f"real only has not learned it (Dice {real['mean']:.3f} < {floor}): no answer"
    seeds = f"up in {difference['up']} of {n} seeds"
    if difference["std"] is None:
        return f"one seed, no spread ({seeds})"
    if difference["mean"] > difference["std"]:
        return f"gain beyond its seed spread ({seeds})"
    if difference["mean"] < -difference["std"]:
        return f"loss beyond its seed spread ({seeds})"
    return f"within its seed spread ({seeds})"


def _cell(stats: Mapping[str, Any], signed: bool = False) -> str:
    if stats["mean"] is None:
        return "n/a"
    mean = round(stats["mean"], 3) + 0.0  # no "-0.000" for a difference that rounds to zero
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {stats['std']:.3f}" if stats["std"] is not None else "")


def format_table(
    table: Mapping[str, Any], conditions: Sequence[str], titles: Mapping[str, str], first_column: str
) -> str:
    """A Markdown table: one row per key of ``table``, Dice per condition then each difference."""
    synthetic = list(conditions[1:])
    header = [first_column, *(titles[c] for c in conditions), *(f"Δ x{_RATIO_OF.sub('', c)}" for c in synthetic)]
    rows = [
        [
            row,
            *(_cell(cells["dice"][c]) for c in conditions),
            *(_cell(cells["difference"][c], signed=True) for c in synthetic),
        ]
        for row, cells in table.items()
    ]
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------- the study
class AugmentationStudy:
    """Real-only vs real + synthetic segmentation training over networks, ratios and seeds.

    Args:
        datalist: MSD datalist of the real data (``training``, ``validation``, ``test``).
        dataset_dir: root its paths are relative to.
        output_dir: the study folder (datalist.json, synthetic/, runs/, study.json, study.md).
        networks: segmentation networks (``--network`` names of ``configs/train_segmentation.yaml``).
        synthetic_ratios: synthetic cases per real training case of each real + synthetic arm (> 0).
        seeds: segmentation seeds; each cell of the grid runs once per seed.
        equal_steps: every arm trains with the real-only arm's optimizer steps per epoch
            (``epoch_length``), so the real + synthetic arms do not simply train longer.
        num_real_cases: real training cases kept (None: all); validation and test stay whole.
        real_case_selection: ``first`` (the datalist's first N) or ``random`` (N drawn with ``seed``).
        seed: seed of the case draw and of synthetic generation.
        synthetic_dir: an existing folder of pairs with ``pairs.json`` to use instead of generating.
        synthetic_name: names this synthetic set: its generated folder ``<output_dir>/<name>``, its arms
            (``<name><ratio>``) and its report (``study_<name>.md``; ``study.md`` for the default
            ``synthetic``). Several sets studied in one folder share the real-only runs.
        synthetic_mask_dir: a folder of label maps without images to generate from instead of the kept
            training masks (new anatomy; e.g. annotations of another modality or generated layouts).
            None of them may be a validation or test mask, by path or by content.
        num_renderings_per_mask: plain re-renderings per source mask (0: none).
        edited_layouts: variant name -> ``scripts.data.masks.MaskEditor`` options; one sample per mask each.
        inference_configs / segmentation_configs: config files of the child commands (overlays allowed),
            layered on configs/common.yaml (``scripts.core.settings.layered_config_files``).
        inference_overrides / segmentation_overrides: settings passed to those commands only.
        network_overrides: network -> segmentation settings for that network's runs only, after
            ``segmentation_overrides`` (networks differ 20-fold in cost per step on a CPU).
        shared_overrides: settings passed to both (e.g. ``spacing``, ``spatial_size``).
        labels / label_map / device: passed to both commands.
        launcher: ``subprocess`` (default) or ``in_process`` (see :func:`run_bundle_command`).
        keep_going: after a failed run, go on with the others (the command still fails at the end).
        bundle_root: the bundle folder (child commands run there).
    """

    def __init__(
        self,
        datalist: str,
        dataset_dir: str,
        output_dir: str,
        networks: Sequence[str] = ("unet", "segresnet", "attention_unet", "dynunet", "vnet"),
        synthetic_ratios: Sequence[float] = (1.0,),
        seeds: Sequence[int] = (0,),
        equal_steps: bool = False,
        num_real_cases: int | None = None,
        real_case_selection: str = "first",
        seed: int = 0,
        synthetic_dir: str | None = None,
        synthetic_name: str = DEFAULT_SYNTHETIC_NAME,
        synthetic_mask_dir: str | None = None,
        num_renderings_per_mask: int = 2,
        edited_layouts: Mapping[str, Mapping[str, Any]] | None = None,
        inference_configs: Sequence[str] = ("configs/inference.yaml",),
        inference_overrides: Mapping[str, Any] | None = None,
        segmentation_configs: Sequence[str] = ("configs/train_segmentation.yaml",),
        segmentation_overrides: Mapping[str, Any] | None = None,
        network_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        shared_overrides: Mapping[str, Any] | None = None,
        labels: Mapping[str, int] | None = None,
        label_map: Mapping[int, int] | None = None,
        device: Any = None,
        launcher: str = "subprocess",
        keep_going: bool = True,
        bundle_root: str = ".",
    ) -> None:
        self.bundle_root = os.path.abspath(bundle_root)
        self.datalist = os.path.abspath(datalist)
        self.dataset_dir = os.path.abspath(dataset_dir)
        self.output_dir = os.path.abspath(output_dir)
        self.networks = [str(n) for n in networks]
        self.synthetic_ratios = [float(r) for r in synthetic_ratios]
        self.seeds = [int(s) for s in seeds]
        self.equal_steps = as_bool(equal_steps, "equal_steps")
        self.num_real_cases = num_real_cases
        self.real_case_selection = real_case_selection
        self.seed = int(seed)
        self.given_synthetic_dir = os.path.abspath(synthetic_dir) if synthetic_dir else None
        self.synthetic_name = str(synthetic_name)
        self.synthetic_mask_dir = os.path.abspath(synthetic_mask_dir) if synthetic_mask_dir else None
        self.num_renderings_per_mask = int(num_renderings_per_mask)
        self.edited_layouts = {str(k): dict(v or {}) for k, v in (edited_layouts or {}).items()}
        self.inference_configs = [self._config_path(c) for c in layered_config_files(*inference_configs)]
        self.segmentation_configs = [self._config_path(c) for c in layered_config_files(*segmentation_configs)]
        self.inference_overrides = self._overrides(inference_overrides, "inference_overrides")
        self.segmentation_overrides = self._overrides(segmentation_overrides, "segmentation_overrides")
        self.network_overrides = {
            str(n): self._overrides(o, f"network_overrides#{n}") for n, o in (network_overrides or {}).items()
        }
        self.shared_overrides = self._overrides(shared_overrides, "shared_overrides")
        self.labels = _plain(dict(labels), "labels") if labels is not None else None
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.device = None if device is None else str(device)
        self.launcher = launcher
        self.keep_going = as_bool(keep_going, "keep_going")
        self._validate()

        # the real data: every section read and checked for presence now, before any work
        self.original = {
            s: load_datalist(self.datalist, self.dataset_dir, s) for s in ("training", "validation", "test")
        }
        self.training = select_real_cases(self.original["training"], num_real_cases, real_case_selection, self.seed)
        if not self.original["validation"] or not self.original["test"]:
            raise BundleInputError(
                f"{self.datalist}: the study needs 'validation' (best epoch) and 'test' (the "
                f"Dice table) cases; found {len(self.original['validation'])} and "
                f"{len(self.original['test'])}"
            )
        self.held_out = self.original["validation"] + self.original["test"]
        # the masks synthetic pairs are generated from, checked now rather than after hours of generation
        if self.synthetic_mask_dir:
            if not os.path.isdir(self.synthetic_mask_dir):
                raise BundleInputError(f"config 'synthetic_mask_dir': {self.synthetic_mask_dir}: folder not found")
            try:
                self.source_masks = [m["label"] for m in find_masks(mask_dir=self.synthetic_mask_dir)]
            except BundleInputError as e:
                raise BundleInputError(f"config 'synthetic_mask_dir': {e}") from e
            check_not_held_out(self.source_masks, self.held_out, "(in config 'synthetic_mask_dir')")
        else:
            self.source_masks = [c["label"] for c in self.training]
        self.conditions = ["real"] + [self.condition_name(r) for r in self.synthetic_ratios]
        self.synthetic_needed = max(
            (int(math.floor(r * len(self.training) + 0.5)) for r in self.synthetic_ratios), default=0
        )
        per_mask = sum(v["num_samples_per_mask"] for v in self.variants().values())
        generating = bool(self.synthetic_ratios) and not self.given_synthetic_dir
        if generating and self.synthetic_needed > len(self.source_masks) * per_mask:
            raise BundleInputError(
                f"config 'synthetic_ratios' up to {max(self.synthetic_ratios):g} x {len(self.training)} real cases "
                f"needs {self.synthetic_needed} synthetic pairs; {len(self.source_masks)} "
                f"{'masks of synthetic_mask_dir' if self.synthetic_mask_dir else 'masks'} x {per_mask} pairs "
                "each (num_renderings_per_mask + one per edited layout) give fewer"
            )

    # ------------------------------------------------------------------ settings
    def _config_path(self, path: str) -> str:
        full = path if os.path.isabs(path) else os.path.join(self.bundle_root, path)
        if not os.path.isfile(full):
            raise BundleInputError(f"{full}: config file not found")
        return os.path.abspath(full)

    @staticmethod
    def _overrides(overrides: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
        plain = _plain(dict(overrides or {}), what)
        taken = sorted(k for k in plain if k.split("#")[0] in _STUDY_KEYS)
        if taken:
            raise BundleInputError(
                f"config {what!r}: {taken} are set by the study itself; use its own settings "
                "(num_real_cases, synthetic_ratios, seeds, networks, output_dir ...)"
            )
        return plain

    def _validate(self) -> None:
        available = set(_load_configs(self.segmentation_configs).get("networks", {}))
        unknown = [n for n in self.networks if n not in available]
        if not self.networks or unknown or len(set(self.networks)) != len(self.networks):
            raise BundleInputError(
                f"config 'networks' must list distinct networks among {sorted(available)}, " f"got {self.networks}"
            )
        strays = sorted(set(self.network_overrides) - available)
        if strays:
            raise BundleInputError(
                f"config 'network_overrides': {strays} are not networks of the segmentation config "
                f"({sorted(available)})"
            )
        if any(not math.isfinite(r) or r <= 0 for r in self.synthetic_ratios) or len(set(self.synthetic_ratios)) != len(
            self.synthetic_ratios
        ):
            raise BundleInputError(
                f"config 'synthetic_ratios' must be distinct numbers > 0 (real only always runs), "
                f"got {self.synthetic_ratios}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BundleInputError(f"config 'seeds' must list distinct seeds, got {self.seeds}")
        if not _SYNTHETIC_NAME.match(self.synthetic_name) or self.synthetic_name == "real":
            raise BundleInputError(
                f"config 'synthetic_name' must be letters and '-', starting with a letter, and not 'real' "
                f"(it names the arms <name><ratio> beside the real-only arm), got {self.synthetic_name!r}"
            )
        if self.num_renderings_per_mask < 0:
            raise BundleInputError(f"config 'num_renderings_per_mask' must be >= 0, got {self.num_renderings_per_mask}")
        bad = [n for n in self.edited_layouts if not _VARIANT_NAME.match(n) or n == RENDER_VARIANT]
        if bad:
            raise BundleInputError(
                f"config 'edited_layouts': names {bad} must be letters, digits and '-' (no '_'), "
                f"starting with a letter, and not {RENDER_VARIANT!r}"
            )
        if self.edited_layouts:
            # options checked now, not after hours of generation
            for name, options in self.edited_layouts.items():
                editor = mask_editor(self.labels or LABELS, options, f"edited_layouts#{name}")
                if editor is None or not editor.enabled:
                    raise BundleInputError(
                        f"config 'edited_layouts#{name}': no editing step enabled; "
                        "that would only repeat the re-renderings"
                    )
        if self.synthetic_ratios and not self.given_synthetic_dir and not self.variants():
            raise BundleInputError(
                "no synthetic pairs to generate: set num_renderings_per_mask > 0 or edited_layouts, "
                "pass synthetic_dir, or set synthetic_ratios to [] for real only"
            )
        if self.given_synthetic_dir and self.synthetic_mask_dir:
            raise BundleInputError(
                "config 'synthetic_dir' (pairs made elsewhere) and 'synthetic_mask_dir' (masks to generate "
                "from) exclude each other; set one"
            )
        if self.launcher not in _LAUNCHERS:
            raise BundleInputError(f"config 'launcher' must be one of {list(_LAUNCHERS)}, got {self.launcher!r}")

    def condition_name(self, ratio: float) -> str:
        return f"{self.synthetic_name}{ratio:g}"

    def condition_title(self, condition: str) -> str:
        if condition == "real":
            return "real only"
        return f"real + {self.synthetic_name} x{condition[len(self.synthetic_name):]}"

    @property
    def report_stem(self) -> str:
        """``<output_dir>/<stem>.json`` and ``.md``: one report per synthetic set studied in the folder."""
        default = self.synthetic_name == DEFAULT_SYNTHETIC_NAME
        return "study" if default else f"study_{self.synthetic_name}"

    def variants(self) -> dict[str, dict[str, Any]]:
        """Variant name -> ``{"mask_editing", "num_samples_per_mask"}``."""
        found = {}
        if self.num_renderings_per_mask:
            found[RENDER_VARIANT] = {"mask_editing": None, "num_samples_per_mask": self.num_renderings_per_mask}
        for name, options in self.edited_layouts.items():
            found[name] = {"mask_editing": options, "num_samples_per_mask": 1}
        return found

    def _child_common(self) -> dict[str, Any]:
        common = {"dataset_dir": self.dataset_dir, "datalist": self.study_datalist}
        if self.labels is not None:
            common["labels"] = self.labels
        if self.label_map:
            common["label_map"] = self.label_map
        if self.device is not None:
            common["device"] = self.device
        return {**common, **self.shared_overrides}

    @property
    def study_datalist(self) -> str:
        return os.path.join(self.output_dir, "datalist.json")

    @property
    def synthetic_dir(self) -> str:
        return self.given_synthetic_dir or os.path.join(self.output_dir, self.synthetic_name)

    def settings(self) -> dict[str, Any]:
        """Every setting of the study, as recorded in study.json."""
        return {
            "datalist": self.datalist,
            "dataset_dir": self.dataset_dir,
            "output_dir": self.output_dir,
            "networks": self.networks,
            "synthetic_ratios": self.synthetic_ratios,
            "seeds": self.seeds,
            "equal_steps": self.equal_steps,
            "num_real_cases": self.num_real_cases,
            "real_case_selection": self.real_case_selection,
            "seed": self.seed,
            "synthetic_dir": self.synthetic_dir,
            "synthetic_given": self.given_synthetic_dir is not None,
            "synthetic_name": self.synthetic_name,
            "synthetic_mask_dir": self.synthetic_mask_dir,
            "num_renderings_per_mask": self.num_renderings_per_mask,
            "edited_layouts": self.edited_layouts,
            "inference_configs": self.inference_configs,
            "inference_overrides": self.inference_overrides,
            "segmentation_configs": self.segmentation_configs,
            "segmentation_overrides": self.segmentation_overrides,
            "network_overrides": self.network_overrides,
            "shared_overrides": self.shared_overrides,
            "labels": self.labels,
            "label_map": self.label_map,
            "device": self.device,
            "launcher": self.launcher,
        }

    # ------------------------------------------------------------------ steps
    def write_datalist(self) -> str:
        """``<output_dir>/datalist.json``: the chosen training cases, validation and test, absolute paths."""
        content = {"training": self.training, "validation": self.original["validation"], "test": self.original["test"]}
        if os.path.isfile(self.study_datalist):
            if not _same(_read_json(self.study_datalist), content):
                raise BundleInputError(
                    f"{self.study_datalist}: this study folder was started with other real cases "
                    "(datalist, num_real_cases or real_case_selection); choose another --output_dir"
                )
            return self.study_datalist
        return write_text_atomic(self.study_datalist, json.dumps(content, indent=1))

    def _synthetic_settings(self) -> dict[str, Any]:
        return {
            "masks": list(self.source_masks),
            "variants": self.variants(),
            "seed": self.seed,
            "inference_configs": self.inference_configs,
            "inference_overrides": self.inference_overrides,
            "shared_overrides": self.shared_overrides,
            "labels": self.labels,
            "label_map": self.label_map,
        }

    def generate_synthetic(self) -> dict[str, Any]:
        """Generate (or reuse) ``<output_dir>/synthetic``; returns what study.json records of it."""
        if self.given_synthetic_dir:
            logger.info(f"using the given synthetic pairs in {self.given_synthetic_dir}")
            return {"dir": self.given_synthetic_dir, "generated": False}
        settings = self._synthetic_settings()
        merged_manifest = os.path.join(self.synthetic_dir, PAIRS_MANIFEST)
        if os.path.isfile(merged_manifest):
            recorded = read_pairs_manifest(self.synthetic_dir, required=True)
            if not _same(recorded.get("settings"), settings):
                raise BundleInputError(
                    f"{merged_manifest}: the synthetic set was generated with other settings "
                    f"({_differences(recorded.get('settings') or {}, settings)}); choose another --output_dir"
                )
            logger.info(f"synthetic pairs already complete in {self.synthetic_dir}: not generated again")
            return {"dir": self.synthetic_dir, "generated": True, "wall_time_s": recorded.get("wall_time_s")}
        parts_root = os.path.join(self.output_dir, f"{self.synthetic_name}_parts")
        wall: dict[str, float] = {}
        variants = self.variants()
        for index, (name, variant) in enumerate(variants.items(), 1):
            part = os.path.join(parts_root, name)
            record_path = part + ".json"
            part_settings = {**settings, "variant": name, **variant, "inference_seed": variant_seed(self.seed, name)}
            if os.path.isfile(record_path) and os.path.isfile(os.path.join(part, PAIRS_MANIFEST)):
                record = _read_json(record_path)
                if _same(record.get("settings"), part_settings):
                    logger.info(f"synthetic variant {name} already complete in {part}")
                    wall[name] = record.get("wall_time_s")
                    continue
            overrides = {
                **self._child_common(),
                "section": "training",
                "output_dir": part,
                "overwrite": True,
                "seed": part_settings["inference_seed"],
                **({"mask_dir": self.synthetic_mask_dir} if self.synthetic_mask_dir else {}),
                "mask_editing": variant["mask_editing"],
                "num_samples_per_mask": variant["num_samples_per_mask"],
                **self.inference_overrides,
            }
            overrides_file = write_text_atomic(part + ".overrides.yaml", yaml.safe_dump(overrides, sort_keys=False))
            logger.info(
                f"synthetic variant {index}/{len(variants)} {name}: {len(self.source_masks)} masks x "
                f"{variant['num_samples_per_mask']} sample(s) into {part} (log: {part}.log)"
            )
            wall[name] = run_bundle_command(
                "inference", [*self.inference_configs, overrides_file], part + ".log", self.bundle_root, self.launcher
            )
            write_text_atomic(record_path, json.dumps({"settings": part_settings, "wall_time_s": wall[name]}, indent=1))
        self._merge(parts_root, settings, wall)
        shutil.rmtree(parts_root, ignore_errors=True)
        return {"dir": self.synthetic_dir, "generated": True, "wall_time_s": wall}

    def _merge(self, parts_root: str, settings: Mapping[str, Any], wall: Mapping[str, float]) -> None:
        """Copy every variant's pairs into one folder as ``<variant>_<name>``, with one manifest."""
        with staged_output(self.synthetic_dir, overwrite=False, kind="set of generated pairs") as staging:
            records = []
            for name in self.variants():
                part = os.path.join(parts_root, name)
                for record in read_pairs_manifest(part, required=True)["pairs"]:
                    merged = {**record, "variant": name}
                    for role in ROLES:
                        merged[role] = f"{name}_{record[role]}"
                        shutil.copy2(os.path.join(part, record[role]), os.path.join(staging, merged[role]))
                    records.append(merged)
            write_pairs_manifest(staging, records, seed=self.seed, settings=settings, wall_time_s=dict(wall))
        logger.info(f"{len(records)} synthetic pairs in {self.synthetic_dir}")

    def grid(self) -> list[dict[str, Any]]:
        """Every run of the study, network by network (its arms side by side), then seed."""
        runs = []
        for network in self.networks:
            for seed in self.seeds:
                for condition, ratio in zip(self.conditions, [0.0, *self.synthetic_ratios], strict=True):
                    name = f"{network}_{condition}_seed{seed}"
                    runs.append(
                        {
                            "name": name,
                            "network": network,
                            "condition": condition,
                            "synthetic_ratio": ratio,
                            "seed": seed,
                            "dir": os.path.join(self.output_dir, "runs", name),
                        }
                    )
        return runs

    def real_only_epoch_length(self, network: str | None = None) -> int:
        """Optimizer steps per epoch of ``network``'s real-only arm: ceil(real training cases / batch_size)."""
        overrides = {**self.segmentation_overrides, **self.network_overrides.get(network, {})}
        batch_size = overrides.get("batch_size", _load_configs(self.segmentation_configs).get("batch_size"))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BundleInputError(
                f"config 'equal_steps' needs an integer segmentation batch_size >= 1, got {batch_size!r}"
            )
        return math.ceil(len(self.training) / batch_size)

    def run_overrides(self, run: Mapping[str, Any]) -> dict[str, Any]:
        synthetic = run["synthetic_ratio"] > 0
        steps = {"epoch_length": self.real_only_epoch_length(run["network"])} if self.equal_steps else {}
        return {
            **self._child_common(),
            "output_dir": run["dir"],
            "network": run["network"],
            "seed": run["seed"],
            "synthetic_dir": self.synthetic_dir if synthetic else None,
            "synthetic_ratio": run["synthetic_ratio"],
            **steps,
            **self.segmentation_overrides,
            **self.network_overrides.get(run["network"], {}),
        }

    def check_run_settings(self, run: Mapping[str, Any]) -> dict[str, Any]:
        """The run's record from an earlier invocation ({} if none); other settings are an error."""
        record_path = os.path.join(run["dir"], "run.json")
        record = _read_json(record_path) if os.path.isfile(record_path) else {}
        overrides = self.run_overrides(run)
        if record and not _same(record.get("overrides"), overrides):
            raise BundleInputError(
                f"{run['dir']}: this run was started with other settings "
                f"({_differences(record.get('overrides') or {}, overrides)}); "
                "choose another --output_dir or remove that folder"
            )
        recipe = record.get("recipe_sha256")
        if recipe is not None and recipe != self.recipe_sha256:  # a config's defaults changed under the study
            raise BundleInputError(
                f"{run['dir']}: this run was trained with other segmentation configs ({', '.join(self.segmentation_configs)} "
                "changed since); choose another --output_dir or remove that folder"
            )
        return record

    @property
    def recipe_sha256(self) -> str:
        """sha256 of the merged segmentation configs (comments aside): what the overrides leave to their defaults."""
        content = json.dumps(_load_configs(self.segmentation_configs), sort_keys=True, default=str)
        return hashlib.sha256(content.encode()).hexdigest()

    def check_synthetic_identity(self, run: dict[str, Any], sha256: str) -> None:
        """Tie a synthetic run to the set it trains on: a run started on another set is an error.

        Sets ``run["synthetic_sha256"]`` (recorded in run.json). Runs recorded before the field
        existed cannot be checked: they are kept, with a warning, and stay unrecorded.
        """
        record_path = os.path.join(run["dir"], "run.json")
        record = _read_json(record_path) if os.path.isfile(record_path) else {"synthetic_sha256": sha256}
        recorded = record.get("synthetic_sha256")
        if recorded is None:
            logger.warning(
                f"{record_path}: no record of the synthetic set this run trained on; "
                f"it is assumed to be the one now in {self.synthetic_dir}"
            )
        elif recorded != sha256:
            raise BundleInputError(
                f"{run['dir']}: this run trained on another synthetic set than the one now in {self.synthetic_dir} "
                f"(sha256 {recorded[:12]}... recorded, {sha256[:12]}... now); "
                "choose another --output_dir or remove that folder"
            )
        run["synthetic_sha256"] = recorded

    @staticmethod
    def metrics_path(run: Mapping[str, Any]) -> str:
        """The cell's test report: present once the cell is finished."""
        return os.path.join(run["dir"], f"segmentation_{run['network']}", "test_metrics.json")

    def execute(self, run: dict[str, Any]) -> dict[str, Any]:
        """Train and evaluate one cell of the grid unless already done; returns its record.

        While it trains, the cell's folder holds :data:`CELL_LOCK`, so several study processes can
        share one study folder (say one per network): a cell another live process is running is
        passed over with status ``running elsewhere`` instead of being trained twice at once.
        """
        if os.path.isfile(self.metrics_path(run)):
            return self._train_and_evaluate(run)  # only reads the finished cell's report
        try:
            lock = TrainingLock(run["dir"], CELL_LOCK, "another study process (process {pid}) is running this cell now")
        except FolderBusyError as e:
            logger.warning(f"run {run['name']}: {e}; passed over")
            return {"status": "running elsewhere", "skipped": True}
        try:
            return self._train_and_evaluate(run)  # checks the report again: the cell may have finished meanwhile
        finally:
            lock.release()

    def _train_and_evaluate(self, run: dict[str, Any]) -> dict[str, Any]:
        folder = run["dir"]
        metrics_path = self.metrics_path(run)
        record_path = os.path.join(folder, "run.json")
        overrides = self.run_overrides(run)
        record = self.check_run_settings(run)
        record = {**record, **{k: v for k, v in run.items() if k != "dir"}, "dir": folder, "overrides": overrides}
        if not os.path.isfile(metrics_path):  # the recipe it trains with (a finished run keeps what it recorded)
            record["recipe_sha256"] = self.recipe_sha256
        wall = dict(record.get("wall_time_s") or {})
        if os.path.isfile(metrics_path):
            record["skipped"] = True
        else:
            record["skipped"] = False
            overrides_file = os.path.join(folder, "overrides.yaml")
            write_text_atomic(overrides_file, yaml.safe_dump(overrides, sort_keys=False))
            write_text_atomic(record_path, json.dumps(record, indent=1))
            configs = [*self.segmentation_configs, overrides_file]
            for role in ("training", "evaluating"):
                if role == "training" and record.get("trained"):
                    continue  # evaluating failed or was cut off last time; the checkpoint is complete
                wall[role] = run_bundle_command(
                    role, configs, os.path.join(folder, f"{role}.log"), self.bundle_root, self.launcher
                )
                record["trained"] = record.get("trained") or role == "training"
                record["wall_time_s"] = wall
                write_text_atomic(record_path, json.dumps(record, indent=1))
        report = _read_json(metrics_path)
        record.update(
            {
                "status": "done",
                "metrics_path": metrics_path,
                "dice": report["dice"],
                "mean_dice": report["mean_dice"],
                "num_test_cases": report.get("num_cases"),
                "checkpoint_epoch": report.get("checkpoint_epoch"),
                "num_real_training_cases": report.get("num_real_training_cases"),
                "num_synthetic_training_cases": report.get("num_synthetic_training_cases"),
                "wall_time_s": wall,
            }
        )
        write_text_atomic(record_path, json.dumps(record, indent=1))
        return record

    def progress_line(self, runs: Sequence[Mapping[str, Any]], index: int) -> str:
        """How the cell ``runs[index - 1]`` went, and what is left: cells still to train and the time
        they will take at the recorded times of finished cells (this and earlier invocations)."""
        run = runs[index - 1]
        took = _run_seconds(run)
        status = run.get("status", "pending") if took is None else f"finished in {_minutes(took)}"
        pending = [r for r in runs[index:] if not os.path.isfile(self.metrics_path(r))]
        timed = []
        for other in runs:
            record_path = os.path.join(other["dir"], "run.json")
            if other.get("wall_time_s"):
                timed.append(other)
            elif os.path.isfile(record_path) and os.path.isfile(self.metrics_path(other)):
                timed.append({"network": other["network"], **_read_json(record_path)})
        left = estimate_seconds_left(pending, timed)
        estimate = f", about {_minutes(left)} left" if left is not None and pending else ""
        return f"{status}; {len(pending)} runs to go{estimate}"

    # ------------------------------------------------------------------ report
    def write_report(self, runs: Sequence[Mapping[str, Any]], synthetic: Mapping[str, Any], started: float) -> str:
        """``study.json`` and ``study.md`` from the runs so far (atomically); returns study.md's path."""
        done = [r for r in runs if r.get("status") == "done"]
        classes = list(done[0]["dice"]) if done else []
        summary = summarise(done, self.conditions, classes)
        study = {
            "settings": self.settings(),
            "real_cases": {
                "training": [c["label"] for c in self.training],
                "num_validation": len(self.original["validation"]),
                "num_test": len(self.original["test"]),
            },
            "synthetic": dict(synthetic),
            "conditions": {c: self.condition_title(c) for c in self.conditions},
            "classes": classes,
            "runs": [{k: v for k, v in r.items() if k != "overrides"} for r in runs],
            "summary": summary,
            "verdicts": self.verdicts(summary, classes[0]) if classes else {},
            "wall_time_s": {
                "this_invocation": round(time.perf_counter() - started, 1),
                "synthetic_generation": round(_generation_seconds(synthetic), 1),
                "runs": round(sum(v for r in runs for v in (r.get("wall_time_s") or {}).values()), 1),
            },
        }
        stem = os.path.join(self.output_dir, self.report_stem)
        write_text_atomic(stem + ".json", json.dumps(study, indent=1))
        write_text_atomic(stem + ".md", self.markdown(runs, summary, classes, synthetic))
        if done:
            save_study_figure({f"real only vs real + {self.synthetic_name}": study}, stem + ".png")
        return stem + ".md"

    def verdicts(self, summary: Mapping[str, Any], first: str) -> dict[str, dict[str, str]]:
        """Network -> synthetic condition -> :func:`verdict` for the first reported class."""
        return {
            network: {
                c: verdict(table[first]["dice"][self.conditions[0]], table[first]["difference"][c])
                for c in self.conditions[1:]
            }
            for network, table in summary.items()
            if first in table
        }

    def markdown(
        self,
        runs: Sequence[Mapping[str, Any]],
        summary: Mapping[str, Any],
        classes: Sequence[str],
        synthetic: Mapping[str, Any],
    ) -> str:
        titles = {c: self.condition_title(c) for c in self.conditions}
        selection = "all" if self.num_real_cases is None else f"{self.real_case_selection} {self.num_real_cases}"
        variants = ", ".join(
            f"{k} x{v['num_samples_per_mask']}" + (f" {v['mask_editing']}" if v["mask_editing"] else "")
            for k, v in self.variants().items()
        )
        if self.given_synthetic_dir:
            source = f"given folder {self.synthetic_dir}"
        elif self.synthetic_mask_dir:
            source = (
                f"generated from the {len(self.source_masks)} label maps without images in {self.synthetic_mask_dir} "
                f"({variants}) into {self.synthetic_dir}"
            )
        else:
            source = (
                f"generated from the {len(self.training)} training masks only ({variants}) into {self.synthetic_dir}"
            )
        lines = [
            f"# Augmentation study: real only vs real + {self.synthetic_name}",
            "",
            f"- Real data: {self.datalist}; {len(self.training)} training cases ({selection}), "
            f"{len(self.original['validation'])} validation (best epoch), "
            f"{len(self.original['test'])} test (this table).",
            f"- Synthetic pairs: {source}.",
            f"- Seeds: {self.seeds}. Segmentation overrides: {self.segmentation_overrides or 'none'}"
            + "".join(f"; {n}: {o}" for n, o in self.network_overrides.items())
            + "; "
            f"shared: {self.shared_overrides or 'none'}.",
            "- Dice on the real test cases (a class absent from every test case: n/a); mean ± sample std over seeds "
            "where there are several; Δ = real + synthetic − real only, paired by seed.",
            "",
        ]
        if summary and classes:
            first = classes[0]
            verdicts = self.verdicts(summary, first)
            lines += [
                f"## {first} Dice by network",
                "",
                format_table({n: t[first] for n, t in summary.items()}, self.conditions, titles, "network"),
                "",
                f"![{first} Dice per network and seed]({self.report_stem}.png)",
                "",
                f"Does the {first} gain exceed its seed spread?",
                "",
                *(
                    f"- {network}: "
                    + "; ".join(f"x{_RATIO_OF.sub('', c)} {text}" for c, text in verdicts[network].items())
                    for network in verdicts
                ),
                "",
            ]
        for network, table in summary.items():
            lines += [f"## {network}", "", format_table(table, self.conditions, titles, "class"), ""]
        rows = []
        for r in runs:
            wall = r.get("wall_time_s") or {}
            cases = (
                f"{r['num_real_training_cases']} / {r['num_synthetic_training_cases']}"
                if r.get("status") == "done"
                else ""
            )
            status = r.get("status", "pending") + (" (" + r["error"] + ")" if r.get("error") else "")
            rows.append([r["name"], status, cases, _minutes(wall.get("training")), _minutes(wall.get("evaluating"))])
        lines += [
            "## Runs",
            "",
            markdown_table(["run", "status", "real / synthetic cases", "training", "evaluating"], rows),
        ]
        generation = synthetic.get("wall_time_s")
        if isinstance(generation, Mapping) and generation:
            lines += [
                "",
                f"Synthetic generation: {_minutes(_generation_seconds(synthetic))} ("
                + ", ".join(f"{k} {_minutes(v)}" for k, v in generation.items())
                + ").",
            ]
        run_seconds = sum(v for r in runs for v in (r.get("wall_time_s") or {}).values())
        finished = sum(r.get("status") == "done" for r in runs)
        lines += ["", f"Training and evaluation: {_minutes(run_seconds)} over {finished} finished runs of {len(runs)}."]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ the whole study
    def run(self) -> str:
        """Run every step (resuming finished ones); returns the path of study.md."""
        started = time.perf_counter()
        os.makedirs(self.output_dir, exist_ok=True)
        self.write_datalist()
        runs = self.grid()
        for run in runs:  # a changed setting stops the command before hours of generation
            self.check_run_settings(run)
        synthetic: dict[str, Any] = {}
        if self.synthetic_ratios:
            synthetic = self.generate_synthetic()
            synthetic.update(check_synthetic_set(self.synthetic_dir, self.training, self.held_out))
            logger.info(
                f"synthetic set checked: {synthetic['num_pairs']} pairs from {synthetic['num_source_masks']} "
                "masks, none of them a validation or test mask"
            )
            if synthetic["num_pairs"] < self.synthetic_needed:
                raise BundleInputError(
                    f"{self.synthetic_dir}: {synthetic['num_pairs']} synthetic pairs, the largest "
                    f"ratio needs {self.synthetic_needed}"
                )
            for run in runs:  # before any training: no run is reported beside a set it did not train on
                if run["synthetic_ratio"] > 0:
                    self.check_synthetic_identity(run, synthetic["sha256"])
        failed = []
        progress = tqdm(runs, desc="study runs", unit="run")
        for index, run in enumerate(progress, 1):
            progress.set_postfix_str(run["name"])
            logger.info(f"run {index}/{len(runs)} {run['name']} in {run['dir']}")
            try:
                run.update(self.execute(run))
                if run["skipped"] and run["status"] == "done":
                    logger.info(f"run {run['name']}: already finished, skipped")
                else:
                    logger.info(f"run {index}/{len(runs)} {run['name']}: {self.progress_line(runs, index)}")
            except StudyRunError as e:
                run.update({"status": "failed", "error": str(e)})
                failed.append(run)
                logger.error(f"run {run['name']}: {e}")
                if not self.keep_going:
                    self.write_report(runs, synthetic, started)
                    raise
            self.write_report(runs, synthetic, started)
        path = self.write_report(runs, synthetic, started)
        elsewhere = [r["name"] for r in runs if r.get("status") == "running elsewhere"]
        if elsewhere:
            logger.warning(
                f"{len(elsewhere)} runs are being run by another study process ({', '.join(elsewhere)}); "
                f"{path} leaves them out: run the command again once that process has ended"
            )
        if failed:
            raise StudyRunError(
                f"{len(failed)} of {len(runs)} study runs failed: "
                + "; ".join(f"{r['name']}: {r['error']}" for r in failed)
                + f"; finished runs are in {path}; re-run the command to retry the failed ones"
            )
        logger.info(f"study written to {path}")
        return path


#: Default labels for checking mask-editing options when none are given (configs/common.yaml's).


def _load_configs(files: Sequence[str]) -> dict[str, Any]:
    """The raw (unparsed) merged content of layered config files."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(list(files))
