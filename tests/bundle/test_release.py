# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Release packaging: the zip is reproducible, unpacks with ``monai.bundle download`` and runs.

One zip is built (with the CLI, from the repository) and unpacked (with MONAI's downloader) per
module; the other tests rebuild from copies of the unpacked folder, which never change under them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import BUNDLE_ROOT, TINY_GRID, run_bundle

from scripts.core.errors import BundleInputError
from scripts.core.settings import layered_config_files
from scripts.tools.release import release_name, write_release

#: The command the unpacked release must run as a user would (cwd: the unpacked folder), on the tiny
#: phantoms ("{dataset}") with --output_dir, --device cpu and the tiny grid added. Switching this smoke
#: test to the main inference is this one line, e.g. ("configs/inference.yaml", "--num_steps", "2").
RELEASE_SMOKE = (str(layered_config_files("configs/inference.yaml")), "--num_inference_steps", "2")

METADATA = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
NAME = release_name(METADATA["name"])
LARGE_FILES = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The release zip, written by the command a maintainer runs in the bundle root."""
    out = tmp_path_factory.mktemp("release") / "dist"
    result = _python("-m", "scripts.tools.release", "--output_dir", str(out), cwd=BUNDLE_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    zip_path = out / f"{NAME}_v{METADATA['version']}.zip"
    assert result.stdout.strip() == (
        f"{zip_path}: {len(zipfile.ZipFile(zip_path).namelist())} files, {zip_path.stat().st_size} bytes, "
        f"sha256 {_sha256(zip_path)}"
    )
    return zip_path


@pytest.fixture(scope="module")
def unpacked(release, tmp_path_factory) -> Path:
    """The release as a user gets it: ``python -m monai.bundle download --name N --url file://...``."""
    bundle_dir = tmp_path_factory.mktemp("downloads")
    result = _python(
        "-m",
        "monai.bundle",
        "download",
        "--name",
        NAME,
        "--url",
        release.as_uri(),
        "--bundle_dir",
        str(bundle_dir),
        cwd=bundle_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return bundle_dir / NAME


def _copy(unpacked: Path, dest: Path) -> Path:
    return Path(shutil.copytree(unpacked, dest, ignore=shutil.ignore_patterns("__pycache__")))


def test_release_name_is_file_system_safe():
    assert release_name("3D-LLDM liver HBP MRI generative diffusion") == "3d_lldm_liver_hbp_mri_generative_diffusion"
    assert release_name("  Spleen CT v1.2 (seg) ") == "spleen_ct_v1_2_seg"
    with pytest.raises(BundleInputError, match="no letters or digits"):
        release_name(" -- ")


@pytest.mark.slow
def test_zip_holds_one_bundle_folder_with_what_a_user_needs(release):
    with zipfile.ZipFile(release) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names) and len(names) == len(set(names))
    assert {n.split("/")[0] for n in names} == {NAME}
    files = {n[len(NAME) + 1 :] for n in names}
    assert {
        "LICENSE",
        "README.md",
        "requirements.txt",
        "large_files.yml",
        "configs/metadata.json",
        "configs/common.yaml",
        "configs/logging.conf",
        "scripts/__init__.py",
        "scripts/tools/release.py",
        "docs/README.md",
    } <= files
    assert {entry["path"] for entry in LARGE_FILES} <= files and any(
        f.startswith("models/") and f.endswith(".pt") for f in files
    )
    # development files and run outputs stay out (outputs/ and datasets/ exist in a working checkout);
    # of datasets/, only the demo masks inference runs on by default
    assert {f.split("/")[0] for f in files} <= {
        "LICENSE",
        "README.md",
        "requirements.txt",
        "large_files.yml",
        "configs",
        "scripts",
        "models",
        "docs",
        "benchmarks",
        "datasets",
    }
    demo_masks = {f for f in files if f.startswith("datasets/")}
    assert demo_masks and all(f.startswith("datasets/demo_masks/") and f.endswith(".nii.gz") for f in demo_masks)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/." in f"/{f}"]
    # reproducible metadata: no directory entries, one date, one mode, deflate
    assert all(
        not i.is_dir()
        and i.date_time == (1980, 1, 1, 0, 0, 0)
        and i.external_attr >> 16 == 0o100644
        and i.compress_type == zipfile.ZIP_DEFLATED
        for i in infos
    )


@pytest.mark.slow
def test_monai_download_unpacks_the_bundle_folder(unpacked):
    assert unpacked.name == NAME and (unpacked / "configs" / "metadata.json").is_file()
    assert json.loads((unpacked / "configs" / "metadata.json").read_text()) == METADATA
    for entry in LARGE_FILES:  # the weights arrive intact
        assert hashlib.new(entry["hash_type"], (unpacked / entry["path"]).read_bytes()).hexdigest() == entry["hash_val"]


@pytest.mark.slow
def test_rebuilds_are_byte_identical_and_skip_junk(release, unpacked, tmp_path):
    # an unpacked release, outside git, with run outputs and caches lying around, packs to the same bytes
    copy = _copy(unpacked, tmp_path / NAME)
    for junk in (
        "outputs/autoencoder/autoencoder_last.pt",
        "datasets/phantom/datalist.json",
        "tests/test_x.py",
        "scripts/__pycache__/data.cpython-311.pyc",
        "models/.DS_Store",
        ".ci/run",
        "pytest.ini",
    ):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_text("junk")
    first = Path(write_release(str(copy), str(tmp_path / "a")))
    second = Path(write_release(str(copy), str(tmp_path / "b")))
    assert first.name == release.name
    assert _sha256(first) == _sha256(second) == _sha256(release)


@pytest.mark.slow
def test_refuses_to_overwrite_unless_asked(release, unpacked, tmp_path):
    before = _sha256(release)
    result = _python("-m", "scripts.tools.release", "--output_dir", str(release.parent), cwd=BUNDLE_ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ERROR: {release}: exists; pass --overwrite true or choose another --output_dir"
    )
    assert "Traceback" not in result.stderr and _sha256(release) == before
    # with the flag the zip is replaced (by identical bytes: built from the unpacked copy)
    copy = _copy(unpacked, tmp_path / NAME)
    assert write_release(str(copy), str(release.parent), overwrite=True) == str(release)
    assert _sha256(release) == before
    assert sorted(p.name for p in release.parent.iterdir()) == [release.name]  # no temporary files left


@pytest.mark.parametrize("damage", ["missing", "mismatched"])
def test_missing_or_mismatched_weight_is_an_error_naming_it(unpacked, tmp_path, damage):
    copy = _copy(unpacked, tmp_path / NAME)
    weight = LARGE_FILES[0]["path"]
    if damage == "missing":
        (copy / weight).unlink()
        expected = f"{weight}: listed in large_files.yml but missing"
    else:
        with open(copy / weight, "ab") as f:
            f.write(b"\0")
        expected = f"{weight}: sha256 is {_sha256(copy / weight)} but large_files.yml says {LARGE_FILES[0]['hash_val']}"
    out = tmp_path / "dist"
    with pytest.raises(BundleInputError) as err:
        write_release(str(copy), str(out))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even a partial zip


@pytest.mark.slow
def test_unpacked_release_runs_a_bundle_command(unpacked, tiny_phantoms, tmp_path):
    """The shipped configs, scripts and weights work together outside the repository."""
    out = tmp_path / "out"
    command, *extra = (arg.format(dataset=tiny_phantoms) for arg in RELEASE_SMOKE)
    result = run_bundle(
        "--config_file",
        command,
        *extra,
        "--dataset_dir",
        str(tiny_phantoms),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        *TINY_GRID[:4],
        cwd=unpacked,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.rglob("*.nii.gz")), f"{command} wrote no NIfTI under {out}"


@pytest.mark.slow
def test_workflow_configs_ship_standalone_and_run_as_single_files(unpacked, tmp_path):
    """Each workflow config holds its layers, so the model zoo's single-file tools and commands load it."""
    from monai.bundle import ConfigParser

    for path in sorted((unpacked / "configs").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        if path.name in ("common.yaml", "hires.yaml", "multi_gpu.yaml"):
            assert content == yaml.safe_load((BUNDLE_ROOT / "configs" / path.name).read_text()), path.name
            continue
        layered = ConfigParser.load_config_files(layered_config_files(str(BUNDLE_ROOT / "configs" / path.name)))
        assert content == layered, f"{path.name} is not its layers folded together"
        assert not [k for k in content if k.startswith("+") or "#" in k], path.name
    out = tmp_path / "out"
    args = ("--num_inference_steps", "2", "--autoguidance_weight", "1", "--output_dir", str(out), "--device", "cpu")
    result = run_bundle("--config_file", "configs/inference.yaml", *args, cwd=unpacked)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("*_image.nii.gz"))) == len(list((unpacked / "datasets" / "demo_masks").glob("*.nii.gz")))


def test_release_passes_the_model_zoo_checks(unpacked):
    """verify_bundle's min mode (files, version, metadata schema) and verify_net_in_out on the UNet."""
    import torch
    from monai.bundle import verify_metadata, verify_net_in_out

    for required in ("LICENSE", "configs/metadata.json", "configs/inference.yaml"):
        assert (unpacked / required).is_file(), required
    # the zoo also prefers models/model.pt; this bundle has several networks, each its own file, and the
    # model card says so (a zoo submission lists it among the preferred-file exclusions)
    assert not (unpacked / "models" / "model.pt").exists()
    assert "models/model.pt" in (unpacked / "docs" / "README.md").read_text()
    meta = json.loads((unpacked / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(
        meta_file=str(unpacked / "configs" / "metadata.json"),
        filepath=str(unpacked / "docs" / "meta_schema_20240725.json"),
    )
    unet_format = meta["diffusion_unet_data_format"]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(unpacked / "configs" / "metadata.json"),
        config_file=str(unpacked / "configs" / "inference.yaml"),
        device="cpu",
        n=4,
        extra_forward_args={"timesteps": torch.tensor([10])},
        **{"_meta_#network_data_format": {**unet_format, "inputs": {"image": unet_format["inputs"]["latent"]}}},
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--output_dir", "configs"], "ERROR: --output_dir configs: inside configs/, which the release ships"),
        (["--output_dir", "models/releases"], "ERROR: --output_dir models/releases: inside models/"),
        (["--overwrite", "perhaps"], "ERROR: python -m scripts.tools.release: argument --overwrite"),
        (["--output-dir", "dist"], "ERROR: python -m scripts.tools.release: unrecognized arguments: --output-dir"),
    ],
)
@pytest.mark.slow
def test_bad_release_arguments_are_one_line_and_write_nothing(args, expected):
    before = sorted(p.name for p in (BUNDLE_ROOT / "configs").iterdir())
    result = _python("-m", "scripts.tools.release", *args, cwd=BUNDLE_ROOT)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert sorted(p.name for p in (BUNDLE_ROOT / "configs").iterdir()) == before
    assert not (BUNDLE_ROOT / "models" / "releases").exists()
