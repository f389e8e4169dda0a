# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The latent cache: encoded once, reused while nothing changed, rebuilt (whole) when something did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import common_parser, one_thread, write_autoencoder  # noqa: F401  (one_thread: autouse)

from scripts.core.checkpoints import load_network_weights
from scripts.data.cases import load_datalist
from scripts.data.latent_cache import LoadLatentCased, prepare_latent_cache
from scripts.models.autoencoder import latent_space_sha256


def _cache(tiny_phantoms: Path, cache_dir: Path, autoencoder: Path, **settings):
    """Build or reuse a cache the way the training configs do; returns (cache, encoder, preprocessing)."""
    parser = common_parser(**settings)
    encoder = parser.get_parsed_content("tiled_autoencoder_def")
    checkpoint = load_network_weights(encoder.autoencoder, str(autoencoder), "autoencoder", "autoencoder weights")
    preprocessing = parser.get_parsed_content("pair_preprocessing")
    datalist = str(tiny_phantoms / "datalist.json")
    sections = {s: load_datalist(datalist, str(tiny_phantoms), s) for s in ("training", "validation")}
    cache = prepare_latent_cache(
        str(cache_dir),
        encoder,
        latent_space_sha256(checkpoint),
        preprocessing,
        sections,
        parser.get_parsed_content("latent_cache_settings"),
        parser.get_parsed_content("num_classes"),
        autoencoder_path=str(autoencoder),
        progress=False,
    )
    return cache, encoder, preprocessing


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cache_holds_latent_means_and_labels_then_is_reused(tiny_phantoms, tmp_path):
    autoencoder = write_autoencoder(tmp_path / "ae.pt", seed=0)
    cache, encoder, preprocessing = _cache(tiny_phantoms, tmp_path / "cache", autoencoder)
    assert cache.built
    items = cache.items("training") + cache.items("validation")
    assert [len(cache.items(s)) for s in ("training", "validation")] == [2, 1]

    case = _load(items[0]["cache_file"])
    data = preprocessing({"image": items[0]["image"], "label": items[0]["label"]})
    with torch.no_grad():  # the stored latent is the encoder's MEAN, not a sample
        z_mu, _ = encoder.autoencoder.encode(data["image"].as_tensor()[None])
    assert case["latent"].dtype == torch.float32 and case["latent"].shape == (4, 8, 8, 8)
    torch.testing.assert_close(case["latent"], z_mu[0], rtol=1e-4, atol=1e-5)
    assert case["label"].dtype == torch.uint8 and case["label"].shape == (1, 32, 32, 32)  # image resolution
    assert torch.equal(case["label"], data["label"].as_tensor().to(torch.uint8))

    training = torch.stack([_load(i["cache_file"])["latent"] for i in cache.items("training")]).double()
    assert cache.scale_factor == pytest.approx(1.0 / float(training.std(unbiased=False)), rel=1e-6)
    loaded = LoadLatentCased(scale_factor=cache.scale_factor, with_label=True)(items[0])
    torch.testing.assert_close(loaded["image"], case["latent"] * cache.scale_factor)
    # the per-channel means centre the training latents: shifted by them, each channel averages 0
    channel_mean = training.transpose(0, 1).flatten(1).mean(dim=1)
    assert cache.latent_channel_mean == pytest.approx(channel_mean.tolist(), rel=1e-6, abs=1e-9)
    centre = LoadLatentCased(scale_factor=cache.scale_factor, latent_shift=cache.latent_channel_mean)
    centred = torch.stack([centre(i)["image"] for i in cache.items("training")]).double()
    assert centred.transpose(0, 1).flatten(1).mean(dim=1).abs().max() < 1e-5
    assert float(channel_mean.abs().max()) * cache.scale_factor > 1e-3  # so the check above can fail

    before = _mtimes(Path(cache.root))
    again, _, _ = _cache(tiny_phantoms, tmp_path / "cache", autoencoder)
    assert not again.built and again.fingerprint == cache.fingerprint
    assert _mtimes(Path(again.root)) == before, "a matching cache was written again"
    # the same weights in another file (an exported copy with other entries): still the same cache
    exported = tmp_path / "exported.pt"
    torch.save({**_load(str(autoencoder)), "source_epoch": 7}, exported)
    copy, _, _ = _cache(tiny_phantoms, tmp_path / "cache", exported)
    assert not copy.built and _mtimes(Path(copy.root)) == before


def test_cache_is_rebuilt_when_weights_or_settings_change(tiny_phantoms, tmp_path):
    first = write_autoencoder(tmp_path / "ae.pt", seed=0)
    cache, _, _ = _cache(tiny_phantoms, tmp_path / "cache", first)
    latent = _load(cache.items("training")[0]["cache_file"])["latent"]

    write_autoencoder(tmp_path / "ae.pt", seed=1)  # same file name, other weights
    rebuilt, _, _ = _cache(tiny_phantoms, tmp_path / "cache", first)
    assert rebuilt.built and rebuilt.fingerprint != cache.fingerprint
    assert not torch.allclose(_load(rebuilt.items("training")[0]["cache_file"])["latent"], latent)
    assert rebuilt.scale_factor != cache.scale_factor

    relabelled, _, _ = _cache(tiny_phantoms, tmp_path / "cache", first, label_map={1: 1, 2: 2, 3: 3, 4: 4})
    assert relabelled.built and relabelled.fingerprint != rebuilt.fingerprint  # another label set: not reused
    rescaled, _, _ = _cache(tiny_phantoms, tmp_path / "cache", first, intensity_percentiles=[1.0, 99.0])
    assert rescaled.built and rescaled.fingerprint != relabelled.fingerprint

    # rebuilt in place through a staging folder: one cache folder, no leftovers beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.pt", "cache"]
    manifest_files = {c["file"] for s in rescaled.manifest["sections"].values() for c in s}
    assert {str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*.pt")} == manifest_files
    assert np.isfinite(rescaled.scale_factor)


def test_cache_pointed_at_a_dataset_never_replaces_it(tiny_phantoms, tmp_path):
    """A cache folder that is a dataset the bundle wrote (or holds the cases) is refused, not rebuilt over it."""
    import shutil

    from scripts.core.errors import BundleInputError

    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_phantoms, dataset)
    before = _mtimes(dataset)
    autoencoder = write_autoencoder(tmp_path / "ae.pt", seed=0)
    with pytest.raises(BundleInputError, match="holds an input of this command"):
        _cache(dataset, dataset, autoencoder)
    with pytest.raises(BundleInputError, match="not a latent cache"):
        _cache(tiny_phantoms, dataset, autoencoder)  # the cases elsewhere: the kind still protects it
    assert _mtimes(dataset) == before
