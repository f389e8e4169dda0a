# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""What every benchmark suite shares: options, the machine record, timers, config parsing, seeded
weights, atomic result files and Markdown tables.

Every suite builds the bundle's own components from its configs (``monai.bundle.ConfigParser``
on ``configs/*.yaml``, ``configs/hires.yaml`` layered last for the paper-scale grid), so what is
timed is what users run. Configs name each other by paths relative to the bundle root: the
benchmarks run with the bundle root as working directory (:func:`in_bundle_root`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(BUNDLE_ROOT))

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from scripts.core import outputs  # noqa: E402
from scripts.core.settings import layered_config_files  # noqa: E402

__all__ = [
    "BUNDLE_ROOT",
    "MODELS",
    "DEMO_MASKS",
    "RANDOM_WEIGHTS_NOTE",
    "BenchOptions",
    "in_bundle_root",
    "environment",
    "sync",
    "Stopwatch",
    "torch_threads",
    "parse_configs",
    "config_files",
    "grid_overrides",
    "seeded_network",
    "write_seeded_checkpoint",
    "trained_weights",
    "peak_rss_bytes",
    "current_rss_bytes",
    "reset_peak_rss",
    "jsonable",
    "write_json_atomic",
    "write_text_atomic",
    "markdown_table",
    "fmt",
]

MODELS = BUNDLE_ROOT / "models"
DEMO_MASKS = BUNDLE_ROOT / "datasets" / "demo_masks"
#: Seeded random weights stand in for missing trained ones: speed does not depend on weight values.
RANDOM_WEIGHTS_NOTE = "seeded random weights: speed does not depend on the weight values"


@dataclass
class BenchOptions:
    """Settings shared by all suites (``run_all.py`` fills them from the command line).

    Attributes:
        quick: fewer steps, cases and repeats; figures that are not run in full are extrapolated
            and flagged ``"extrapolated": true``.
        device: where the networks run.
        threads: torch intra-op threads (None: torch's default, one per core).
        work_dir: scratch folder for weights, caches and outputs of this run.
        demo_spatial_size: overrides the demo model grid size (tests use a tiny grid).
        demo_spacing: overrides the demo model grid spacing (mm).
        hires: include the paper-scale grid of ``configs/hires.yaml``.
        dataset_dir: dataset (MSD datalist ``datalist.json``) for the training suite.
        max_cases: at most this many training cases (validation: a quarter, at least one).
        num_masks: demo masks sampled per setting (None: the mode's default).
        weights_dir: folder of trained demo-grid weights (``autoencoder.pt``, ``diffusion_unet.pt``,
            ``controlnet.pt``); models/ by default.
        decode_latent_sizes: latent sizes of the decode suite (None: the mode's default).
        cuda_experimental: also time channels-last-3d and ``torch.compile`` (CUDA only; untested).
        progress: show progress bars.
    """

    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int | None = None
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    demo_spatial_size: Sequence[int] | None = None
    demo_spacing: Sequence[float] | None = None
    hires: bool = True
    dataset_dir: Path = BUNDLE_ROOT / "datasets" / "phantom"
    max_cases: int | None = None
    num_masks: int | None = None
    weights_dir: Path = MODELS
    decode_latent_sizes: Sequence[Sequence[int]] | None = None
    cuda_experimental: bool = False
    progress: bool = True

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


@contextlib.contextmanager
def in_bundle_root() -> Iterator[None]:
    """Work in the bundle root (configs refer to ``configs/common.yaml`` relative to it)."""
    previous = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        yield
    finally:
        os.chdir(previous)


# ---------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(options: BenchOptions | None = None) -> dict[str, Any]:
    """Hardware, versions and date of a run, plus the load average (other jobs slow the numbers)."""
    import monai

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    memory_bytes = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            memory_bytes = int(f.readline().split()[1]) * 1024
    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": memory_bytes,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": str(options.device) if options is not None else ("cuda" if cuda else "cpu"),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a timer reads the work and not only its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds`` (``time.perf_counter``, CUDA synchronised)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave as is), restoring the previous setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` entry of ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (``VmRSS``; None off Linux)."""
    return _proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current value (Linux ``clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``VmHWM``), else ``getrusage``'s ``ru_maxrss``.

    ``ru_maxrss`` alone misleads in a child process: Linux starts it at the peak of the process
    that spawned it (the parent's memory map is what ``exec`` replaces), so a decode in a fresh
    worker of a large parent shows no rise at all. ``VmHWM`` belongs to the worker's own memory
    map and :func:`reset_peak_rss` can reset it.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---------------------------------------------------------------------- configs and weights
def grid_overrides(options: BenchOptions, grid: str) -> dict[str, Any]:
    """Config overrides of a grid: the demo grid may be shrunk (tests); ``hires`` is configs/hires.yaml as is."""
    if grid != "demo":
        return {}
    overrides: dict[str, Any] = {}
    if options.demo_spatial_size is not None:
        overrides["spatial_size"] = [int(s) for s in options.demo_spatial_size]
    if options.demo_spacing is not None:
        overrides["spacing"] = [float(s) for s in options.demo_spacing]
    return overrides


def parse_configs(files: Sequence[str], overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The bundle configs ``files`` layered on configs/common.yaml, with ``overrides`` set; call inside :func:`in_bundle_root`."""
    parser = ConfigParser()
    parser.read_config(layered_config_files(*[str(f) for f in files]))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def config_files(base: str, grid: str) -> list[str]:
    """``[base]`` for the demo grid, ``[base, configs/hires.yaml]`` for the paper-scale grid."""
    return [base] if grid == "demo" else [base, "configs/hires.yaml"]


def seeded_network(parser: ConfigParser, definition: str, seed: int) -> torch.nn.Module:
    """A fresh instance of a config's network definition, its random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return parser.get_parsed_content(definition, instantiate=True, lazy=False)


def write_seeded_checkpoint(
    parser: ConfigParser, definition: str, key: str, path: Path, seed: int, **extra: Any
) -> Path:
    """Save ``{key: state_dict, **extra}`` of a seeded random ``definition`` as the training configs save it."""
    network = seeded_network(parser, definition, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: network.state_dict(), **extra}, path)
    return path


def trained_weights(folder: Path = MODELS) -> dict[str, Path] | None:
    """Trained demo-grid weights (autoencoder, diffusion UNet, ControlNet) when all three are in ``folder``.

    ``folder`` is models/ (the shipped demo weights) unless ``--weights-dir`` names another. The
    label-guided decoders beside them, ``refining_autoencoder.pt`` (what the main job decodes with) and
    ``label_guided_autoencoder.pt`` (the same on the model grid), are added under their names, and a
    ``diffusion_unet_guide.pt`` (the main job's autoguidance UNet) under ``diffusion_unet_guide``.
    """
    paths = {name: Path(folder) / f"{name}.pt" for name in ("autoencoder", "diffusion_unet", "controlnet")}
    if not all(p.is_file() for p in paths.values()):
        return None
    for optional in ("refining_autoencoder", "label_guided_autoencoder", "diffusion_unet_guide"):
        if (Path(folder) / f"{optional}.pt").is_file():
            paths[optional] = Path(folder) / f"{optional}.pt"
    return paths


# ---------------------------------------------------------------------- result files
def jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars as numbers, paths as strings, inf/NaN as None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling file, then rename it over ``path`` (never half-written)."""
    from scripts.core.outputs import write_text_atomic as write

    return Path(write(str(path), text))


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    """:func:`jsonable` ``payload`` as indented JSON at ``path``, written atomically."""
    return write_text_atomic(path, json.dumps(jsonable(payload), indent=4, allow_nan=False) + "\n")


# ---------------------------------------------------------------------- Markdown
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for missing values, floats to ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table of :func:`fmt` cells (the bundle's one table writer)."""
    return outputs.markdown_table(headers, [[fmt(c) for c in row] for row in rows])
