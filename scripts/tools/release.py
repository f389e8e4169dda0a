# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Release packaging: the bundle as one deterministic zip, the way the MONAI model zoo ships bundles.

``python -m scripts.tools.release --output_dir dist`` (from the bundle root) writes
``<output_dir>/<name>_v<version>.zip``, where ``name`` is ``configs/metadata.json``'s ``name``
made file-system safe (lower case, runs of other characters turned into ``_``) and ``version``
its ``version``. The zip holds one folder, ``<name>/``, so that::

    python -m monai.bundle download --name <name> --url file:///abs/path/<name>_v<version>.zip --bundle_dir D

unpacks it into ``D/<name>`` (MONAI saves the download as ``D/<name>.zip`` and extracts it into
``D``, skipping extraction when ``D/<name>`` already holds files).

What ships is what a user needs to run the bundle: ``LICENSE``, ``README.md``, ``requirements.txt``,
``large_files.yml``, ``configs/``, ``scripts/``, ``models/``, ``docs/``, ``benchmarks/`` and the demo
masks (``datasets/demo_masks/``, the default input of ``configs/inference.yaml``).
Development files stay out, as in the zoo (which keeps tests in its own CI tree): ``tests/``,
``pytest.ini``, ``requirements-dev.txt``, ``.ci/``, dot files, ``__pycache__``. In a git checkout
the files come from ``git ls-files`` (tracked, plus new files git does not ignore), so ignored run
outputs, datasets and caches never ship; a folder outside git (e.g. an unpacked release) is
walked instead. Every ``large_files.yml`` entry ships too and must be present with its hash: the
zoo's hosted zips carry their weights.

Each workflow config ships standalone: ``configs/<task>.yaml`` holds what the repository's layers give it
(configs/common.yaml, configs/train_base.yaml for training, the task an overlay extends), folded into one
file, so the model zoo's single-file tools (``monai.bundle run --config_file configs/inference.yaml``,
``verify_net_in_out``, ``ckpt_export``) load it; the layered commands of the README still work, since a
folded file replaces what it layers on. The overlays (``hires.yaml``, ``multi_gpu.yaml``) ship as they are.

The zip is byte-for-byte reproducible: entries sorted, no directory entries, a fixed timestamp,
fixed Unix permissions and deflate level (the zoo touches files to a fixed date and runs
``zip -D -X``). The same files with the same zlib give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import zipfile
from typing import Sequence

import yaml

from scripts.core.checkpoints import file_hash
from scripts.core.errors import BundleInputError, install_error_hook
from scripts.core.outputs import atomic_path
from scripts.core.settings import layered_config_files

__all__ = ["release_name", "release_files", "check_large_files", "standalone_config", "write_release", "main"]

#: Top-level files and folders a user of the bundle needs; anything else at the root stays out.
SHIPPED_FILES = ("LICENSE", "README.md", "requirements.txt", "large_files.yml", "large_files.yaml", "large_files.json")
SHIPPED_DIRS = ("configs", "scripts", "models", "docs", "benchmarks", "datasets/demo_masks")
#: Never shipped, at any depth (besides dot files and folders).
EXCLUDED_NAMES = ("__pycache__",)
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")
#: Files the zoo's CI requires in every bundle.
REQUIRED_FILES = ("LICENSE", "configs/metadata.json")

#: Configs that layer on any workflow: shipped as they are, not folded.
OVERLAY_CONFIGS = ("common.yaml", "hires.yaml", "multi_gpu.yaml")

#: Timestamp of every entry: the earliest a zip can record (the zoo uses a fixed date too).
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o100644  # regular file, rw-r--r--
_CHUNK = 1 << 20
_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # those MONAI's check_hash accepts


def release_name(metadata_name: str) -> str:
    """File-system safe bundle name: lower case, runs of anything but ``a-z0-9`` turned into ``_``.

    ``"3D-LLDM liver HBP MRI generative diffusion"`` -> ``"3d_lldm_liver_hbp_mri_generative_diffusion"``.
    MONAI's ``extractall`` takes the folder name up to the first dot, so the name has none.
    """
    name = re.sub(r"[^a-z0-9]+", "_", str(metadata_name).lower()).strip("_")
    if not name:
        raise BundleInputError(f"configs/metadata.json: 'name' {metadata_name!r} has no letters or digits")
    return name


def _read_metadata(bundle_root: str) -> tuple[str, str]:
    """(release name, version) from ``configs/metadata.json``, checked as the zoo's CI does."""
    path = os.path.join(bundle_root, "configs", "metadata.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise BundleInputError(f"{path}: not found; run from the bundle root or pass --bundle_root") from None
    except json.JSONDecodeError as e:
        raise BundleInputError(f"{path}: not valid JSON ({e})") from e
    for key in ("name", "version"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise BundleInputError(f"{path}: {key!r} is missing or empty")
    version = meta["version"].strip()
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]*", version):
        raise BundleInputError(f"{path}: 'version' {version!r} is not a version like 1.2.3")
    if version not in (meta.get("changelog") or {}):
        raise BundleInputError(f"{path}: version {version} has no 'changelog' entry; add one before releasing")
    return release_name(meta["name"]), version


def _large_files_path(bundle_root: str) -> str | None:
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        if os.path.isfile(os.path.join(bundle_root, name)):
            return os.path.join(bundle_root, name)
    return None


def check_large_files(bundle_root: str) -> list[str]:
    """Check every ``large_files.yml`` entry is present with its hash; return their relative paths.

    An entry with an empty ``url`` ships only in the bundle, so it must have a ``hash_val``.
    Entries with a url must be fetched first (``python -m monai.bundle download_large_files
    --bundle_path .``): the release carries them like the zoo's hosted zips.
    """
    listing = _large_files_path(bundle_root)
    if listing is None:
        return []
    import yaml  # a runtime dependency; JSON is YAML too

    try:
        with open(listing, encoding="utf-8") as f:
            entries = (yaml.safe_load(f) or {}).get("large_files") or []
    except (yaml.YAMLError, AttributeError) as e:
        raise BundleInputError(f"{listing}: not a mapping with a 'large_files' list ({e})") from e
    root = os.path.abspath(bundle_root)
    paths = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise BundleInputError(f"{listing}: entry {entry!r} is not a mapping with path, url and hash_val")
        rel = str(entry.get("path") or "")
        full = os.path.normpath(os.path.join(root, rel))
        if not rel or os.path.isabs(rel) or not full.startswith(root + os.sep):
            raise BundleInputError(f"{listing}: entry path {rel!r} is not a file inside the bundle")
        url, hash_val = str(entry.get("url") or ""), str(entry.get("hash_val") or "").lower()
        hash_type = str(entry.get("hash_type") or "md5").lower()  # MONAI's download_url default
        if not os.path.isfile(full):
            fetch = "; fetch it with python -m monai.bundle download_large_files --bundle_path ." if url else ""
            raise BundleInputError(f"{rel}: listed in {os.path.basename(listing)} but missing{fetch}")
        if not url and not hash_val:
            raise BundleInputError(f"{rel}: listed in {os.path.basename(listing)} with no url and no hash_val")
        if hash_val:
            if hash_type not in _HASH_TYPES:
                raise BundleInputError(f"{listing}: {rel} has unknown hash_type {hash_type!r}")
            actual = file_hash(full, hash_type)
            if actual != hash_val:
                raise BundleInputError(
                    f"{rel}: {hash_type} is {actual} but {os.path.basename(listing)} says {hash_val}; "
                    "update hash_val if the new weights are intended"
                )
        paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return paths


def _git_files(bundle_root: str) -> list[str] | None:
    """Files of the git checkout under ``bundle_root`` (relative, '/'-separated), or None outside git.

    Tracked files plus new files git does not ignore, as in the working tree: a module added but
    not yet committed ships with the code that imports it, while ignored run outputs, datasets
    and caches never ship.
    """
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "."],
            cwd=bundle_root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    # a folder merely inside some other repository (e.g. an unpacked release under a checkout) is not a checkout
    return files if "configs/metadata.json" in files else None


def _walk(bundle_root: str) -> list[str]:
    files = []
    for top in SHIPPED_DIRS:
        for folder, dirs, names in os.walk(os.path.join(bundle_root, top)):
            dirs[:] = [d for d in dirs if not _excluded(d)]
            rel = os.path.relpath(folder, bundle_root).replace(os.sep, "/")
            files.extend(f"{rel}/{n}" for n in names)
    return files + [f for f in SHIPPED_FILES if os.path.isfile(os.path.join(bundle_root, f))]


def _excluded(part: str) -> bool:
    return part.startswith(".") or part in EXCLUDED_NAMES or part.endswith(EXCLUDED_SUFFIXES)


def _shipped(rel: str) -> bool:
    parts = rel.split("/")
    if any(_excluded(p) for p in parts):
        return False
    return rel in SHIPPED_FILES if len(parts) == 1 else any(rel.startswith(f"{d}/") for d in SHIPPED_DIRS)


def release_files(bundle_root: str) -> list[str]:
    """Sorted bundle-relative paths that go into the release (large files checked and included)."""
    listed = _git_files(bundle_root)
    candidates = listed if listed is not None else _walk(bundle_root)
    files = {p for p in candidates if _shipped(p) and os.path.isfile(os.path.join(bundle_root, p))}
    files.update(check_large_files(bundle_root))
    for required in REQUIRED_FILES:
        if required not in files:
            raise BundleInputError(f"{os.path.join(bundle_root, required)}: required in a bundle but missing")
    return sorted(files)


def standalone_config(bundle_root: str, rel: str) -> bytes | None:
    """The workflow config ``rel`` with every layer it is used with folded in, as YAML; ``None`` for a file
    that ships as it is (not a ``configs/*.yaml`` workflow config)."""
    folder, name = os.path.split(rel)
    if folder != "configs" or not name.endswith(".yaml") or name in OVERLAY_CONFIGS:
        return None
    from monai.bundle import ConfigParser

    layers = layered_config_files(os.path.join(bundle_root, rel))
    content = ConfigParser.load_config_files(layers)
    sources = " + ".join(os.path.basename(p) for p in layers)
    header = (
        f"# {rel} for the release, standalone: {sources} in one file, so that single-file\n"
        "# tools load it (the commented layers are in the bundle's repository).\n"
    )
    return (header + yaml.safe_dump(content, sort_keys=False, width=120, allow_unicode=True)).encode()


def _zip_entry(arcname: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.create_system = 3  # Unix, so the permission bits below mean the same everywhere
    info.external_attr = ZIP_FILE_MODE << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size = size  # lets zipfile pick zip64 up front for big weights, deterministically
    return info


def write_release(bundle_root: str = ".", output_dir: str = "dist", overwrite: bool = False) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` from ``bundle_root`` and return its path.

    Raises ``BundleInputError`` when the zip exists and ``overwrite`` is off, when metadata or a
    large file is wrong, or when ``output_dir`` cannot be written. The zip appears whole or not at
    all (written to a temporary file next to it, then renamed).
    """
    bundle_root = os.path.abspath(bundle_root)
    name, version = _read_metadata(bundle_root)
    if str(output_dir).startswith("~"):
        raise BundleInputError(f"--output_dir {output_dir}: '~' is not expanded here; give the full path")
    destination = os.path.realpath(output_dir)
    for shipped in SHIPPED_DIRS:
        folder = os.path.realpath(os.path.join(bundle_root, shipped))
        if destination == folder or destination.startswith(folder + os.sep):
            # the zip would ship inside the next release (and a rebuilt one would hold the previous one)
            raise BundleInputError(
                f"--output_dir {output_dir}: inside {shipped}/, which the release ships; choose a folder outside it"
            )
    zip_path = os.path.join(os.path.abspath(output_dir), f"{name}_v{version}.zip")
    refuse = f"{zip_path}: exists; pass --overwrite true or choose another --output_dir"
    if os.path.exists(zip_path) and not overwrite:
        raise BundleInputError(refuse)
    files = release_files(bundle_root)
    folder = os.path.dirname(zip_path)
    try:
        with atomic_path(zip_path) as tmp:
            with zipfile.ZipFile(tmp, "w", compresslevel=9) as zf:
                for rel in files:
                    src = os.path.join(bundle_root, rel)
                    folded = standalone_config(bundle_root, rel)
                    if folded is not None:
                        zf.writestr(_zip_entry(f"{name}/{rel}", len(folded)), folded)
                        continue
                    with (
                        open(src, "rb") as fin,
                        zf.open(_zip_entry(f"{name}/{rel}", os.path.getsize(src)), "w") as fout,
                    ):
                        shutil.copyfileobj(fin, fout, _CHUNK)
            if os.path.exists(zip_path) and not overwrite:  # appeared while we were zipping
                raise BundleInputError(refuse)
    except PermissionError as e:
        raise BundleInputError(f"{folder}: cannot write the release here ({e.strerror})") from e
    return zip_path


def _flag(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the bundle's one ``ERROR:`` line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BundleInputError(f"python -m scripts.tools.release: {message} (see --help)")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the release zip and print its path, size and sha256; errors are one ``ERROR:`` line."""
    install_error_hook()
    p = _ArgumentParser(description="Package the bundle as a deterministic model-zoo style zip.")
    p.add_argument("--bundle_root", default=".", help="the bundle folder (default: the current one)")
    p.add_argument("--output_dir", default="dist", help="where <name>_v<version>.zip goes (default: dist)")
    p.add_argument(
        "--overwrite",
        type=_flag,
        nargs="?",
        const=True,
        default=False,
        help="replace an existing zip of the same version (true/false)",
    )
    a = p.parse_args(argv)
    path = write_release(a.bundle_root, a.output_dir, overwrite=a.overwrite)
    with zipfile.ZipFile(path) as zf:
        count = len(zf.namelist())
    print(f"{path}: {count} files, {os.path.getsize(path)} bytes, sha256 {file_hash(path, 'sha256')}")


if __name__ == "__main__":
    main()
