# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The latent cache: every case encoded ONCE by the frozen stage-1 autoencoder, for stages 2 and 3.

Diffusion training touches each case hundreds of times; encoding it each time would cost an
autoencoder pass per step for a result that never changes (the encoder is frozen and the latent
MEAN is stored, never a sample). So the first run of stage 2 or 3 preprocesses every training and
validation case with the bundle's ``pair_preprocessing``, encodes it and writes, per case, one
``torch.save`` file (loadable with ``weights_only=True``) holding

* ``latent``: the latent mean, float32, ``(latent_channels, *spatial_size / compression)``;
* ``label``: the preprocessed label map at IMAGE resolution, uint8, ``(1, *spatial_size)`` (the
  ControlNet conditioning needs the full-resolution map: thin vessels vanish at latent size);
* ``affine``: the model-grid affine of the case, float64 4x4.

``manifest.json`` lists the cases, the cache fingerprint and ``scale_factor`` = 1 / std of all
training latents (computed once here, so every later run scales latents identically). The
fingerprint is a SHA-256 over the identity of the encoder side of the autoencoder
(``scripts.models.autoencoder.latent_space_sha256``: the weights, so a re-exported copy of the same
weights, or a fine-tuned decoder, does not count as a change), the preprocessing settings and the case files (path, size,
modification time): the cache is reused while it matches and rebuilt when it does not, in a
staging folder published only when complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform
from tqdm import tqdm

from scripts.core.errors import BundleInputError
from scripts.core.outputs import staged_output
from scripts.data.labels import class_intensity_sums
from scripts.data.latent_space import LatentScaling

__all__ = [
    "CACHE_FORMAT",
    "LatentCache",
    "cache_fingerprint",
    "prepare_latent_cache",
    "latent_channel_std",
    "LoadLatentCased",
]

logger = logging.getLogger(__name__)

#: Version of the cache layout; part of the fingerprint, so a layout change rebuilds old caches.
CACHE_FORMAT = 2  # 2: the manifest also holds latent_channel_mean
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LatentCache:
    """A complete cache folder as described by its manifest.

    Attributes:
        root: the cache folder.
        manifest: the parsed ``manifest.json``.
        built: whether this command encoded the cases (``False``: an existing cache was reused).
    """

    root: str
    manifest: dict[str, Any]
    built: bool = False

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def scale_factor(self) -> float:
        """1 / std of all cached training latents: scaled training latents have unit standard deviation."""
        return float(self.manifest["scale_factor"])

    @property
    def latent_channel_mean(self) -> list[float]:
        """Mean of each latent channel over the cached training latents (unscaled): the ``latent_shift``
        that centres them."""
        return [float(v) for v in self.manifest["latent_channel_mean"]]

    @property
    def latent_space_sha256(self) -> str:
        return str(self.manifest["latent_space_sha256"])

    def items(self, section: str) -> list[dict[str, Any]]:
        """Dataset items of one section: source paths, ``cache_file`` (absolute) and ``seed`` (the case index)."""
        cases = self.manifest["sections"].get(section, [])
        return [
            {
                "image": case["image"],
                "label": case["label"],
                "cache_file": os.path.join(self.root, case["file"]),
                "seed": i,
            }
            for i, case in enumerate(cases)
        ]

    def class_intensity_sums(self, section: str) -> tuple[list[float], list[int]]:
        """Per-class sums of real preprocessed image intensities and voxel counts over a section.

        A reference for the mask-fidelity metrics of generated images (see ``scripts.evaluation.mask_fidelity``).
        """
        cases = self.manifest["sections"].get(section, [])
        sums = np.sum([c["class_sums"] for c in cases], axis=0) if cases else np.zeros(0)
        counts = np.sum([c["class_counts"] for c in cases], axis=0) if cases else np.zeros(0)
        return [float(s) for s in sums], [int(c) for c in counts]


def cache_fingerprint(
    latent_space_sha256: str, settings: Mapping[str, Any], sections: Mapping[str, Sequence[Mapping[str, str]]]
) -> str:
    """SHA-256 over everything that determines the cached content.

    ``settings`` holds the preprocessing and tiling settings (spacing, spatial size, percentiles,
    labels, label map, window); case files enter with path, size and modification time, so an
    edited or replaced file rebuilds the cache too.
    """
    cases = {
        section: [[_file_key(item[key]) for key in ("image", "label")] for item in items]
        for section, items in sorted(sections.items())
    }
    payload = {"format": CACHE_FORMAT, "latent_space_sha256": latent_space_sha256, "settings": settings, "cases": cases}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=_jsonable).encode()).hexdigest()


def prepare_latent_cache(
    cache_dir: str,
    encoder: Any,
    latent_space_sha256: str,
    preprocessing: Any,
    sections: Mapping[str, Sequence[Mapping[str, str]]],
    settings: Mapping[str, Any],
    num_classes: int,
    autoencoder_path: str = "",
    is_main_process: bool = True,
    progress: bool = True,
) -> LatentCache:
    """Reuse the cache in ``cache_dir`` when its fingerprint matches, otherwise (re)build it.

    Args:
        cache_dir: the cache folder; replaced as a whole when rebuilt.
        encoder: frozen autoencoder wrapper whose ``encode(image)`` returns the latent MEAN
            (``scripts.networks.tiled_autoencoder.TiledAutoencoder``), weights already loaded.
        latent_space_sha256: identity of the encoder side of those weights (``scripts.models.autoencoder.latent_space_sha256``).
        preprocessing: dictionary transform bringing ``{"image", "label"}`` paths onto the model grid.
        sections: section name -> datalist items (``training`` is required: it sets ``scale_factor``).
        settings: preprocessing and tiling settings that change the cached content.
        num_classes: label classes, for the per-class intensity statistics.
        autoencoder_path: the weights file, recorded in the manifest for people reading it.
        is_main_process: in distributed training only the main process builds; the others wait for it.
        progress: show a progress bar while encoding.
    """
    if not sections.get("training"):
        raise BundleInputError(f"{cache_dir}: no training cases to cache")
    fingerprint = cache_fingerprint(latent_space_sha256, settings, sections)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    cache = None
    if is_main_process:
        cache = _reuse(cache_dir, fingerprint)
        if cache is None:
            cache = _build(
                cache_dir,
                fingerprint,
                encoder,
                autoencoder_path,
                latent_space_sha256,
                preprocessing,
                sections,
                settings,
                num_classes,
                progress,
            )
    if distributed:
        torch.distributed.barrier()  # the other processes wait here while the main one encodes
    if cache is None:
        cache = _reuse(cache_dir, fingerprint)
        if cache is None:
            raise RuntimeError(f"{cache_dir}: the main process did not leave a cache with fingerprint {fingerprint}")
    return cache


def _reuse(cache_dir: str, fingerprint: str) -> LatentCache | None:
    manifest_path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # a damaged manifest is just a stale cache: rebuild it
    if manifest.get("fingerprint") != fingerprint:
        logger.info(f"latent cache {cache_dir} was built from other weights, settings or cases: rebuilding it")
        return None
    logger.info(f"latent cache: reusing {cache_dir} (fingerprint {fingerprint[:12]})")
    return LatentCache(root=os.path.abspath(cache_dir), manifest=manifest, built=False)


def _build(
    cache_dir: str,
    fingerprint: str,
    encoder: Any,
    autoencoder_path: str,
    latent_space_sha256: str,
    preprocessing: Any,
    sections: Mapping[str, Sequence[Mapping[str, str]]],
    settings: Mapping[str, Any],
    num_classes: int,
    progress: bool,
) -> LatentCache:
    # a stale cache is replaced by itself, but only a latent cache holding nothing else, never a folder
    # that holds the cases it encodes (a dataset, an inference output) or anything the user put there
    inputs = [path for items in sections.values() for item in items for path in item.values() if isinstance(path, str)]
    with staged_output(cache_dir, overwrite=True, inputs=inputs, kind="latent cache") as staging:
        # float64 running sums: one pass, no need to hold every latent for the standard deviation
        count, total, total_sq = 0, 0.0, 0.0
        channel_sums: torch.Tensor | None = None  # per latent channel, for latent_channel_mean
        manifest_sections: dict[str, list[dict[str, Any]]] = {}
        latent_shape: list[int] = []
        num_cases = sum(len(items) for items in sections.values())
        with tqdm(total=num_cases, desc=f"encoding latents into {cache_dir}", unit="case", disable=not progress) as bar:
            for section, items in sections.items():
                os.makedirs(os.path.join(staging, section), exist_ok=True)
                manifest_sections[section] = []
                for i, item in enumerate(items):
                    case, sums, counts = _encode_case(item, preprocessing, encoder, num_classes)
                    if section == "training":
                        values = case["latent"].double()
                        count += values.numel()
                        total += float(values.sum())
                        total_sq += float((values**2).sum())
                        sums_here = values.flatten(1).sum(dim=1)
                        channel_sums = sums_here if channel_sums is None else channel_sums + sums_here
                    latent_shape = list(case["latent"].shape)
                    name = f"{i:04d}_{_stem(item['image'])}.pt"
                    torch.save(case, os.path.join(staging, section, name))
                    manifest_sections[section].append(
                        {
                            "image": item["image"],
                            "label": item["label"],
                            "file": f"{section}/{name}",
                            "class_sums": sums,
                            "class_counts": counts,
                        }
                    )
                    bar.update(1)
        mean = total / count
        std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
        if not std > 0:
            raise BundleInputError(
                f"{autoencoder_path or cache_dir}: every training latent is constant; the autoencoder is not usable"
            )
        manifest = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "autoencoder_path": os.path.abspath(autoencoder_path) if autoencoder_path else "",
            "latent_space_sha256": latent_space_sha256,
            "settings": json.loads(json.dumps(settings, default=_jsonable)),
            "latent_shape": latent_shape,
            "num_classes": num_classes,
            "latent_mean": mean,
            "latent_std": std,
            "scale_factor": 1.0 / std,
            "latent_channel_mean": [float(v) for v in channel_sums * channel_sums.numel() / count],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sections": manifest_sections,
        }
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    root = os.path.abspath(cache_dir)
    logger.info(f"latent cache: {num_cases} cases encoded into {root}, scale_factor {1.0 / std:.6g}")
    return LatentCache(root=root, manifest=manifest, built=True)


def latent_channel_std(dataset: Sequence[Mapping[str, Any]], key: str = "image") -> list[float]:
    """Per-channel standard deviation of the latents ``dataset[i][key]`` (C, *spatial), pooled over cases.

    The reference that sampled latents are compared with: a sampler whose latents come out several
    times wider than the real ones decodes to high-contrast blobs, however normal the clamped images'
    statistics look.
    """
    latents = torch.stack([torch.as_tensor(dataset[i][key]).float() for i in range(len(dataset))])
    return [float(v) for v in latents.transpose(0, 1).flatten(1).std(dim=1)]


class LoadLatentCased(Transform):
    """Dictionary transform: read a cached case (``cache_file``) into ``image`` (scaled latent) and ``label``.

    MONAI's ``LoadImaged`` reads images, not ``torch.save`` files. The latent is normalised here, once per
    case (:class:`scripts.data.latent_space.LatentScaling`; the sampler undoes it before decoding).

    Args:
        scale_factor: multiplies the latent mean.
        latent_shift: per-channel value subtracted first (``None``: uncentred, the default).
        with_latent: load the latent into ``latent_key``.
        with_label: load the image-resolution label map (uint8) into ``label_key``.
    """

    def __init__(
        self,
        scale_factor: float = 1.0,
        latent_shift: Sequence[float] | None = None,
        with_latent: bool = True,
        with_label: bool = False,
        file_key: str = "cache_file",
        latent_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.scaling = LatentScaling(scale_factor, latent_shift)
        self.with_latent = with_latent
        self.with_label = with_label
        self.file_key = file_key
        self.latent_key = latent_key
        self.label_key = label_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        path = d[self.file_key]
        try:
            case = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a cache damaged after it was built: say which file and how to recover
            raise BundleInputError(
                f"{path}: cannot read cached latent ({type(e).__name__}); delete its cache folder to rebuild it"
            ) from e
        d.pop(self.latent_key, None)  # the source image path; the cached latent takes its place
        d.pop(self.label_key, None)
        if self.with_latent:
            d[self.latent_key] = self.scaling.normalise(case["latent"])
        if self.with_label:
            d[self.label_key] = case["label"]
        return d


def _encode_case(
    item: Mapping[str, str], preprocessing: Any, encoder: Any, num_classes: int
) -> tuple[dict[str, torch.Tensor], list[float], list[int]]:
    """Preprocess and encode one case: its cache entry and its per-class intensity sums and counts."""
    data = preprocessing({"image": item["image"], "label": item["label"]})
    image, label = _plain(data["image"]).float(), _plain(data["label"]).to(torch.uint8)
    case = {
        "latent": encoder.encode(image[None])[0].to("cpu", torch.float32).contiguous(),
        "label": label.contiguous(),
        "affine": torch.as_tensor(np.asarray(data["image"].affine), dtype=torch.float64),
    }
    return (case, *_class_sums(image, label, num_classes))


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor: MONAI's ``MetaTensor`` cannot be loaded back with ``weights_only=True``."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))


def _class_sums(image: torch.Tensor, label: torch.Tensor, num_classes: int) -> tuple[list[float], list[int]]:
    """Per-class intensity sums and voxel counts of one preprocessed case."""
    sums, counts = class_intensity_sums(image, label, num_classes)
    return [float(s) for s in sums], [int(c) for c in counts]


def _file_key(path: str) -> list[Any]:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _jsonable(value: Any) -> Any:
    """JSON form of config values (tuples, numpy and torch scalars) for the fingerprint."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
